"""Tests for ssl_ad.evaluation.metrics."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from ssl_ad.evaluation import metrics


def _mann_whitney_auc(is_anomaly: np.ndarray, scores: np.ndarray) -> float:
    """P(anomaly score > normal score) by counting all pairs, ties count 0.5."""
    pos = scores[is_anomaly.astype(bool)]
    neg = scores[~is_anomaly.astype(bool)]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (pos.size * neg.size))


def test_auroc_matches_sklearn_and_pair_count() -> None:
    rng = np.random.default_rng(0)
    y = rng.random(200) < 0.3
    s = np.round(rng.standard_normal(200) + y, 1)  # rounding creates ties
    assert len(np.unique(s)) < 200
    got = metrics.auroc(y, s)
    assert got == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    assert got == pytest.approx(_mann_whitney_auc(y, s), abs=1e-12)


def test_auroc_small_hand_case() -> None:
    # pairs (anomaly, normal): (3>1, 3>2, 2=2 -> 0.5, 2>1) -> 3.5 / 4
    assert metrics.auroc([0, 0, 1, 1], [1.0, 2.0, 3.0, 2.0]) == pytest.approx(0.875)


def test_aupr_and_roc_points() -> None:
    y = np.array([0, 1, 0, 1, 1, 0])
    s = np.array([0.1, 0.9, 0.4, 0.3, 0.8, 0.2])
    assert metrics.aupr(y, s) == pytest.approx(average_precision_score(y, s))
    fpr, tpr = metrics.roc_points(y, s)
    assert fpr[0] == 0 and tpr[-1] == 1 and fpr.shape == tpr.shape
    assert np.trapezoid(tpr, fpr) == pytest.approx(metrics.auroc(y, s))


def test_summarise_population_std() -> None:
    mean, std = metrics.summarise({"a": 0.6, "b": 0.8, "c": 1.0})
    assert mean == pytest.approx(0.8)
    assert std == pytest.approx(np.sqrt((0.04 + 0.0 + 0.04) / 3))
    with pytest.raises(ValueError):
        metrics.summarise({})


@pytest.mark.parametrize("fn", [metrics.auroc, metrics.aupr, metrics.roc_points])
def test_degenerate_inputs_raise(fn) -> None:
    with pytest.raises(ValueError, match="both normal and anomalous"):
        fn([1, 1, 1], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="both normal and anomalous"):
        fn([False, False], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        fn([0, 1, 1], [0.1, np.nan, 0.3])
    with pytest.raises(ValueError, match="length"):
        fn([0, 1], [0.1, 0.2, 0.3])
