"""The original study's evaluation: official DINO ViT-S/16 and MAE ViT-H/14 weights at 224 px on CIFAR-10.

Convert the published weights once (needs the 'convert' extra: pip install -e '.[convert]'):

  python -m ssl_ad.convert --from=dino_deitsmall16_pretrain.pth --arch=vit_small_patch16 --out=runs/dino_vits16
  python -m ssl_ad.convert --from=mae_pretrain_vit_huge.pth --arch=vit_huge_patch14 --out=runs/mae_vith14

then evaluate (cifar10 prepared in data.data_dir, see the README):

  python evaluate.py --config=configs/eval_seed_study.py --config.data.data_dir=/data/tensorflow_datasets \
      --outdir=reports/seed_study

Study settings: 224 px (CIFAR-10's 32 px images are resized bicubically to each
checkpoint's model.image_size, and normalised with the ImageNet mean/std the
weights were trained with, which the converted checkpoints record); the first
1,000 training images per class (``data.max_per_class``; CIFAR-10's test split
has exactly 1,000 per class, so it stays whole); PCA to 100 dimensions before
every feature scorer; the inductive protocols (fit on the train split's normal
images of a round, score the held-out test split). DINO features are the
teacher's CLS token (``which='teacher'``; the published file is the teacher).
``mae_pretrain_vit_huge.pth`` holds no decoder, so there is no MAE
reconstruction scorer here (``mae_recon`` needs an ``mae_visualize_*`` file).

Other data sets of the study, same checkpoints:

  COCO 2017, the five categories 'bicycle', 'tv', 'banana', 'traffic light', 'pizza'
  (data.categories; or data.supercategories), train2017 -> train, val2017 -> test:
    --config.data.name=coco2017 --config.data.coco_root=/data/coco2017 --config.data.load_size=224 \
    --config.data.max_per_class=0

  MVTec AD, every category (or one: --config.data.category=bottle), standard or the study's protocol:
    --config.data.name=mvtec_ad --config.data.mvtec_root=/data/mvtec_anomaly_detection \
    --config.data.load_size=256 --config.data.max_per_class=0 --config.protocols=mvtec   # or mvtec_study
"""

from ssl_ad.config_defaults import eval_config


def get_config():
    c = eval_config()
    c.checkpoint = ("runs/dino_vits16", "runs/mae_vith14")  # written by python -m ssl_ad.convert (above)
    c.which = "teacher"
    c.sources = ("pixels", "random_init")
    c.pooling = ("cls",)
    c.protocols = ("leave_one_class_out", "one_class")
    c.scorers = ("knn", "mahalanobis", "kmeans", "gmm_kmeans", "gmm")  # no mae_recon: the ViT-H/14 file has no decoder
    c.pca_dims = 100
    c.batch_size = 128

    c.data.name = "cifar10"
    c.data.max_per_class = 1000
    c.data.load_size = 0  # CIFAR-10 is stored at 32 px; resizing to 224 px happens per checkpoint
    # COCO 2017 keys (used with data.name=coco2017), defaults of configs/eval_coco.py.
    c.data.coco_root = ""
    c.data.categories = ("bicycle", "tv", "banana", "traffic light", "pizza")
    c.data.supercategories = ()
    c.data.min_area = 1024
    c.data.crop_to_box = False
    c.data.box_margin = 0.1
    # MVTec AD keys (used with data.name=mvtec_ad).
    c.data.mvtec_root = ""
    c.data.category = "all"

    # The random-init baseline uses the first checkpoint's model (ViT-S/16 at 224 px); these
    # values describe the same model for runs given no checkpoint.
    c.model.image_size = 224
    c.model.patch_size = 16
    c.model.width, c.model.depth, c.model.num_heads = 384, 12, 6
    c.model.posemb = "learned"
    return c
