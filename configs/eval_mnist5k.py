"""Anomaly-detection evaluation on mnist5k: raw pixels, random-init ViT and the given checkpoints.

  python evaluate.py --config=configs/eval_mnist5k.py --config.checkpoint=runs/mae --config.checkpoint=runs/dino --outdir=reports/demo
"""

from ssl_ad.config_defaults import eval_config


def get_config():
    c = eval_config()
    c.data.name = "mnist5k"
    # Each round fits on at most 2,000 training normals (a fixed random subset): the elbow K-means
    # and GMM scorers dominate the demo's time on 2 CPU cores. 0 = all (3,600 per
    # leave-one-class-out round, 400 per one-class round).
    c.max_train_per_round = 2000
    c.data.mean = (0.1307,) * 3
    c.data.std = (0.3081,) * 3
    # Used for the random-init baseline when no checkpoint is given (else the first checkpoint's model).
    c.model.image_size = 28
    c.model.patch_size = 4
    c.model.width = 96
    c.model.depth = 4
    c.model.num_heads = 3
    return c
