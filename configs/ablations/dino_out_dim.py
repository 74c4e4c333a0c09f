"""DINO head output dimension (prototypes) {256, 1024, 4096}, 3 seeds.

Base: configs/dino_mnist5k.py (CPU). On an accelerator use
--config.train_config=configs/dino_cifar10.py with a CIFAR-10 eval config and --config.data_dir.
"""

from ssl_ad.ablation.grid import ablation_config, dotted


def get_config():
    c = ablation_config()
    c.name = "DINO out_dim"
    c.train_config = "configs/dino_mnist5k.py"
    c.eval_config = "configs/eval_mnist5k.py"
    c.grid = dotted({"dino.out_dim": [256, 1024, 4096]})
    c.seeds = 3
    c.eval_overrides = dotted({"scorers": ("knn", "mahalanobis"), "tsne_points": 0})
    return c
