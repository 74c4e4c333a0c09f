"""Pretrains a ViT with MAE or DINO.

  python train.py --config=configs/mae_mnist5k.py --workdir=runs/mae [--config.total_steps=...]

Running it again on the same workdir resumes from the latest checkpoint.
"""

from absl import app, flags
from ml_collections import config_flags

from ssl_ad.cli import parse_flags, run_guarded, setup_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, config.json and metrics.jsonl go.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    setup_logging()
    from ssl_ad.train.loop import train_and_evaluate

    run_guarded(lambda: train_and_evaluate(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
