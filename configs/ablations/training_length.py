"""Training length: total_steps {150, 300, 600, 1200} of MAE on mnist5k (cosine schedule per length), 2 seeds."""

from ssl_ad.ablation.grid import ablation_config, dotted


def get_config():
    c = ablation_config()
    c.name = "Training length (MAE)"
    c.train_config = "configs/mae_mnist5k.py"
    c.eval_config = "configs/eval_mnist5k.py"
    c.grid = dotted({"total_steps": [150, 300, 600, 1200]})
    c.seeds = 2
    c.train_overrides = dotted({"checkpoint_every": 150})
    c.eval_overrides = dotted({"scorers": ("knn", "mahalanobis", "mae_recon"), "tsne_points": 0})
    return c
