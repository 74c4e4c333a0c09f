"""DINO teacher EMA momentum (start of its cosine schedule) {0.95, 0.99, 0.996}, 3 seeds.

Short runs favour a lower momentum (the teacher must move within the run). Base:
configs/dino_mnist5k.py (CPU); on an accelerator use --config.train_config=configs/dino_cifar10.py
with a CIFAR-10 eval config and --config.data_dir.
"""

from ssl_ad.ablation.grid import ablation_config, dotted


def get_config():
    c = ablation_config()
    c.name = "DINO teacher momentum"
    c.train_config = "configs/dino_mnist5k.py"
    c.eval_config = "configs/eval_mnist5k.py"
    c.grid = dotted({"dino.momentum_teacher": [0.95, 0.99, 0.996]})
    c.seeds = 3
    c.eval_overrides = dotted({"scorers": ("knn", "mahalanobis"), "tsne_points": 0})
    return c
