"""Pretrains a ViT with MAE or DINO.

  python train.py --config=configs/mae_mnist5k.py --workdir=runs/mae [--config.total_steps=...]

Running it again on the same workdir resumes from the latest checkpoint. Resuming with a changed
config is refused (naming each changed key) unless the change is bookkeeping (logging, checkpoint
cadence, paths, a longer total_steps) or --allow_config_change names it (recorded in
workdir/config_history.jsonl).
"""

from absl import app, flags
from ml_collections import config_flags

from ssl_ad.cli import parse_flags, run_guarded, setup_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, config.json and metrics.jsonl go.")
_ALLOW = flags.DEFINE_list(
    "allow_config_change", [],
    "On resume: config keys (comma list, or 'all') allowed to differ from the saved config beyond the "
    "bookkeeping ones; recorded in workdir/config_history.jsonl.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    del argv
    setup_logging()
    from ssl_ad.config_check import validate_train_config

    def job():
        validate_train_config(_CONFIG.value)  # before JAX, TF or any data is loaded
        from ssl_ad.train.loop import train_and_evaluate

        train_and_evaluate(_CONFIG.value, _WORKDIR.value, allow_config_change=_ALLOW.value)

    run_guarded(job)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
