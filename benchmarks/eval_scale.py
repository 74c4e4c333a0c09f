"""Time the feature scorers of the evaluation at CIFAR-10 / ViT-S scale on a synthetic set.

    python benchmarks/eval_scale.py                  # 10 leave-one-class-out rounds, all five scorers
    python benchmarks/eval_scale.py --rounds=2 --n_train=20000 --out=/tmp/eval_scale.json

The set: ``n_classes`` Gaussian classes in ``dim`` dimensions (seeded), ``n_train`` training and
``n_test`` test feature vectors with uniformly drawn labels (float32, like the feature cache). Each
class has its own mean and its own per-axis spread in a shared random basis whose axis scales
decay as 1/sqrt(1 + j/4) (a few dominant directions, as ViT features have). The protocol is the
study's leave-one-class-out (``ssl_ad.evaluation.protocols.make_rounds``; about 45,000 training
normals per round at the defaults), scored exactly as ``evaluate.py`` does with the default
evaluation config (``ssl_ad.evaluation.scoring.score_feature_set``: one round at a time, the
round's scorers sharing its PCA, elbow and mixture). It prints seconds per scorer and per
round, the AUROCs and the chosen k, and writes them as JSON with ``--out``.

A scorer's seconds include the shared fits it was the first to ask for (``knn`` runs first and
pays for the PCA). It is not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import jax
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ssl_ad.config_defaults import eval_config  # noqa: E402
from ssl_ad.evaluation.features import EMBEDDING, FeatureSet  # noqa: E402
from ssl_ad.evaluation.protocols import make_rounds  # noqa: E402
from ssl_ad.evaluation.scoring import score_feature_set  # noqa: E402

FEATURE_SCORERS = ("knn", "mahalanobis", "kmeans", "gmm_kmeans", "gmm")


def make_features(seed: int = 0, n_train: int = 50_000, n_test: int = 10_000, dim: int = 384, n_classes: int = 10,
                  separation: float = 0.4) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(train (n_train, dim) float32, train labels, test (n_test, dim) float32, test labels) of
    ``n_classes`` seeded Gaussian classes; ``separation`` scales the spread of the class means."""
    rng = np.random.default_rng(seed)
    basis = np.linalg.qr(rng.standard_normal((dim, dim)))[0]
    scales = 1.0 / np.sqrt(1.0 + np.arange(dim) / 4.0)
    means = rng.standard_normal((n_classes, dim)) * scales * separation
    spread = rng.uniform(0.7, 1.3, (n_classes, dim)) * scales

    def draw(labels: np.ndarray) -> np.ndarray:
        z = means[labels] + rng.standard_normal((labels.size, dim)) * spread[labels]
        return (z @ basis.T).astype(np.float32)

    y_train, y_test = rng.integers(0, n_classes, n_train), rng.integers(0, n_classes, n_test)
    return draw(y_train), y_train, draw(y_test), y_test


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=10, help="leave-one-class-out rounds to run (the first N)")
    p.add_argument("--n_train", type=int, default=50_000)
    p.add_argument("--n_test", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=384)
    p.add_argument("--n_classes", type=int, default=10)
    p.add_argument("--separation", type=float, default=0.4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scorers", default=",".join(FEATURE_SCORERS))
    p.add_argument("--elbow_samples", type=int, default=None, help="override scorer_args.*.elbow_samples (0 = all)")
    p.add_argument("--out", default="")
    args = p.parse_args(argv)

    load_before = os.getloadavg()
    t0 = time.perf_counter()
    x_tr, y_tr, x_te, y_te = make_features(args.seed, args.n_train, args.n_test, args.dim, args.n_classes,
                                           args.separation)
    names = [str(c) for c in range(args.n_classes)]
    rounds = make_rounds("leave_one_class_out", y_tr, y_te, names, seed=args.seed)[: args.rounds]
    print(f"synthetic set: train {x_tr.shape}, test {x_te.shape}, {len(rounds)} rounds of "
          f"{min(r.train_idx.size for r in rounds):,}-{max(r.train_idx.size for r in rounds):,} training normals "
          f"({time.perf_counter() - t0:.1f} s to make)", flush=True)

    config = eval_config()
    config.seed = args.seed
    scorers = [s for s in args.scorers.split(",") if s]
    if args.elbow_samples is not None:
        for s in ("kmeans", "gmm_kmeans", "gmm"):
            config.scorer_args[s].elbow_samples = args.elbow_samples
    fs = FeatureSet("synthetic", EMBEDDING, x_tr, x_te, 0.0, {})

    per_round: list[dict] = []
    t_all = time.perf_counter()
    for rnd in rounds:
        t = time.perf_counter()
        rows = score_feature_set(fs, scorers, "leave_one_class_out", [rnd], config)
        wall = time.perf_counter() - t
        entry = {"round": rnd.name, "n_train": int(rnd.train_idx.size), "seconds": wall, "scorers": {}}
        for row, _ in rows:
            entry["scorers"][row["scorer"]] = {
                "seconds": row["fit_seconds"] + row["score_seconds"],
                "auroc": row["per_round"].get(rnd.name),
                "k": row.get("k_first_round"),
                "failed": row["failed_rounds"].get(rnd.name),
            }
        per_round.append(entry)
        cells = "  ".join(f"{s} {v['seconds']:5.2f} s (AUROC {v['auroc'] if v['auroc'] is None else round(v['auroc'], 4)}"
                          f"{'' if v['k'] is None else ', k=' + str(v['k'])})" for s, v in entry["scorers"].items())
        print(f"round {rnd.name}: {wall:5.2f} s | {cells}", flush=True)
    total = time.perf_counter() - t_all

    per_scorer = {s: sum(r["scorers"][s]["seconds"] for r in per_round) for s in scorers}
    print(f"\ntotal {total:.1f} s for {len(rounds)} rounds ({total / max(len(rounds), 1):.2f} s per round)")
    for s in scorers:
        print(f"  {s:12s} {per_scorer[s]:6.1f} s  ({per_scorer[s] / max(len(rounds), 1):5.2f} s per round)")
    result = {
        "args": vars(args),
        "total_seconds": total,
        "per_scorer_seconds": per_scorer,
        "rounds": per_round,
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "loadavg_before": load_before,
        "loadavg_after": os.getloadavg(),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join(sys.argv),
    }
    print(f"load average (1/5/15 min) before {load_before}, after {result['loadavg_after']}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
