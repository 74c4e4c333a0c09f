"""Scoring one feature set with its scorers on every round of a protocol: fit on the round's
training normals, score its test images, and summarise AUROC / AUPR over the rounds
(Zhang et al.'s one-class / leave-one-class-out protocols; the metrics are scikit-learn's).

The scorers of one round share one :class:`~ssl_ad.evaluation.scorers.FitCache`: the round's
PCA (and its projections of the train and test rows), K-means elbow and Gaussian mixture are
fit once and reused by every scorer that asks for the same settings, with the numbers each
scorer would get on its own. A round on which a scorer raises is left out of that scorer's
row and recorded in ``failed_rounds``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from ssl_ad.evaluation import metrics
from ssl_ad.evaluation.features import FeatureSet
from ssl_ad.evaluation.protocols import Round
from ssl_ad.evaluation.scorers import FitCache, build_scorer

log = logging.getLogger(__name__)


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _mean_std(per_round: dict[str, float]) -> tuple[float, float]:
    """metrics.summarise over the rounds that worked; NaN when none did."""
    return metrics.summarise(per_round) if per_round else (float("nan"), float("nan"))


def scorer_kwargs(config: Any, name: str) -> dict[str, Any]:
    """Keyword arguments of scorer ``name`` from ``config.scorer_args`` plus the global pca_dims and seed."""
    kwargs = dict(config.scorer_args.get(name, {}))
    if name != "mae_recon":
        kwargs.setdefault("pca_dims", int(config.pca_dims) or None)
        kwargs.setdefault("pca_residual", str(config.get("pca_residual", "auto")))
    if name in ("kmeans", "gmm_kmeans", "gmm"):
        kwargs.setdefault("seed", int(config.seed))
        if "k_range" in kwargs:
            kwargs["k_range"] = tuple(kwargs["k_range"])
        if "elbow_samples" in kwargs:
            kwargs["elbow_samples"] = int(kwargs["elbow_samples"]) or None
    return kwargs


class _Tally:
    """One scorer's results over the rounds (the row of :func:`score_feature_set`)."""

    def __init__(self) -> None:
        self.per_round: dict[str, float] = {}
        self.auprs: list[float] = []
        self.curves: dict[str, tuple] = {}
        self.warnings: list[str] = []
        self.failed: dict[str, str] = {}
        self.fit_s = self.score_s = 0.0
        self.first_scorer = None


def score_feature_set(
    fs: FeatureSet, scorer_names: Sequence[str], protocol: str, rounds: list[Round], config: Any
) -> list[tuple[dict, dict]]:
    """Fits and scores every scorer in ``scorer_names`` on every round; one (result row, extra) each.

    Rounds are the outer loop: a round's train and test rows are gathered once (float64) and
    its scorers share one FitCache, cleared before the next round. A scorer's ``fit_seconds``
    includes the shared fits it was the first to ask for (the first scorer pays for the PCA).
    ``extra`` holds the per-round ROC curves and the first round's fitted scorer.
    """
    tallies = {name: _Tally() for name in scorer_names}
    for rnd in rounds:
        train = np.asarray(fs.train[rnd.train_idx], dtype=np.float64)
        test = np.asarray(fs.test[rnd.test_idx], dtype=np.float64)
        cache = FitCache()
        for name in scorer_names:
            tally, scorer = tallies[name], None
            try:
                scorer = build_scorer(name, cache=cache, **scorer_kwargs(config, name))
                t0 = time.perf_counter()
                scorer.fit(train)
                t1 = time.perf_counter()
                scores = scorer.score(test)
                t2 = time.perf_counter()
                auc = metrics.auroc(rnd.test_is_anomaly, scores)
                ap = metrics.aupr(rnd.test_is_anomaly, scores)
                fpr, tpr = metrics.roc_points(rnd.test_is_anomaly, scores)
            except Exception as e:  # noqa: BLE001 - one round's failure must not lose the others
                tally.failed[rnd.name] = _reason(e)
                log.warning("%s / %s / %s: round %r failed: %s", fs.name, name, protocol, rnd.name, _reason(e))
                continue
            finally:
                if scorer is not None:
                    tally.warnings.extend(w for w in scorer.warnings if w not in tally.warnings)
            tally.fit_s, tally.score_s = tally.fit_s + t1 - t0, tally.score_s + t2 - t1
            tally.per_round[rnd.name] = auc
            tally.auprs.append(ap)
            tally.curves[rnd.name] = (fpr, tpr, auc)
            tally.first_scorer = tally.first_scorer or scorer
        cache.clear()  # the round's rows and fits: a kept scorer must not hold them
    return [_row(fs, name, protocol, tallies[name]) for name in scorer_names]


def _row(fs: FeatureSet, scorer_name: str, protocol: str, tally: _Tally) -> tuple[dict, dict]:
    mean, std = _mean_std(tally.per_round)
    row = {
        "feature": fs.name,
        "scorer": scorer_name,
        "protocol": protocol,
        "mean_auroc": mean,
        "std_auroc": std,
        "mean_aupr": float(np.mean(tally.auprs)) if tally.auprs else float("nan"),
        "per_round": tally.per_round,
        "fit_seconds": tally.fit_s,
        "score_seconds": tally.score_s,
        "warnings": tally.warnings,
        "feature_dims": int(fs.train.shape[1]),
        "failed_rounds": tally.failed,
    }
    first = tally.first_scorer
    k = getattr(first, "fitted_k", None)
    k = getattr(first, "k", None) if k is None else k
    if k is not None:
        row["k_first_round"] = int(k)
    return row, {"curves": tally.curves, "scorer": first}


def score_rounds(fs: FeatureSet, scorer_name: str, protocol: str, rounds: list[Round], config: Any) -> tuple[dict, dict]:
    """Fits and scores one scorer on every round; returns (result row, per-round ROC curves).

    A round on which the scorer raises is left out of ``per_round`` and recorded in the row's
    ``failed_rounds`` (round -> reason); the means cover the rounds that worked (NaN if none).
    """
    return score_feature_set(fs, [scorer_name], protocol, rounds, config)[0]
