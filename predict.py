"""Scores new, unlabelled images against normal ones with a trained checkpoint.

  python predict.py --config=configs/predict.py --config.checkpoint=runs/dino \
      --config.normal_dir=<folder of good images> --config.images='<folder or glob>' --outdir=predictions/x

Writes outdir/scores.csv (file, score, anomalous at the threshold that calls config.fpr of the
normal images anomalous), outdir/prediction.json and, for ViT checkpoints, outdir/overlays.png.
Exit code 0: done; 2: a user mistake (one message, nothing written).
"""

import shlex
import sys

from absl import app, flags
from ml_collections import config_flags

from ssl_ad.cli import parse_flags, run_guarded, setup_logging

_CONFIG = config_flags.DEFINE_config_file("config", "configs/predict.py", "Prediction config file.", lock_config=True)
_OUTDIR = flags.DEFINE_string("outdir", None, "Where scores.csv, prediction.json, overlays.png and features/ go.")
flags.mark_flags_as_required(["outdir"])


def main(argv):
    del argv
    setup_logging()
    from ssl_ad.config_check import validate_predict_config

    def job():
        validate_predict_config(_CONFIG.value)  # before JAX, TF or any image is loaded
        from ssl_ad.evaluation.predict import run_prediction

        out = run_prediction(_CONFIG.value, _OUTDIR.value, command=shlex.join(["python"] + sys.argv))
        sys.stdout.write(f"{out['anomalous']} of {out['new_images']} images anomalous (threshold {out['threshold']:.4g}, "
                         f"FPR {out['fpr']:g} on {out['normal_images']} normal images): {_OUTDIR.value}/scores.csv\n")

    run_guarded(job)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
