"""DINO teacher temperature (after its warm-up) {0.04, 0.06, 0.07}, 3 seeds.

Base: configs/dino_mnist5k.py (CPU). On an accelerator use
--config.train_config=configs/dino_cifar10.py with a CIFAR-10 eval config and --config.data_dir.
"""

from ssl_ad.ablation.grid import ablation_config, dotted


def get_config():
    c = ablation_config()
    c.name = "DINO teacher temperature"
    c.train_config = "configs/dino_mnist5k.py"
    c.eval_config = "configs/eval_mnist5k.py"
    c.grid = dotted({"dino.teacher_temp": [0.04, 0.06, 0.07]})
    c.seeds = 3
    c.eval_overrides = dotted({"scorers": ("knn", "mahalanobis"), "tsne_points": 0})
    return c
