"""Sweeps training (and evaluation) settings × seeds and compares their anomaly-detection AUROC.

  python ablate.py --config=configs/ablations/mae_mask_ratio.py --outdir=ablations/mae_mask_ratio \
      [--config.seeds=3] [--config.data_dir=...] [--dry_run]

Every setting × seed trains in outdir/runs/<setting>/seed<k> and is evaluated
into its eval/ folder; outdir gets ablation.csv, ablation.md and plots/.
Running the same command again skips finished runs and resumes unfinished ones.
"""

import shlex
import sys

from absl import app, flags
from ml_collections import config_flags

from ssl_ad.cli import run_guarded, setup_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "Ablation config file (configs/ablations/*.py).", lock_config=True)
_OUTDIR = flags.DEFINE_string("outdir", None, "Where runs/, ablation.csv, ablation.md and plots/ go.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Check every key and list the runs (and their status); train nothing.")
flags.mark_flags_as_required(["config", "outdir"])


def main(argv):
    del argv
    setup_logging()
    from ssl_ad.ablation.sweep import run_ablation

    def job():
        summary = run_ablation(_CONFIG.value, _OUTDIR.value, command=shlex.join(["python"] + sys.argv),
                               dry_run=_DRY_RUN.value)
        if summary["outputs"]:
            with open(summary["outputs"]["markdown"]) as f:
                sys.stdout.write(f.read().split("\nPer-seed values:")[0] + f"\nReport: {summary['outputs']['markdown']}\n")
        if summary["stopped"]:
            sys.stderr.write(f"stopped: {summary['stopped']}\n")
            sys.exit(1)

    run_guarded(job)


if __name__ == "__main__":
    app.run(main)
