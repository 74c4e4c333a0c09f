"""The MAE paper's ViT-B/16 pretraining recipe at 224 px (He et al., 2022, Table 8).

800 epochs at batch 4096: point data.data_dir at an ImageNet-style tree (root/train/<class>/*).
Limitation: the training pipeline holds the decoded split in host memory (uint8 at
data.load_size), which suits the study's data sets (CIFAR-10, COCO subsets, MVTec AD) and
ImageNet-100-sized folders (~19 GB at 224 px), not all of ImageNet-1k.
"""

from ssl_ad.config_defaults import base_config, mae_block

IMAGES = 1_281_167
EPOCHS = 800
BATCH = 4096


def get_config():
    c = base_config()
    c.method = "mae"
    c.batch_size = BATCH
    c.total_steps = EPOCHS * IMAGES // BATCH
    c.checkpoint_every = 5000
    c.log_every = 100
    c.model.image_size = 224
    c.model.variant = "B/16"  # width 768, depth 12, 12 heads, 16x16 patches
    c.model.posemb = "sincos"
    c.model.dtype = "bfloat16"
    c.data.name = "image_folder"
    c.data.data_dir = ""  # set to the ImageNet root
    c.data.load_size = 256
    c.data.crop_scale = (0.2, 1.0)
    c.data.hflip = True
    c.optim.base_lr = 1.5e-4  # lr = 1.5e-4 * 4096 / 256 = 2.4e-3
    c.optim.warmup_steps = 40 * IMAGES // BATCH
    c.optim.b1, c.optim.b2 = 0.9, 0.95
    c.optim.weight_decay = c.optim.weight_decay_end = 0.05
    c.mae = mae_block()
    c.mae.mask_ratio = 0.75
    c.mae.norm_pix_loss = True
    c.mae.decoder_width = 512
    c.mae.decoder_depth = 8
    c.mae.decoder_heads = 16
    return c
