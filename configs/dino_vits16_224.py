"""The DINO paper's ViT-S/16 recipe at 224 px (Caron et al., 2021): 100 epochs, batch 1024.

2 x 224 global crops (scale 0.4-1) + 8 x 96 local crops (0.05-0.4), out_dim 65536, lr 5e-4 x bs/256
with 10 warm-up epochs, teacher temperature 0.04 -> 0.07 over 30 epochs, momentum 0.996 -> 1,
weight decay 0.04 -> 0.4, clipping 3.0, last layer frozen for the first epoch, drop path 0.1.
Point data.data_dir at an image-folder tree (root/train/<class>/*); the split is held in host
memory at data.load_size (see configs/mae_vitb16_224.py for the limit that implies).
"""

from ssl_ad.config_defaults import base_config, dino_block, multicrop_data

IMAGES = 1_281_167
BATCH = 1024
EPOCH = IMAGES // BATCH
EPOCHS = 100


def get_config():
    c = base_config()
    c.method = "dino"
    c.batch_size = BATCH
    c.total_steps = EPOCHS * EPOCH
    c.checkpoint_every = 2 * EPOCH
    c.log_every = 100
    c.model.image_size = 224
    c.model.patch_size = 16
    c.model.width, c.model.depth, c.model.num_heads = 384, 12, 6  # ViT-S
    c.model.drop_path_rate = 0.1
    c.model.dtype = "bfloat16"

    c.data.name = "image_folder"
    c.data.data_dir = ""  # set to the image-folder root
    c.data.load_size = 256
    multicrop_data(c.data)

    c.optim.base_lr = 5e-4
    c.optim.min_lr = 1e-6
    c.optim.warmup_steps = 10 * EPOCH
    c.optim.b1, c.optim.b2 = 0.9, 0.999
    c.optim.weight_decay, c.optim.weight_decay_end = 0.04, 0.4
    c.optim.clip_norm = 3.0
    c.optim.freeze_patterns = ("last_layer",)
    c.optim.freeze_steps = EPOCH

    c.dino = dino_block()
    c.dino.warmup_teacher_temp_steps = 30 * EPOCH
    return c
