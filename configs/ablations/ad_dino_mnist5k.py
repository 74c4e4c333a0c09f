"""Issue "features that beat raw pixels", DINO part: recipe options × pooling, 3 seeds, selected on validation.

  python ablate.py --config=configs/ablations/ad_dino_mnist5k.py --outdir=benchmarks/ablations/ad_dino

The demo DINO (configs/dino_mnist5k.py) trained on 'train:fit' for 500 steps (half the demo's
budget, so that 3 settings x 3 seeds fit in about an hour on 2 shared CPU cores): the reference
recipe, and DINOv2's KoLeo regulariser at weight 0.1 (DINOv2's value) and 0.3. Scored on the held-out
'train:val' images, with the CLS token and with the mean of patch tokens (both in each evaluation).
iBOT's masked-patch loss (weight 1.0, mask ratio 0.3) was run with seed 0 only, then replaced by
the second KoLeo weight for time: {"_label": "ibot 1.0", "dino.ibot_loss_weight": 1.0} runs it.
"""

from ssl_ad.ablation.grid import ablation_config, dotted

VALIDATION = {"data.train_split": "train:fit", "data.test_split": "train:val"}


def get_config():
    c = ablation_config()
    c.name = "DINO on mnist5k: KoLeo weight x pooling (validation split)"
    c.train_config = "configs/dino_mnist5k.py"
    c.eval_config = "configs/eval_mnist5k.py"
    c.settings = [
        {"_label": "reference", "dino.koleo_loss_weight": 0.0},
        {"_label": "koleo 0.1", "dino.koleo_loss_weight": 0.1},
        {"_label": "koleo 0.3", "dino.koleo_loss_weight": 0.3},
    ]
    c.seeds = 3
    c.train_overrides = dotted({"data.train_split": "train:fit", "total_steps": 500})
    c.eval_overrides = dotted({
        **VALIDATION,
        "sources": ("pixels",),
        "scorers": ("knn",),
        "protocols": ("one_class", "leave_one_class_out"),
        "pooling": ("cls", "mean"),
        "tsne_points": 0,
    })
    return c
