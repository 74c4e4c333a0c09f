"""DINO ViT-Ti/4 on CIFAR-10 at 32 px (for an accelerator; needs cifar10 prepared in data.data_dir).

Same backbone as configs/mae_cifar10.py, so the two methods compare on equal terms.
2 global 32 px crops + 6 local 16 px crops; no Gaussian blur (at 32 px it erases most of the
image, as SimCLR's CIFAR recipe found); otherwise the paper's recipe scaled to 200 epochs.
"""

from ssl_ad.config_defaults import base_config, dino_block, multicrop_data

IMAGES = 50_000
BATCH = 512
EPOCH = IMAGES // BATCH  # 97 steps
EPOCHS = 200


def get_config():
    c = base_config()
    c.method = "dino"
    c.batch_size = BATCH
    c.total_steps = EPOCHS * EPOCH
    c.checkpoint_every = 2000
    c.log_every = 100
    c.model.image_size = 32
    c.model.variant = "Ti/4"  # width 192, depth 12, 3 heads, 4x4 patches
    c.model.posemb = "learned"
    c.model.drop_path_rate = 0.1

    c.data.name = "cifar10"
    multicrop_data(c.data)
    c.data.global_size = 32
    c.data.global_scale = (0.4, 1.0)
    c.data.local_size = 16
    c.data.local_scale = (0.05, 0.4)
    c.data.num_local = 6
    c.data.global_blur = (0.0, 0.0)
    c.data.local_blur = 0.0
    c.data.hflip = True
    c.data.mean = (0.4914, 0.4822, 0.4465)
    c.data.std = (0.2470, 0.2435, 0.2616)

    c.optim.base_lr = 5e-4  # lr = 5e-4 * 512 / 256 = 1e-3
    c.optim.min_lr = 1e-6
    c.optim.warmup_steps = 10 * EPOCH
    c.optim.b1, c.optim.b2 = 0.9, 0.999
    c.optim.weight_decay, c.optim.weight_decay_end = 0.04, 0.4
    c.optim.clip_norm = 3.0
    c.optim.freeze_patterns = ("last_layer",)
    c.optim.freeze_steps = EPOCH

    c.dino = dino_block()
    c.dino.out_dim = 16384
    c.dino.warmup_teacher_temp = 0.04
    c.dino.teacher_temp = 0.07
    c.dino.warmup_teacher_temp_steps = 30 * EPOCH
    c.dino.momentum_teacher = 0.996
    return c
