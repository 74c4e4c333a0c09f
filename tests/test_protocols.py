"""Tests for ssl_ad.evaluation.protocols on a small hand-made label set."""

from __future__ import annotations

import numpy as np
import pytest

from ssl_ad.evaluation import protocols as pr

CLASSES = ["cat", "dog", "fox"]
# 3 classes with 4/5/6 train and 2/3/4 test images, interleaved on purpose.
TRAIN = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, 1, 2, 2])
TEST = np.array([2, 0, 1, 2, 1, 0, 2, 1, 2])


def test_label_fixture_sizes() -> None:
    assert np.bincount(TRAIN).tolist() == [4, 5, 6]
    assert np.bincount(TEST).tolist() == [2, 3, 4]


def test_leave_one_class_out() -> None:
    rounds = pr.make_rounds("leave_one_class_out", TRAIN, TEST, CLASSES)
    assert [r.name for r in rounds] == CLASSES
    r = rounds[1]
    np.testing.assert_array_equal(r.train_idx, [0, 2, 3, 5, 6, 8, 9, 11, 13, 14])
    assert set(TRAIN[r.train_idx]) == {0, 2}
    np.testing.assert_array_equal(r.test_idx, np.arange(9))
    np.testing.assert_array_equal(r.test_is_anomaly, TEST == 1)
    assert r.test_is_anomaly.dtype == bool
    assert [len(x.train_idx) for x in rounds] == [11, 10, 9]
    assert [int(x.test_is_anomaly.sum()) for x in rounds] == [2, 3, 4]


def test_one_class() -> None:
    rounds = pr.make_rounds("one_class", TRAIN, TEST, CLASSES)
    r = rounds[2]
    assert r.name == "fox"
    np.testing.assert_array_equal(r.train_idx, [2, 5, 8, 11, 13, 14])
    np.testing.assert_array_equal(r.test_idx, np.arange(9))
    np.testing.assert_array_equal(r.test_is_anomaly, TEST != 2)
    assert [len(x.train_idx) for x in rounds] == [4, 5, 6]
    assert [int(x.test_is_anomaly.sum()) for x in rounds] == [7, 6, 5]


def test_max_train_per_round_is_deterministic_subset() -> None:
    a = pr.make_rounds("leave_one_class_out", TRAIN, TEST, CLASSES, max_train_per_round=4, seed=3)
    b = pr.make_rounds("leave_one_class_out", TRAIN, TEST, CLASSES, max_train_per_round=4, seed=3)
    full = pr.make_rounds("leave_one_class_out", TRAIN, TEST, CLASSES)
    for ra, rb, rf in zip(a, b, full):
        assert len(ra.train_idx) == 4
        np.testing.assert_array_equal(ra.train_idx, rb.train_idx)
        assert set(ra.train_idx) <= set(rf.train_idx)
        assert np.all(np.diff(ra.train_idx) > 0)
        np.testing.assert_array_equal(ra.test_idx, rf.test_idx)


def test_good_vs_defect_single_round() -> None:
    is_anom = np.array([False, True, True, False, True])
    r = pr.good_vs_defect(np.array([7, 2, 5]), is_anom)
    assert r.name == "good_vs_defect"
    np.testing.assert_array_equal(r.train_idx, [2, 5, 7])
    np.testing.assert_array_equal(r.test_idx, np.arange(5))
    np.testing.assert_array_equal(r.test_is_anomaly, is_anom)


def test_unknown_protocol_raises() -> None:
    with pytest.raises(ValueError, match="leave_one_class_out.*one_class"):
        pr.make_rounds("transductive", TRAIN, TEST, CLASSES)


def test_bad_inputs_raise() -> None:
    with pytest.raises(ValueError, match="outside"):
        pr.make_rounds("one_class", TRAIN, TEST, CLASSES[:2])
    with pytest.raises(ValueError, match="both normal and anomalous"):
        pr.make_rounds("leave_one_class_out", TRAIN, np.array([0, 1, 1]), CLASSES)
    with pytest.raises(ValueError, match="max_train_per_round"):
        pr.make_rounds("one_class", TRAIN, TEST, CLASSES, max_train_per_round=0)
