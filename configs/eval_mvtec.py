"""Anomaly detection and localisation on MVTec AD: image AUROC per category, pixel AUROC and PRO.

  python evaluate.py --config=configs/eval_mvtec.py --config.checkpoint=runs/mae_mvtec \
      --config.data.mvtec_root=/data/mvtec_anomaly_detection --outdir=reports/mvtec

Protocol 'mvtec' (standard): one round per category, fit on its train/good
images, tested on its test images. 'mvtec_study' (the original study's, add it
to ``protocols`` to compare): fit on every category's train/good images, round
c tests all good test images plus category c's defects. Images are loaded at
``data.load_size`` (the masks' resolution, where pixel metrics are computed)
and resized to the checkpoint's model.image_size for the network.
"""

from ssl_ad.config_defaults import eval_config


def get_config():
    c = eval_config()
    c.data.name = "mvtec_ad"
    c.data.category = "all"  # one of the 15 category names, or 'all'
    c.data.mvtec_root = ""  # the extracted archive; not needed once prepared in data.data_dir
    c.data.load_size = 256
    c.protocols = ("mvtec",)
    c.scorers = ("knn", "mahalanobis")
    c.pixel_maps = ("patch_knn", "mae_recon")
    c.pca_dims = 100
    # Used for the random-init baseline when no checkpoint is given (else the first checkpoint's model).
    c.model.image_size = 224
    c.model.patch_size = 16
    c.model.width = 384
    c.model.depth = 12
    c.model.num_heads = 6
    c.model.posemb = "sincos"
    return c
