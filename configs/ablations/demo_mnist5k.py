"""Demo-size ablation (a few minutes on a 2-core CPU): MAE mask ratio {0.5, 0.9} × 2 seeds, tiny ViT.

  python ablate.py --config=configs/ablations/demo_mnist5k.py --outdir=ablations/demo

Reduced evaluation: kNN and Mahalanobis on the one-class protocol, no t-SNE, no baselines.
"""

from ssl_ad.ablation.grid import ablation_config, dotted


def get_config():
    c = ablation_config()
    c.name = "Demo: MAE mask ratio (mnist5k, tiny)"
    c.train_config = "configs/mae_mnist5k.py"
    c.eval_config = "configs/eval_mnist5k.py"
    c.grid = dotted({"mae.mask_ratio": [0.5, 0.9]})
    c.seeds = 2
    c.train_overrides = dotted({
        "total_steps": 200,
        "batch_size": 64,
        "checkpoint_every": 100,
        "log_every": 20,
        "model.variant": "",  # the base config's "mu/4" off: the sizes below instead
        "model.width": 64,
        "model.depth": 3,
        "model.num_heads": 2,
        "mae.decoder_width": 32,
        "mae.decoder_heads": 2,
        "optim.warmup_steps": 20,
    })
    c.eval_overrides = dotted({
        "scorers": ("knn", "mahalanobis"),
        "protocols": ("one_class",),
        "tsne_points": 0,
        "pca_dims": 0,  # the features have 64 dims
    })
    return c
