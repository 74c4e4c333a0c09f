"""Evaluates checkpoints (and baselines) as anomaly detectors and writes a report.

  python evaluate.py --config=configs/eval_mnist5k.py --config.checkpoint=runs/mae,runs/dino --outdir=reports/demo
"""

import shlex
import sys

from absl import app, flags
from ml_collections import config_flags

from ssl_ad.cli import parse_flags, run_guarded, setup_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "Evaluation config file.", lock_config=True)
_OUTDIR = flags.DEFINE_string("outdir", None, "Where results.json/.csv, report.md, plots/ and features/ go.")
flags.mark_flags_as_required(["config", "outdir"])


def main(argv):
    del argv
    setup_logging()
    from ssl_ad.evaluation.report import markdown_table
    from ssl_ad.evaluation.runner import run_evaluation

    def job():
        rows = run_evaluation(_CONFIG.value, _OUTDIR.value, command=shlex.join(["python"] + sys.argv))
        sys.stdout.write(markdown_table(rows) + f"\nReport: {_OUTDIR.value}/report.md\n")

    run_guarded(job)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
