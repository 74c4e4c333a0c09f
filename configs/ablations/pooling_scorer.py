"""Evaluation-only axis: CLS token vs mean of patch tokens, every scorer, on one MAE checkpoint per seed.

`eval.` keys go to the evaluation config, so both poolings reuse the same trained run
(runs/base/seed<k>, evaluated into eval-pooling-cls/ and eval-pooling-mean/). 2 seeds.
"""

from ssl_ad.ablation.grid import ablation_config, dotted


def get_config():
    c = ablation_config()
    c.name = "Pooling × scorer (MAE)"
    c.train_config = "configs/mae_mnist5k.py"
    c.eval_config = "configs/eval_mnist5k.py"
    c.grid = dotted({"eval.pooling": ["cls", "mean"]})
    c.seeds = 2
    c.eval_overrides = dotted({"scorers": ("knn", "mahalanobis", "kmeans", "gmm_kmeans", "gmm", "mae_recon"), "tsne_points": 0})
    return c
