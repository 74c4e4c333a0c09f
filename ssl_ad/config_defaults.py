"""Defaults shared by every training config, so the common keys mean the same everywhere.

Each ``configs/*.py`` starts from :func:`base_config` and changes what its
experiment needs. Keys: total_steps, batch_size (global), seed,
checkpoint_every, log_every, keep_checkpoints, model.*, data.*, optim.*, and
the method's own block (mae.* or dino.*).
"""

from __future__ import annotations

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.method = "mae"
    c.seed = 0
    c.total_steps = 1000
    c.batch_size = 128
    c.checkpoint_every = 500
    c.log_every = 50
    c.keep_checkpoints = 3
    # Testing aid: make the loss NaN from this step on (-1 = off); proves divergence handling.
    c.inject_nan_at_step = -1

    c.model = ml_collections.ConfigDict()
    c.model.image_size = 32
    c.model.patch_size = 4
    c.model.width = 192
    c.model.depth = 12
    c.model.num_heads = 3
    c.model.mlp_ratio = 4.0
    c.model.use_cls = True
    c.model.posemb = "learned"
    c.model.drop_path_rate = 0.0
    c.model.remat = False
    c.model.dtype = "float32"

    c.data = ml_collections.ConfigDict()
    c.data.name = "mnist5k"
    c.data.data_dir = ""
    c.data.train_split = "train"
    c.data.download = False
    c.data.max_per_class = 0
    c.data.load_size = 0  # resize+centre-crop images to this side on load (0 = native size)
    c.data.augment = "single"
    c.data.crop_scale = (0.2, 1.0)
    c.data.hflip = True
    c.data.mean = IMAGENET_MEAN
    c.data.std = IMAGENET_STD
    c.data.threads = 0

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 1.5e-4  # lr = base_lr * batch_size / 256
    c.optim.min_lr = 0.0
    c.optim.warmup_steps = 100
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.05
    c.optim.weight_decay_end = 0.05  # cosine from weight_decay to this
    c.optim.clip_norm = 0.0  # 0 = no clipping
    c.optim.freeze_patterns = ()  # parameter paths containing any of these ...
    c.optim.freeze_steps = 0  # ... get no update for this many steps
    return c


def mae_block() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.mask_ratio = 0.75
    m.norm_pix_loss = True
    m.decoder_width = 128
    m.decoder_depth = 2
    m.decoder_heads = 4
    return m


def eval_config() -> ml_collections.ConfigDict:
    """Defaults of every evaluation config (see configs/eval_mnist5k.py)."""
    c = ml_collections.ConfigDict()
    c.checkpoint = ""  # comma-separated training workdirs; each becomes a feature source
    c.step = -1  # checkpoint step (-1 = latest)
    c.which = "teacher"  # DINO encoder to embed with: 'teacher' or 'student'
    c.sources = "pixels,random_init"  # baselines evaluated beside the checkpoints
    c.pooling = "cls"  # 'cls', 'mean', 'cls+mean', or a comma list to compare poolings
    c.l2_normalize = False
    c.batch_size = 256
    c.seed = 0
    c.protocols = "leave_one_class_out,one_class"
    c.scorers = "knn,mahalanobis,kmeans,gmm_kmeans,gmm,mae_recon"
    c.pca_dims = 100  # PCA (fit on each round's training normals) before every feature scorer; 0 = none
    c.max_train_per_round = 0  # 0 = all training normals
    c.roc_scorer = "knn"  # ROC-curve plots are drawn for this scorer (and for mae_recon)
    c.tsne_points = 1000  # 0 = no t-SNE maps

    c.scorer_args = ml_collections.ConfigDict()
    c.scorer_args.knn = ml_collections.ConfigDict({"k": 2, "metric": "cosine"})
    c.scorer_args.mahalanobis = ml_collections.ConfigDict({"shrinkage": "ledoit_wolf"})
    # n_init=1: sklearn's own default for k-means++ ('auto'); the elbow fits 10 models per round.
    c.scorer_args.kmeans = ml_collections.ConfigDict({"k_range": (1, 10), "n_init": 1})
    c.scorer_args.gmm_kmeans = ml_collections.ConfigDict({"k_range": (1, 10), "drop_fraction": 0.06, "n_init": 1})
    c.scorer_args.gmm = ml_collections.ConfigDict({"k_range": (1, 10), "covariance_type": "full", "n_init": 1})
    c.scorer_args.mae_recon = ml_collections.ConfigDict({"normalize": True})
    c.mae_recon = ml_collections.ConfigDict({"num_masks": 8})
    # Pixel-level anomaly maps (test splits with masks, e.g. MVTec AD): comma list of
    # 'patch_knn' (patch-token kNN to the round's training tokens) and 'mae_recon'; '' = none.
    c.pixel_maps = ""
    c.pixel = ml_collections.ConfigDict()
    c.pixel.k = 1  # nearest bank tokens averaged per test patch token
    c.pixel.max_bank = 20000  # memory-bank tokens (seeded subsample when a round has more; 0 = all)
    c.pixel.metric = "l2"  # 'l2' or 'cosine'
    c.pixel.sigma = 4.0  # Gaussian smoothing of the upsampled maps, in mask pixels (0 = none)
    c.pixel.max_fpr = 0.3  # PRO is integrated over FPR in [0, max_fpr]
    c.pixel.overlays = 4  # overlay figures: test images shown per round (0 = none)

    c.data = ml_collections.ConfigDict()
    c.data.name = "mnist5k"
    c.data.data_dir = ""
    c.data.train_split = "train"
    c.data.test_split = "test"
    c.data.download = False
    c.data.max_per_class = 0
    c.data.load_size = 0
    c.data.mean = IMAGENET_MEAN
    c.data.std = IMAGENET_STD

    c.model = base_config().model
    return c


def dino_block() -> ml_collections.ConfigDict:
    """DINO's own keys (defaults of the paper's ViT-S/16 run, Caron et al., 2021)."""
    d = ml_collections.ConfigDict()
    d.out_dim = 65536  # K, prototypes of the last layer
    d.hidden_dim = 2048
    d.bottleneck_dim = 256
    d.num_layers = 3  # Dense layers before the L2-normalised bottleneck
    d.norm_last_layer = True  # weight-norm scale g fixed at 1
    d.pooling = "cls"  # backbone output fed to the head: 'cls' or 'mean' (of patch tokens)
    d.student_temp = 0.1
    d.teacher_temp = 0.07  # reached after the warm-up, then constant
    d.warmup_teacher_temp = 0.04  # linear from this ...
    d.warmup_teacher_temp_steps = 0  # ... over this many steps (0 = teacher_temp throughout)
    d.momentum_teacher = 0.996  # EMA momentum, cosine to 1.0 over total_steps
    d.center_momentum = 0.9
    return d


def multicrop_data(data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds DINO's multi-crop augmentation keys (the paper's values) to a ``config.data`` block."""
    data.augment = "multicrop"
    data.global_size = 224
    data.global_scale = (0.4, 1.0)
    data.local_size = 96
    data.local_scale = (0.05, 0.4)
    data.num_local = 8
    data.global_blur = (1.0, 0.1)  # blur probability of global view 1 / view 2
    data.local_blur = 0.5
    data.solarize_p = 0.2  # global view 2 only
    data.color_jitter_p = 0.8
    data.color_jitter = (0.4, 0.4, 0.2, 0.1)  # brightness, contrast, saturation, hue
    data.grayscale_p = 0.2
    data.blur_sigma = (0.1, 2.0)
    data.hflip = True
    return data
