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
