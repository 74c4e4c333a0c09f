"""Re-score an evaluation's cached features with today's scorers and compare with its results.json.

    python benchmarks/eval_auroc_check.py --outdir=reports/demo [--tolerance=0.002] [--out=check.json]

Reads ``outdir/results.json`` (its config and rows) and the feature cache ``outdir/features/*.npz``
written by ``evaluate.py`` (one train and one test file per feature source and kind), loads the
data set's labels (``ssl_ad.data.sources.load_split``: the images are read, no model is run),
rebuilds every protocol's rounds as the runner does (``protocols.rounds_for``) and scores each
(feature, scorer, protocol) with ``scoring.score_feature_set``. It prints, per row, the recorded
and the new mean AUROC, their largest per-round difference, the recorded and the new seconds
(fit + score, summed over the rounds; the recorded ones were measured when that run was made,
under its machine's load), and exits with 1 when a per-round AUROC differs by more than
``--tolerance``. The features must be those the results were computed from (a later
``evaluate.py`` run into the same directory rewrites them). It is not part of the test suite.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import re
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssl_ad.config_defaults import eval_config  # noqa: E402
from ssl_ad.config_lists import as_names  # noqa: E402
from ssl_ad.data.sources import load_split  # noqa: E402
from ssl_ad.evaluation.features import EMBEDDING, RECON, FeatureSet  # noqa: E402
from ssl_ad.evaluation.protocols import rounds_for  # noqa: E402
from ssl_ad.evaluation.scoring import score_feature_set  # noqa: E402


def _config(recorded: dict):
    """The recorded run's evaluation config over today's defaults (keys added since keep their defaults)."""
    config = eval_config()

    def merge(target, values):
        for key, value in values.items():
            if isinstance(value, dict) and key in target and hasattr(target[key], "keys"):
                merge(target[key], value)
            else:
                target[key] = tuple(value) if isinstance(value, list) else value

    merge(config, recorded)
    return config


def _feature_sets(features_dir: str) -> list[FeatureSet]:
    """One FeatureSet per cached (source, kind): ``<source>-step<N>-<data>-train-<what>.npz`` and its test twin."""
    sets = []
    for train_path in sorted(glob.glob(os.path.join(features_dir, "*-train-*.npz"))):
        test_path = train_path.replace("-train-", "-test-")
        if not os.path.exists(test_path):
            continue
        name = re.sub(r"-step\d+-.*$", "", os.path.basename(train_path))
        kind = RECON if "-recon" in os.path.basename(train_path) else EMBEDDING
        sets.append(FeatureSet(name, kind, np.load(train_path)["features"], np.load(test_path)["features"], 0.0, {}))
    return sets


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--outdir", default="reports/demo", help="an evaluate.py output directory")
    p.add_argument("--tolerance", type=float, default=0.002, help="largest allowed per-round AUROC difference")
    p.add_argument("--out", default="", help="write the table as JSON here")
    args = p.parse_args(argv)

    with open(os.path.join(args.outdir, "results.json")) as f:
        recorded = json.load(f)
    config = _config(recorded["meta"]["config"])
    old_rows = {(r["feature"], r["scorer"], r["protocol"]): r for r in recorded["results"]}
    train = load_split(config.data, config.data.train_split)
    test = load_split(config.data, config.data.test_split)
    scorer_names = as_names(config.scorers, "scorers")

    feature_sets = _feature_sets(os.path.join(args.outdir, "features"))  # read once: a later rewrite cannot mix in
    table, worst = [], 0.0
    print(f"{'feature':12s} {'scorer':12s} {'protocol':20s} {'AUROC then':>10s} {'AUROC now':>10s} "
          f"{'max |diff|':>10s} {'s then':>8s} {'s now':>8s}")
    for protocol in as_names(config.protocols, "protocols"):
        rounds = rounds_for(protocol, train, test, config)
        for fs in feature_sets:
            names = [s for s in scorer_names if (s == "mae_recon") == (fs.kind == RECON)
                     and (fs.name, s, protocol) in old_rows]
            if not names:  # a source results.json has no row for
                continue
            t0 = time.perf_counter()
            rows = score_feature_set(fs, names, protocol, rounds, config)
            for row, _ in rows:
                old = old_rows[(fs.name, row["scorer"], protocol)]
                diffs = [abs(row["per_round"].get(r, np.nan) - a) for r, a in old["per_round"].items()]
                diff = float(np.max(diffs)) if diffs else float("nan")
                worst = max(worst, diff) if np.isfinite(diff) else float("inf")
                entry = {"feature": fs.name, "scorer": row["scorer"], "protocol": protocol,
                         "auroc_then": old["mean_auroc"], "auroc_now": row["mean_auroc"], "max_round_diff": diff,
                         "seconds_then": old["fit_seconds"] + old["score_seconds"],
                         "seconds_now": row["fit_seconds"] + row["score_seconds"],
                         "k_then": old.get("k_first_round"), "k_now": row.get("k_first_round")}
                table.append(entry)
                print(f"{fs.name:12s} {row['scorer']:12s} {protocol:20s} {entry['auroc_then']:10.4f} "
                      f"{entry['auroc_now']:10.4f} {diff:10.5f} {entry['seconds_then']:8.1f} {entry['seconds_now']:8.1f}",
                      flush=True)
            print(f"  ({fs.name}, {protocol}: {time.perf_counter() - t0:.1f} s for {len(names)} scorers)", flush=True)
    then = sum(e["seconds_then"] for e in table)
    now = sum(e["seconds_now"] for e in table)
    print(f"\nlargest per-round AUROC difference {worst:.5f} (tolerance {args.tolerance}); "
          f"scoring seconds then {then:.1f}, now {now:.1f}; load average now {os.getloadavg()}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"rows": table, "largest_round_diff": worst, "loadavg": os.getloadavg()}, f, indent=1)
    return 0 if worst <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
