"""Defaults shared by every training config, so the common keys mean the same everywhere.

Each ``configs/*.py`` starts from :func:`base_config` and changes what its
experiment needs. Keys: total_steps, batch_size (global), seed,
checkpoint_every, log_every, keep_checkpoints, model.*, data.*, optim.*, and
the method's own block (mae.* or dino.*).
"""

from __future__ import annotations

import contextlib

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

    # Anomaly-detection monitor (ssl_ad.evaluation.monitor): kNN AUROC on the validation split
    # ('<train split>:val', data.val_fraction of it) every every_steps steps and at the end,
    # logged to metrics.jsonl as val_auroc/<protocol>. 0 = off.
    c.monitor = ml_collections.ConfigDict()
    c.monitor.every_steps = 0
    c.monitor.protocols = ("one_class", "leave_one_class_out")
    c.monitor.max_bank = 2000  # training images the kNN is fit on (stratified, fixed); 0 = all
    c.monitor.pooling = "cls"
    c.monitor.k = 2  # the evaluation defaults: cosine kNN, k=2, PCA to 100 dims
    c.monitor.metric = "cosine"
    c.monitor.pca_dims = 100
    c.monitor.batch_size = 256

    c.model = ml_collections.ConfigDict()
    # big_vision-style size name, e.g. 'S/16' (width 384, depth 12, 6 heads, MLP ratio 4, patch 16)
    # or 'S' (patch_size kept); '' = the explicit keys below. Resolved into width/depth/num_heads/
    # mlp_ratio/patch_size when the config is validated; a key set to a value other than both its
    # default here and the variant's is an error (ssl_ad.models.variants.apply_variant).
    c.model.variant = ""
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
    # Run the encoder's blocks as one nn.scan loop (big_vision's scan=True): compile time stays flat
    # in depth. Parameters are stacked under 'blocks' (leading layer axis) instead of block0..block{d-1};
    # ssl_ad.models.layouts converts between the layouts. Saved configs without the key: False.
    c.model.scan_blocks = False
    c.model.dtype = "float32"
    # Follow the PyTorch reference of the training method (see ssl_ad.models.vit); the values
    # ssl_ad used before these keys existed are in LEGACY_MODEL_KEYS.
    c.model.init = "reference"  # 'reference' (the method's rule) | 'dino' | 'mae' | 'xavier_legacy'
    c.model.posemb_interpolation = "torch_bicubic"  # other crop sizes: DINO's rule | 'antialiased'
    c.model.cls_pos = "reference"  # learned for posemb='learned' (DINO), zero for 'sincos' (MAE) | 'learned' | 'zero'

    c.data = ml_collections.ConfigDict()
    c.data.name = "mnist5k"
    c.data.data_dir = ""
    c.data.train_split = "train"
    c.data.download = False
    c.data.max_per_class = 0
    c.data.load_size = 0  # make images load_size x load_size on load, by resize_mode (0 = native size)
    # 'crop' (shorter side to load_size, centre square kept; warns when > 20 % of an image is lost) |
    # 'pad' (longer side to load_size, letterboxed on black) | 'stretch' (aspect ratio ignored)
    c.data.resize_mode = "crop"
    # Pillow's decompression-bomb limit while decoding (PIL.Image.MAX_IMAGE_PIXELS: refuses images over
    # twice it); Pillow's default, 0 = no limit
    c.data.max_image_pixels = 89_478_485
    c.data.augment = "single"
    c.data.crop_scale = (0.2, 1.0)
    # RandomResizedCrop as the reference code (torchvision, used by DINO and MAE) does it:
    # 'torchvision' (area uniform in the scale range, log-uniform aspect ratio, 10 tries, centre-crop
    # fallback) or 'tf_bounding_box' (ssl_ad's earlier tf.image.sample_distorted_bounding_box sampler).
    c.data.crop_sampler = "torchvision"
    # Bicubic resize of the crops with antialiasing (as PIL's, used by the reference code); False =
    # ssl_ad's earlier non-antialiased tf bicubic.
    c.data.resize_antialias = True
    c.data.hflip = True
    c.data.mean = IMAGENET_MEAN
    c.data.std = IMAGENET_STD
    # Where the augmentation recipe runs: False = in tf.data on the host's cores; True = the host only
    # gathers uint8 images and a jitted function makes the crops on the device (ssl_ad.data.device_augment).
    c.data.augment_device = False
    c.data.threads = 0
    # '<split>:val' is this fraction of '<split>' (per class, fixed seed 0) and '<split>:fit' the
    # rest: train on 'train:fit', tune on 'train:val', never on the test split.
    c.data.val_fraction = 0.1

    c.optim = ml_collections.ConfigDict()
    c.optim.base_lr = 1.5e-4  # lr = base_lr * batch_size / 256
    c.optim.min_lr = 0.0
    c.optim.warmup_steps = 100
    c.optim.b1 = 0.9
    c.optim.b2 = 0.95
    c.optim.weight_decay = 0.05
    c.optim.weight_decay_end = 0.05  # cosine from weight_decay to this
    c.optim.clip_norm = 0.0  # 0 = no clipping
    # 'reference': as the method's original (DINO utils.clip_gradients clips each tensor's norm,
    # MAE's clip_grad_norm_ the global norm) | 'per_tensor' | 'global'
    c.optim.clip_mode = "reference"
    # Parameter paths containing any of these get no weight decay, besides the reference rule's
    # biases and 1-d parameters (which DINO and MAE both exempt). () = the reference: position
    # embedding, CLS and mask tokens are decayed; ssl_ad's former rule was
    # ("pos_embed", "cls_token", "cls_pos", "mask_token").
    c.optim.weight_decay_exclude = ()
    c.optim.freeze_patterns = ()  # parameter paths containing any of these ...
    # ... get no update, no weight decay and no Adam moment/count update for this many steps
    # (DINO's cancel_gradients_last_layer: PyTorch AdamW skips parameters whose grad is None)
    c.optim.freeze_steps = 0
    return c


# What a model block saved before ``model.init``/``posemb_interpolation``/``cls_pos``/``scan_blocks``
# existed meant: one xavier rule for both methods, antialiased jax.image.resize, a learned cls_pos
# parameter, unrolled blocks (block0..block{depth-1}).
LEGACY_MODEL_KEYS = {
    "init": "xavier_legacy", "posemb_interpolation": "antialiased", "cls_pos": "learned", "scan_blocks": False,
}


def fill_legacy_model_keys(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Adds LEGACY_MODEL_KEYS missing from a saved config's ``model`` block (in place; returns it),
    so checkpoints written before those keys rebuild the model they were trained with."""
    model = config.get("model")
    if model is not None:
        with model.unlocked() if hasattr(model, "unlocked") else contextlib.nullcontext():
            for key, value in LEGACY_MODEL_KEYS.items():
                if key not in model:
                    model[key] = value
    return config


def mae_block() -> ml_collections.ConfigDict:
    m = ml_collections.ConfigDict()
    m.mask_ratio = 0.75
    m.norm_pix_loss = True
    m.decoder_width = 128
    m.decoder_depth = 2
    m.decoder_heads = 4
    return m


def eval_config() -> ml_collections.ConfigDict:
    """Defaults of every evaluation config (see configs/eval_mnist5k.py).

    List-valued keys (checkpoint, sources, pooling, protocols, scorers, pixel_maps) are tuples of
    strings (see :mod:`ssl_ad.config_lists`); the top level is not type-safe so that a config file
    written for the former comma-string form (``c.scorers = "knn,gmm"``) still loads (deprecated;
    every value is checked by :func:`ssl_ad.config_check.validate_eval_config`).
    """
    c = ml_collections.ConfigDict(type_safe=False)
    c.checkpoint = ()  # training workdirs; each becomes a feature source
    c.step = -1  # checkpoint step (-1 = latest)
    c.which = "teacher"  # DINO encoder to embed with: 'teacher' or 'student'
    c.sources = ("pixels", "random_init")  # baselines evaluated beside the checkpoints
    c.pooling = ("cls",)  # each of 'cls', 'mean', 'cls+mean' (several: compared side by side)
    c.l2_normalize = False
    c.batch_size = 256
    c.seed = 0
    # 'leave_one_class_out', 'one_class', 'good_vs_defect' (class normal_class normal, the rest,
    # test-only classes too, anomalous), 'mvtec', 'mvtec_study'; unscoreable rounds are skipped.
    c.protocols = ("leave_one_class_out", "one_class")
    c.normal_class = "good"  # the normal class of 'good_vs_defect'
    c.scorers = ("knn", "mahalanobis", "kmeans", "gmm_kmeans", "gmm", "mae_recon")
    c.pca_dims = 100  # PCA (fit on each round's training normals) before every feature scorer; 0 = none
    # Residual norm (distance from the PCA subspace) kept as one more dimension: 'auto' = when a
    # round's normals are too few (pca_dims >= n - 1), 'always', or 'never' (plain PCA).
    c.pca_residual = "auto"
    c.max_train_per_round = 0  # 0 = all training normals
    c.roc_scorer = "knn"  # ROC-curve plots are drawn for this scorer (and for mae_recon)
    c.tsne_points = 1000  # 0 = no t-SNE maps

    c.scorer_args = ml_collections.ConfigDict()
    c.scorer_args.knn = ml_collections.ConfigDict({"k": 2, "metric": "cosine"})
    c.scorer_args.mahalanobis = ml_collections.ConfigDict({"shrinkage": "ledoit_wolf"})
    # n_init=1: sklearn's own default for k-means++ ('auto'); the elbow fits 10 models per round, on a
    # seeded subsample of at most elbow_samples normals (0 = all), then one model at the chosen k on all.
    c.scorer_args.kmeans = ml_collections.ConfigDict({"k_range": (1, 10), "n_init": 1, "elbow_samples": 10000})
    c.scorer_args.gmm_kmeans = ml_collections.ConfigDict(
        {"k_range": (1, 10), "drop_fraction": 0.06, "n_init": 1, "elbow_samples": 10000})
    c.scorer_args.gmm = ml_collections.ConfigDict(
        {"k_range": (1, 10), "covariance_type": "full", "n_init": 1, "elbow_samples": 10000})
    c.scorer_args.mae_recon = ml_collections.ConfigDict({"normalize": True})
    c.mae_recon = ml_collections.ConfigDict({"num_masks": 8})
    # Pixel-level anomaly maps (test splits with masks, e.g. MVTec AD): any of 'patch_knn'
    # (patch-token kNN to the round's training tokens) and 'mae_recon'; () = none.
    c.pixel_maps = ()
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
    c.data.resize_mode = "crop"  # 'crop' | 'pad' | 'stretch' (see base_config)
    c.data.max_image_pixels = 89_478_485  # Pillow's decompression-bomb limit (see base_config); 0 = none
    c.data.mean = IMAGENET_MEAN
    c.data.std = IMAGENET_STD
    c.data.val_fraction = 0.1  # for the splits '<split>:val' / '<split>:fit' (see base_config)

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
    d.pooling = "cls"  # backbone output fed to the head: 'cls', 'mean' (of patch tokens) or 'cls+mean' (both)
    d.student_temp = 0.1
    d.teacher_temp = 0.07  # reached after the warm-up, then constant
    d.warmup_teacher_temp = 0.04  # linear from this ...
    d.warmup_teacher_temp_steps = 0  # ... over this many steps (0 = teacher_temp throughout)
    d.momentum_teacher = 0.996  # EMA momentum, cosine to 1.0 over total_steps
    d.center_momentum = 0.9
    # Options from DINO's successors (ssl_ad.methods.dino), off by default (= DINO as published):
    # KoLeo regulariser on the student's pooled features of each global crop (DINOv2: 0.1).
    d.koleo_loss_weight = 0.0
    # Teacher targets: 'centering' (DINO's EMA centre) | 'sinkhorn_knopp' (DINOv2/SwAV, ...
    d.centering = "centering"
    d.sinkhorn_iterations = 3  # ... with this many iterations, DINOv2's default)
    # iBOT masked-patch self-distillation (Zhou et al., 2022): its weight lambda2 (iBOT: 1.0) ...
    d.ibot_loss_weight = 0.0
    d.ibot_mask_ratio = 0.3  # ... fraction of a global crop's patches masked (iBOT pred_ratio) ...
    d.ibot_mask_shape = "rand"  # ... uniformly at random (iBOT pred_shape='rand'; its default 'block' is not implemented)
    d.ibot_teacher_temp = 0.07  # ... patch teacher temperature (iBOT teacher_patch_temp), reached ...
    d.ibot_warmup_teacher_temp = 0.04  # ... linearly from this over warmup_teacher_temp_steps (warmup_teacher_patch_temp)
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
    # 'torchvision' (ColorJitter: multiplicative brightness, grayscale-mean contrast, random order
    # of the four, clamp after each) or 'additive_brightness' (ssl_ad's earlier tf.image jitter).
    data.color_jitter_impl = "torchvision"
    data.grayscale_p = 0.2
    data.blur_sigma = (0.1, 2.0)
    data.hflip = True
    return data


def predict_config() -> ml_collections.ConfigDict:
    """Defaults of predict.py (scoring new images; see ssl_ad.evaluation.predict): the evaluation's
    scorer settings (scorer_args, pca_dims, pca_residual, pooling, which, batch_size, seed, pixel)
    plus what to read and how to decide."""
    e = eval_config()
    c = ml_collections.ConfigDict()
    c.checkpoint = ""  # one training workdir; '' = raw pixels (made pixel_size square)
    c.step = -1
    c.which = e.which
    c.pooling = "cls"
    c.normal_dir = ""  # a folder (searched recursively) or glob of normal images the scorer is fit on
    c.images = ""  # a folder or glob of the new images to score
    c.resize_mode = "crop"  # how non-square images are made square: 'crop' | 'pad' | 'stretch'
    c.pixel_size = 28  # raw-pixel features only
    c.scorer = "knn"  # any feature scorer (knn, mahalanobis, kmeans, gmm_kmeans, gmm)
    c.fpr = 0.05  # the threshold calls this fraction of normal images anomalous (out-of-fold scores)
    c.folds = 5  # cross-fitting folds for the threshold
    c.overlays = 8  # heat-map overlays of the highest-scoring new images (ViT checkpoints; 0 = none)
    c.batch_size = e.batch_size
    c.seed = e.seed
    c.pca_dims = e.pca_dims
    c.pca_residual = e.pca_residual
    c.scorer_args = e.scorer_args
    c.pixel = e.pixel
    return c
