"""Anomaly detection on single-label COCO 2017 images of the study's five categories.

  python evaluate.py --config=configs/eval_coco.py --config.checkpoint=runs/mae_coco \
      --config.data.coco_root=/data/coco2017 --outdir=reports/coco

Classes: 'bicycle', 'tv', 'banana', 'traffic light', 'pizza' (``data.categories``;
or ``data.supercategories``); train comes from train2017, test from val2017.
COCO images differ in size, so they are centre-cropped and resized to
``data.load_size`` on load (``data.crop_to_box=True`` crops around the object
instead); the network sees them at the checkpoint's model.image_size.
"""

from ssl_ad.config_defaults import eval_config


def get_config():
    c = eval_config()
    c.data.name = "coco2017"
    c.data.coco_root = ""  # holds annotations/, train2017/, val2017/; not needed once prepared in data.data_dir
    c.data.categories = ("bicycle", "tv", "banana", "traffic light", "pizza")
    c.data.supercategories = ()
    c.data.min_area = 1024
    c.data.crop_to_box = False
    c.data.box_margin = 0.1
    c.data.load_size = 224
    # Used for the random-init baseline when no checkpoint is given (else the first checkpoint's model).
    c.model.image_size = 224
    c.model.patch_size = 16
    c.model.width = 384
    c.model.depth = 12
    c.model.num_heads = 6
    c.model.posemb = "sincos"
    return c
