"""The DINO paper's ViT-S/16 pretraining recipe at 224 px (Caron et al., 2021), 100 epochs.

Batch 1024, lr 0.0005 * 1024 / 256 with a 10-epoch warm-up then cosine to 1e-6, AdamW with
weight decay 0.04 -> 0.4 (cosine), clipping 3.0, last layer frozen for the first epoch, drop
path 0.1; 2 global 224 px crops (scale 0.4-1) + 8 local 96 px crops (scale 0.05-0.4);
head 2048-2048-256 -> 65536; teacher temperature 0.04 -> 0.07 over 30 epochs; teacher momentum
0.996 -> 1 (cosine); centre momentum 0.9.
Point data.data_dir at an ImageNet-style tree (root/train/<class>/*). The training pipeline
holds the decoded split in host memory at data.load_size (see configs/mae_vitb16_224.py).
Differences from the PyTorch original: gradients are clipped by their global norm rather
than per parameter tensor, and bfloat16 replaces float16 autocast.
"""

from ssl_ad.config_defaults import base_config, dino_block, multicrop_data

IMAGES = 1_281_167
BATCH = 1024
EPOCH = IMAGES // BATCH  # 1251 steps
EPOCHS = 100


def get_config():
    c = base_config()
    c.method = "dino"
    c.batch_size = BATCH
    c.total_steps = EPOCHS * EPOCH
    c.checkpoint_every = 5000
    c.log_every = 100
    c.model.image_size = 224
    c.model.variant = "S/16"  # width 384, depth 12, 6 heads, 16x16 patches
    c.model.posemb = "learned"
    c.model.drop_path_rate = 0.1
    c.model.dtype = "bfloat16"

    c.data.name = "image_folder"
    c.data.data_dir = ""  # set to the ImageNet root
    c.data.load_size = 256
    multicrop_data(c.data)  # the paper's multi-crop values: 2x224 (0.4, 1) + 8x96 (0.05, 0.4)

    c.optim.base_lr = 5e-4  # lr = 5e-4 * 1024 / 256 = 2e-3
    c.optim.min_lr = 1e-6
    c.optim.warmup_steps = 10 * EPOCH
    c.optim.b1, c.optim.b2 = 0.9, 0.999
    c.optim.weight_decay, c.optim.weight_decay_end = 0.04, 0.4
    c.optim.clip_norm = 3.0
    c.optim.freeze_patterns = ("last_layer",)
    c.optim.freeze_steps = EPOCH

    c.dino = dino_block()  # out_dim 65536, hidden 2048, bottleneck 256, 3 layers, norm_last_layer
    c.dino.warmup_teacher_temp = 0.04
    c.dino.teacher_temp = 0.07
    c.dino.warmup_teacher_temp_steps = 30 * EPOCH
    c.dino.momentum_teacher = 0.996
    c.dino.center_momentum = 0.9
    return c
