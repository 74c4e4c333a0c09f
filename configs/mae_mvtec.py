"""MAE ViT-S/16 on MVTec AD train/good images (accelerator; the CPU demo is mae_mnist5k).

  python train.py --config=configs/mae_mvtec.py --workdir=runs/mae_mvtec \
      --config.data.mvtec_root=/data/mvtec_anomaly_detection [--config.data.category=bottle]

The first run prepares the chosen categories offline from ``mvtec_root`` into
``data.data_dir`` (tfds); later runs need only ``data_dir``. ``category='all'``
trains on the good images of every category found.
"""

from ssl_ad.config_defaults import base_config, mae_block


def get_config():
    c = base_config()
    c.method = "mae"
    c.total_steps = 10_000  # ~700 epochs of the 3,629 train/good images of all 15 categories
    c.batch_size = 256
    c.checkpoint_every = 1000
    c.log_every = 50
    c.model.image_size = 224
    c.model.variant = "S/16"  # width 384, depth 12, 6 heads, 16x16 patches
    c.model.posemb = "sincos"
    c.data.name = "mvtec_ad"
    c.data.category = "all"  # one of the 15 category names, or 'all'
    c.data.mvtec_root = ""  # the extracted archive: <root>/<category>/{train,test,ground_truth}
    c.data.load_size = 256  # stored size (shorter side, centre square); crops are taken from it
    c.data.hflip = False  # some defects are orientation changes (metal_nut 'flip', transistor 'misplaced')
    c.data.crop_scale = (0.2, 1.0)
    c.optim.base_lr = 1.5e-4
    c.optim.warmup_steps = 500
    c.mae = mae_block()
    c.mae.decoder_width = 256
    c.mae.decoder_depth = 4
    c.mae.decoder_heads = 8
    return c
