"""Evaluates checkpoints (and baselines) as anomaly detectors and writes a report.

  python evaluate.py --config=configs/eval_mnist5k.py --config.checkpoint=runs/mae,runs/dino --outdir=reports/demo

Exit code 0: every result computed; 2: a user mistake (one message, nothing evaluated); 4: the
results are written but some part failed (a scorer on a round, a plot), listed in report.md.
It runs on one host (every device of it embeds): started as several processes (JAX_NUM_PROCESSES,
srun with several tasks, mpirun) it exits with 2 before reading anything.
"""

import shlex
import sys

from absl import app, flags
from ml_collections import config_flags

from ssl_ad.cli import EXIT_PARTIAL_FAILURE, parse_flags, run_guarded, setup_logging

_CONFIG = config_flags.DEFINE_config_file("config", None, "Evaluation config file.", lock_config=True)
_OUTDIR = flags.DEFINE_string("outdir", None, "Where results.json/.csv, report.md, plots/ and features/ go.")
flags.mark_flags_as_required(["config", "outdir"])


def main(argv):
    del argv
    setup_logging()
    from ssl_ad.config_check import validate_eval_config

    def job():
        validate_eval_config(_CONFIG.value)  # before JAX, TF or any data is loaded, before anything is written
        from ssl_ad.evaluation.report import markdown_table
        from ssl_ad.evaluation.runner import failures_in, run_evaluation

        rows = run_evaluation(_CONFIG.value, _OUTDIR.value, command=shlex.join(["python"] + sys.argv))
        sys.stdout.write(markdown_table(rows) + f"\nReport: {_OUTDIR.value}/report.md\n")
        failures = failures_in(_OUTDIR.value)
        if failures:  # the results are written; exit 4 says that some part of them is missing
            sys.stderr.write(f"error: {len(failures)} part(s) of the evaluation failed (listed in report.md): "
                             + "; ".join(f"{f['what']}: {f['reason']}" for f in failures[:3])
                             + (" ..." if len(failures) > 3 else "") + "\n")
            sys.exit(EXIT_PARTIAL_FAILURE)

    run_guarded(job)


if __name__ == "__main__":
    app.run(main, flags_parser=parse_flags)
