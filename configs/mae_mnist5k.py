"""The demo: a small MAE on the embedded mnist5k digits, a few minutes on 2 CPU cores."""

from ssl_ad.config_defaults import base_config, mae_block


def get_config():
    c = base_config()
    c.method = "mae"
    c.total_steps = 600
    c.batch_size = 128
    c.checkpoint_every = 200
    c.log_every = 20
    c.model.image_size = 28
    c.model.variant = "mu/4"  # width 96, depth 4, 3 heads, 4x4 patches
    c.model.posemb = "sincos"
    c.data.name = "mnist5k"
    c.data.hflip = False  # digits are not mirror-symmetric
    c.data.crop_scale = (0.35, 1.0)
    c.data.mean = (0.1307,) * 3
    c.data.std = (0.3081,) * 3
    c.optim.base_lr = 1.5e-3
    c.optim.warmup_steps = 50
    c.mae = mae_block()
    c.mae.decoder_width = 64
    c.mae.decoder_depth = 1
    c.mae.decoder_heads = 4
    # Train without the validation images ('train:val', 10 % per class) and log the AD monitor's
    # kNN AUROC on them every 200 steps (metrics.jsonl val_auroc/*, TensorBoard).
    c.data.train_split = "train:fit"
    c.monitor.every_steps = 200
    return c
