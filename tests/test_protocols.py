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
    with pytest.raises(ValueError, match="no round of protocol 'leave_one_class_out' can be scored"):
        pr.make_rounds("leave_one_class_out", TRAIN, np.array([1, 1, 1]), CLASSES)
    with pytest.raises(ValueError, match="max_train_per_round"):
        pr.make_rounds("one_class", TRAIN, TEST, CLASSES, max_train_per_round=0)


def test_unscoreable_rounds_are_skipped_with_the_class_and_reason() -> None:
    """'fox' has train images but no test images; 'cat' has test images but no train images."""
    train, test = np.array([1, 2, 1, 2, 2]), np.array([0, 1, 0, 1])
    skipped: dict[str, str] = {}
    rounds = pr.make_rounds("one_class", train, test, CLASSES, skipped=skipped)
    assert [r.name for r in rounds] == ["dog"]
    np.testing.assert_array_equal(rounds[0].test_is_anomaly, test != 1)
    assert skipped == {
        "cat": "Round 'cat': no training normals (no train image is normal in this round).",
        "fox": "Round 'fox': the test split needs both normal and anomalous images; it has 0 normal and 4 anomalous.",
    }
    skipped = {}
    rounds = pr.make_rounds("leave_one_class_out", train, test, CLASSES, skipped=skipped)
    assert [r.name for r in rounds] == ["cat", "dog"]
    np.testing.assert_array_equal(rounds[0].train_idx, np.arange(5))
    assert list(skipped) == ["fox"] and "4 normal and 0 anomalous" in skipped["fox"]


def test_good_vs_defect_protocol_allows_test_only_defect_classes() -> None:
    names = ["good", "scratch", "dent"]
    train, test = np.array([0, 0, 0, 0]), np.array([1, 0, 2, 0, 1])
    (r,) = pr.make_rounds("good_vs_defect", train, test, names, max_train_per_round=3, seed=1)
    assert r.name == "good" and len(r.train_idx) == 3 and set(r.train_idx) <= {0, 1, 2, 3}
    np.testing.assert_array_equal(r.test_is_anomaly, [True, False, True, False, True])
    (r,) = pr.make_rounds("good_vs_defect", np.array([1, 1]), test, names, normal_class="scratch")
    assert r.name == "scratch" and r.train_idx.tolist() == [0, 1]
    with pytest.raises(ValueError, match="class named 'ok'.*'good', 'scratch', 'dent'"):
        pr.make_rounds("good_vs_defect", train, test, names, normal_class="ok")
    with pytest.raises(ValueError, match="no round of protocol 'good_vs_defect'.*0 anomalous"):
        pr.make_rounds("good_vs_defect", train, np.array([0, 0]), names)


def test_mvtec_category_without_test_images_is_skipped() -> None:
    cats = ["bottle", "cable", "wood"]
    train, test = np.array([0, 0, 1, 1, 2]), np.array([0, 0, 1, 1])
    anomalous = np.array([False, True, False, True])
    skipped: dict[str, str] = {}
    rounds = pr.mvtec_rounds(train, test, anomalous, cats, True, "mvtec", skipped=skipped)
    assert [r.name for r in rounds] == ["bottle", "cable"] and list(skipped) == ["wood"]
    assert "0 normal and 0 anomalous" in skipped["wood"]


def test_every_protocol_name_in_the_readme_is_accepted() -> None:
    import re

    from tests.conftest import REPO

    with open(f"{REPO}/README.md") as f:
        readme = f.read()
    section = readme[readme.index("## Evaluate"):]
    section = section[: section.index("\n## ", 4)]
    named = set(re.findall(r"`([a-z_]+)`", section[section.index("Protocols"):section.index("Scorers")]))
    assert named == set(pr.PROTOCOLS) | set(pr.MVTEC_VARIANTS)
