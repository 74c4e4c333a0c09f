"""Threshold-free detection metrics, with input checks that fail loudly.

sklearn either errors cryptically or returns NaN on degenerate input (a
single class, NaN scores); these wrappers turn both into clear ValueErrors so
a broken round cannot slip into a results table.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

__all__ = ["auroc", "aupr", "roc_points", "summarise"]


def _check(is_anomaly: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(is_anomaly).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"is_anomaly and scores differ in length: {y.size} vs {s.size}.")
    if not np.isin(y, (0, 1)).all():
        raise ValueError("is_anomaly must be boolean (or 0/1).")
    y = y.astype(bool)
    if y.all() or not y.any():
        raise ValueError("is_anomaly must contain both normal and anomalous samples.")
    if not np.all(np.isfinite(s)):
        raise ValueError(f"scores contain {int(np.sum(~np.isfinite(s)))} NaN/Inf value(s).")
    return y, s


def auroc(is_anomaly: np.ndarray, scores: np.ndarray) -> float:
    """Area under the ROC curve, anomalies as the positive class (ties count 1/2)."""
    y, s = _check(is_anomaly, scores)
    return float(roc_auc_score(y, s))


def aupr(is_anomaly: np.ndarray, scores: np.ndarray) -> float:
    """Area under the precision-recall curve (sklearn average precision), anomalies positive."""
    y, s = _check(is_anomaly, scores)
    return float(average_precision_score(y, s))


def roc_points(is_anomaly: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve as (fpr, tpr) arrays, for plotting."""
    y, s = _check(is_anomaly, scores)
    fpr, tpr, _ = roc_curve(y, s)
    return fpr, tpr


def summarise(per_round: Mapping[str, float]) -> tuple[float, float]:
    """Mean and *population* std (``np.std``, ddof=0) over rounds.

    The rounds of a protocol are the complete set (every class once), not a
    sample from a larger population, hence ddof=0.
    """
    values = np.asarray(list(per_round.values()), dtype=np.float64)
    if values.size == 0:
        raise ValueError("per_round is empty.")
    if not np.all(np.isfinite(values)):
        raise ValueError("per_round contains NaN/Inf values.")
    return float(values.mean()), float(values.std())
