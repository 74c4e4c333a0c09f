"""The demo: a small DINO on the embedded mnist5k digits, a few minutes on 2 CPU cores.

ViT-mu/4 (width 96, depth 4, 3 heads) at 28 px; 2 global 28 px crops + 4 local 16 px crops.
"""

from ssl_ad.config_defaults import base_config, dino_block, multicrop_data

TRAIN_IMAGES = 4000  # mnist5k train split
BATCH = 64
EPOCH = TRAIN_IMAGES // BATCH  # 62 steps


def get_config():
    c = base_config()
    c.method = "dino"
    c.total_steps = 400
    c.batch_size = BATCH
    c.checkpoint_every = 200
    c.log_every = 20
    c.model.image_size = 28
    c.model.patch_size = 4
    c.model.width, c.model.depth, c.model.num_heads = 96, 4, 3
    c.model.posemb = "learned"
    c.model.drop_path_rate = 0.0

    c.data.name = "mnist5k"
    multicrop_data(c.data)
    c.data.global_size = 28
    c.data.global_scale = (0.4, 1.0)
    c.data.local_size = 16
    c.data.local_scale = (0.1, 0.4)
    c.data.num_local = 4
    c.data.hflip = False  # digits are not mirror-symmetric
    # Grey digits: only brightness/contrast act (saturation and hue leave grey pixels grey;
    # kept at the paper's values because augment.color_jitter rejects a zero saturation range).
    c.data.color_jitter_p = 0.8
    c.data.color_jitter = (0.4, 0.4, 0.2, 0.1)
    c.data.grayscale_p = 0.0
    c.data.blur_sigma = (0.1, 1.0)  # pixels, for 28 px digits
    c.data.global_blur = (0.0, 0.0)  # no blur: 28 px digits are already soft
    c.data.local_blur = 0.0
    c.data.solarize_p = 0.2
    c.data.mean = (0.1307,) * 3
    c.data.std = (0.3081,) * 3

    c.optim.base_lr = 5e-4  # lr = 5e-4 * 64 / 256
    c.optim.min_lr = 1e-6
    c.optim.warmup_steps = EPOCH
    c.optim.b1, c.optim.b2 = 0.9, 0.999
    c.optim.weight_decay, c.optim.weight_decay_end = 0.04, 0.4
    c.optim.clip_norm = 3.0
    c.optim.freeze_patterns = ("last_layer",)
    c.optim.freeze_steps = EPOCH  # last layer frozen for the first epoch

    c.dino = dino_block()
    c.dino.out_dim = 1024
    c.dino.hidden_dim = 256
    c.dino.bottleneck_dim = 64
    c.dino.warmup_teacher_temp = 0.04
    c.dino.teacher_temp = 0.07
    c.dino.warmup_teacher_temp_steps = 2 * EPOCH
    c.dino.momentum_teacher = 0.996
    return c
