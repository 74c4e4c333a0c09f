"""Encoder size (MAE on mnist5k): depth/width/heads change together, so an explicit list of settings.

Each dict is one setting (dotted keys; "_label" names it in tables and folders). 2 seeds.
"""

from ssl_ad.ablation.grid import ablation_config, dotted


def get_config():
    c = ablation_config()
    c.name = "ViT size (MAE)"
    c.train_config = "configs/mae_mnist5k.py"
    c.eval_config = "configs/eval_mnist5k.py"
    c.settings = [
        {"_label": "ViT 2x64", "model.depth": 2, "model.width": 64, "model.num_heads": 2},
        {"_label": "ViT 4x96", "model.depth": 4, "model.width": 96, "model.num_heads": 3},
        {"_label": "ViT 6x192", "model.depth": 6, "model.width": 192, "model.num_heads": 3},
    ]
    c.seeds = 2
    c.train_overrides = dotted({"model.variant": ""})  # the base config's "mu/4" off: the settings' sizes
    c.eval_overrides = dotted({"scorers": ("knn", "mahalanobis", "mae_recon"), "tsne_points": 0})
    return c
