"""MAE ViT-S/16 on a user's image folder (accelerator; the CPU demo is mae_mnist5k).

  python train.py --config=configs/mae_image_folder.py --workdir=runs/mae_folder \
      --config.data.data_dir=/data/my_images

``data_dir`` holds ``<split>/<class>/*.{png,jpg,jpeg,bmp}``, or ``<class>/*`` which is
split deterministically (``data.test_fraction`` per class to 'test').
"""

from ssl_ad.config_defaults import base_config, mae_block


def get_config():
    c = base_config()
    c.method = "mae"
    c.total_steps = 20_000
    c.batch_size = 256
    c.checkpoint_every = 1000
    c.log_every = 50
    c.model.image_size = 224
    c.model.variant = "S/16"  # width 384, depth 12, 6 heads, 16x16 patches
    c.model.posemb = "sincos"
    c.data.name = "image_folder"
    c.data.data_dir = ""  # required: the folder root
    c.data.load_size = 256  # shorter side resized to this, centre square cropped; 0 = native (one size)
    c.data.test_fraction = 0.2  # only used when the folder has no split sub-folders
    c.data.crop_scale = (0.2, 1.0)
    c.optim.base_lr = 1.5e-4
    c.optim.warmup_steps = 1000
    c.mae = mae_block()
    c.mae.decoder_width = 256
    c.mae.decoder_depth = 4
    c.mae.decoder_heads = 8
    return c
