"""MAE decoder depth {1, 2, 4} (decoder width fixed by the base config), 3 seeds (mnist5k)."""

from ssl_ad.ablation.grid import ablation_config, dotted


def get_config():
    c = ablation_config()
    c.name = "MAE decoder depth"
    c.train_config = "configs/mae_mnist5k.py"
    c.eval_config = "configs/eval_mnist5k.py"
    c.grid = dotted({"mae.decoder_depth": [1, 2, 4]})
    c.seeds = 3
    c.eval_overrides = dotted({"scorers": ("knn", "mahalanobis", "mae_recon"), "tsne_points": 0})
    return c
