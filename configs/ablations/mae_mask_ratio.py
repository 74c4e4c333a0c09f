"""MAE mask ratio {0.5, 0.75, 0.9} on mnist5k, 3 seeds (9 runs; ~30 min on a 2-core CPU).

  python ablate.py --config=configs/ablations/mae_mask_ratio.py --outdir=ablations/mae_mask_ratio

On an accelerator: --config.train_config=configs/mae_cifar10.py plus an eval config for CIFAR-10
(and --config.data_dir pointing at the prepared tfds data).
"""

from ssl_ad.ablation.grid import ablation_config, dotted


def get_config():
    c = ablation_config()
    c.name = "MAE mask ratio"
    c.train_config = "configs/mae_mnist5k.py"
    c.eval_config = "configs/eval_mnist5k.py"
    c.grid = dotted({"mae.mask_ratio": [0.5, 0.75, 0.9]})
    c.seeds = 3
    c.eval_overrides = dotted({"scorers": ("knn", "mahalanobis", "mae_recon"), "tsne_points": 0})
    return c
