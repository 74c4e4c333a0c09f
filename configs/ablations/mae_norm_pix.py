"""MAE reconstruction target: normalised patch pixels (norm_pix_loss) on vs off, 3 seeds (mnist5k)."""

from ssl_ad.ablation.grid import ablation_config, dotted


def get_config():
    c = ablation_config()
    c.name = "MAE norm_pix_loss"
    c.train_config = "configs/mae_mnist5k.py"
    c.eval_config = "configs/eval_mnist5k.py"
    c.grid = dotted({"mae.norm_pix_loss": [True, False]})
    c.seeds = 3
    c.eval_overrides = dotted({"scorers": ("knn", "mahalanobis", "mae_recon"), "tsne_points": 0})
    return c
