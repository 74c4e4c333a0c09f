"""MAE ViT-Ti/4 on CIFAR-10 at 32 px (for an accelerator; needs cifar10 prepared in data.data_dir)."""

from ssl_ad.config_defaults import base_config, mae_block


def get_config():
    c = base_config()
    c.method = "mae"
    c.total_steps = 50_000  # 512 epochs of the 50,000 training images at batch 512
    c.batch_size = 512
    c.checkpoint_every = 2000
    c.log_every = 100
    c.model.image_size = 32
    c.model.variant = "Ti/4"  # width 192, depth 12, 3 heads, 4x4 patches
    c.model.posemb = "sincos"
    c.data.name = "cifar10"
    c.data.crop_scale = (0.2, 1.0)
    c.data.hflip = True
    c.data.mean = (0.4914, 0.4822, 0.4465)
    c.data.std = (0.2470, 0.2435, 0.2616)
    c.optim.base_lr = 1.5e-4
    c.optim.warmup_steps = 2500
    c.mae = mae_block()
    c.mae.decoder_width = 128
    c.mae.decoder_depth = 4
    c.mae.decoder_heads = 4
    return c
