"""Scoring new images (predict.py): the defaults of ssl_ad.config_defaults.predict_config.

  python predict.py --config=configs/predict.py --config.checkpoint=runs/dino \
      --config.normal_dir=good/ --config.images='new/*.png' --outdir=predictions/new
"""

from ssl_ad.config_defaults import predict_config


def get_config():
    return predict_config()
