"""ssl_ad: self-supervised ViT pretraining (DINO, MAE) in JAX/Flax and anomaly-detection evaluation."""

__version__ = "0.1.0"
