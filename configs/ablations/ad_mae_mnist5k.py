"""Issue "features that beat raw pixels", MAE part: pooling (CLS vs mean of patch tokens), 3 seeds, on validation.

  python ablate.py --config=configs/ablations/ad_mae_mnist5k.py --outdir=benchmarks/ablations/ad_mae

Trains the demo MAE (configs/mae_mnist5k.py, 600 steps) on 'train:fit' and scores the held-out
'train:val' images (10 % of mnist5k's training split, per class, fixed): the test split is never
read. Raw pixels on the same images are the bar. Evaluation-only axis: pooling (CLS token or mean
of patch tokens), reusing each trained run. (A mask-ratio axis {0.75, 0.5} was cut to one value
for time on the shared 2-core machine; add "mae.mask_ratio": [0.75, 0.5] to the grid to run it.)
"""

from ssl_ad.ablation.grid import ablation_config, dotted

VALIDATION = {"data.train_split": "train:fit", "data.test_split": "train:val"}


def get_config():
    c = ablation_config()
    c.name = "MAE on mnist5k: pooling (validation split)"
    c.train_config = "configs/mae_mnist5k.py"
    c.eval_config = "configs/eval_mnist5k.py"
    c.grid = dotted({"eval.pooling": ["cls", "mean"]})
    c.seeds = 3
    c.train_overrides = dotted({"data.train_split": "train:fit"})
    c.eval_overrides = dotted({
        **VALIDATION,
        "sources": ("pixels",),
        "scorers": ("knn",),
        "protocols": ("one_class", "leave_one_class_out"),
        "tsne_points": 0,
    })
    return c
