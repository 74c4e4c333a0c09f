"""Anomaly detection on CIFAR-10 (one class out / one class in), as in the original study.

  python evaluate.py --config=configs/eval_cifar10.py --config.checkpoint=runs/mae_cifar10 \
      --config.data.data_dir=/data/tensorflow_datasets --outdir=reports/cifar10

Needs cifar10 prepared in data.data_dir (see the README). The study used
1,000 training images per class; ``data.max_per_class`` caps each split per
class, and CIFAR-10's test split has exactly 1,000 per class, so it stays whole.
"""

from ssl_ad.config_defaults import eval_config


def get_config():
    c = eval_config()
    c.data.name = "cifar10"
    c.data.max_per_class = 1000
    c.data.mean = (0.4914, 0.4822, 0.4465)
    c.data.std = (0.2470, 0.2435, 0.2616)
    # Used for the random-init baseline when no checkpoint is given (else the first checkpoint's model).
    c.model.image_size = 32
    c.model.patch_size = 4
    c.model.width, c.model.depth, c.model.num_heads = 192, 12, 3
    c.model.posemb = "sincos"
    return c
