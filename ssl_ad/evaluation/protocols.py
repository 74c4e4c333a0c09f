"""Inductive evaluation protocols: which images a scorer fits on and is tested on.

A protocol turns labelled train/test splits into a list of :class:`Round`s.
Scorers are always fit on *training* normals and scored on the *test* split,
so no test image ever influences a fit (unlike a transductive setup).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence

import numpy as np

__all__ = [
    "Round",
    "leave_one_class_out",
    "one_class",
    "good_vs_defect",
    "mvtec_rounds",
    "MVTEC_VARIANTS",
    "make_rounds",
    "PROTOCOLS",
]


@dataclasses.dataclass(frozen=True)
class Round:
    """One fit/score round.

    Attributes:
      name: round name (the held-out / normal class name, or a given name).
      train_idx: sorted indices into the TRAIN split of the normal images to fit on.
      test_idx: indices into the TEST split to score.
      test_is_anomaly: bool array aligned with ``test_idx``.
    """

    name: str
    train_idx: np.ndarray
    test_idx: np.ndarray
    test_is_anomaly: np.ndarray


def _as_labels(labels: np.ndarray, n_classes: int, what: str) -> np.ndarray:
    y = np.asarray(labels)
    if y.ndim != 1:
        raise ValueError(f"{what} must be 1-D; got shape {y.shape}.")
    if y.size and not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{what} must be integer class ids; got dtype {y.dtype}.")
    if y.size and (y.min() < 0 or y.max() >= n_classes):
        raise ValueError(f"{what} has ids outside [0, {n_classes}) for {n_classes} class names.")
    return y.astype(np.int64)


def _subsample(idx: np.ndarray, max_n: int | None, seed: int, round_index: int) -> np.ndarray:
    """Deterministically keep at most ``max_n`` of ``idx`` (seeded per round), sorted."""
    if max_n is not None and max_n < 1:
        raise ValueError(f"max_train_per_round must be >= 1 or None; got {max_n}.")
    if max_n is None or idx.size <= max_n:
        return idx
    rng = np.random.default_rng([seed, round_index])
    return np.sort(rng.choice(idx, size=max_n, replace=False))


def _make_round(name: str, train_idx: np.ndarray, test_is_anomaly: np.ndarray) -> Round:
    """Build a round over the whole test split, checking it is scoreable."""
    test_is_anomaly = np.asarray(test_is_anomaly, dtype=bool)
    if train_idx.size == 0:
        raise ValueError(f"Round {name!r}: no training normals.")
    if test_is_anomaly.all() or not test_is_anomaly.any():
        raise ValueError(f"Round {name!r}: the test split needs both normal and anomalous images.")
    return Round(
        name=name,
        train_idx=train_idx.astype(np.int64),
        test_idx=np.arange(test_is_anomaly.size, dtype=np.int64),
        test_is_anomaly=test_is_anomaly,
    )


def leave_one_class_out(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    class_names: Sequence[str],
    max_train_per_round: int | None = None,
    seed: int = 0,
) -> list[Round]:
    """The original study's setting: round c treats class c as the anomaly.

    Fit on train images of every other class; test on all test images, with
    anomaly = (label == c).
    """
    n = len(class_names)
    y_tr = _as_labels(train_labels, n, "train_labels")
    y_te = _as_labels(test_labels, n, "test_labels")
    rounds = []
    for c, name in enumerate(class_names):
        train_idx = _subsample(np.flatnonzero(y_tr != c), max_train_per_round, seed, c)
        rounds.append(_make_round(str(name), train_idx, y_te == c))
    return rounds


def one_class(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    class_names: Sequence[str],
    max_train_per_round: int | None = None,
    seed: int = 0,
) -> list[Round]:
    """One-class setting: round c treats class c as the only normal class.

    Fit on train images of class c; test on all test images, with
    anomaly = (label != c).
    """
    n = len(class_names)
    y_tr = _as_labels(train_labels, n, "train_labels")
    y_te = _as_labels(test_labels, n, "test_labels")
    rounds = []
    for c, name in enumerate(class_names):
        train_idx = _subsample(np.flatnonzero(y_tr == c), max_train_per_round, seed, c)
        rounds.append(_make_round(str(name), train_idx, y_te != c))
    return rounds


def good_vs_defect(
    train_good_idx: np.ndarray,
    test_is_anomaly: np.ndarray,
    name: str = "good_vs_defect",
    max_train_per_round: int | None = None,
    seed: int = 0,
) -> Round:
    """MVTec-style single round: fit on known-good train images, test on all test images."""
    train_idx = np.sort(np.asarray(train_good_idx, dtype=np.int64).ravel())
    train_idx = _subsample(train_idx, max_train_per_round, seed, 0)
    return _make_round(name, train_idx, np.asarray(test_is_anomaly).ravel())


MVTEC_VARIANTS = ("mvtec", "mvtec_study")


def _subset_round(name: str, train_idx: np.ndarray, test_idx: np.ndarray, is_anomaly: np.ndarray) -> Round:
    """A round over a subset ``test_idx`` of the test split, checked to be scoreable."""
    test_idx = np.asarray(test_idx, dtype=np.int64)
    anomalous = np.asarray(is_anomaly, dtype=bool)[test_idx]
    if train_idx.size == 0:
        raise ValueError(f"Round {name!r}: no training normals.")
    if anomalous.all() or not anomalous.any():
        raise ValueError(f"Round {name!r}: its test images need both normal and anomalous ones.")
    return Round(name=name, train_idx=train_idx.astype(np.int64), test_idx=test_idx, test_is_anomaly=anomalous)


def mvtec_rounds(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    test_is_anomaly: np.ndarray,
    class_names: Sequence[str],
    categories_as_labels: bool,
    variant: str = "mvtec",
    name: str = "mvtec",
    max_train_per_round: int | None = None,
    seed: int = 0,
) -> list[Round]:
    """MVTec AD rounds; every train image is good, anomaly = ``test_is_anomaly``.

    ``variant='mvtec'`` (the standard protocol): with categories as labels
    (``data.category='all'``) one round per category c, fit on c's train
    images and tested on c's test images; otherwise (one category, labels are
    defect types) a single round ``name`` fit on all train and tested on all
    test images.

    ``variant='mvtec_study'`` (the original study's): needs categories as
    labels; round c fits on every category's train images and tests on every
    good test image plus category c's defective ones.
    """
    if variant not in MVTEC_VARIANTS:
        raise ValueError(f"Unknown MVTec variant {variant!r}; valid: {', '.join(MVTEC_VARIANTS)}.")
    y_te = np.asarray(test_labels)
    anomalous = np.asarray(test_is_anomaly, dtype=bool).ravel()
    if anomalous.shape != y_te.shape:
        raise ValueError(f"test_is_anomaly has {anomalous.size} entries for {y_te.size} test labels.")
    if not categories_as_labels:
        if variant == "mvtec_study":
            raise ValueError(
                "the 'mvtec_study' protocol needs categories as labels (data.category='all'); "
                "with a single category use 'mvtec'."
            )
        n_train = np.asarray(train_labels).size
        train_idx = _subsample(np.arange(n_train, dtype=np.int64), max_train_per_round, seed, 0)
        return [_subset_round(str(name), train_idx, np.arange(y_te.size), anomalous)]
    n = len(class_names)
    y_tr = _as_labels(train_labels, n, "train_labels")
    y_te = _as_labels(y_te, n, "test_labels")
    rounds = []
    for c, cname in enumerate(class_names):
        if variant == "mvtec":
            train_idx = np.flatnonzero(y_tr == c)
            test_idx = np.flatnonzero(y_te == c)
        else:
            train_idx = np.arange(y_tr.size, dtype=np.int64)
            test_idx = np.flatnonzero(~anomalous | (y_te == c))
        train_idx = _subsample(train_idx, max_train_per_round, seed, c)
        rounds.append(_subset_round(str(cname), train_idx, test_idx, anomalous))
    return rounds


_ProtocolFn = Callable[..., list[Round]]

PROTOCOLS: dict[str, _ProtocolFn] = {
    "leave_one_class_out": leave_one_class_out,
    "one_class": one_class,
}


def make_rounds(
    protocol: str,
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    class_names: Sequence[str],
    max_train_per_round: int | None = None,
    seed: int = 0,
) -> list[Round]:
    """Build the rounds of a class-labelled protocol by name.

    Datasets with good/defect labels instead of classes use
    :func:`good_vs_defect` directly.
    """
    try:
        fn = PROTOCOLS[protocol]
    except KeyError:
        raise ValueError(
            f"Unknown protocol {protocol!r}; valid: {', '.join(sorted(PROTOCOLS))}."
        ) from None
    return fn(train_labels, test_labels, class_names, max_train_per_round=max_train_per_round, seed=seed)
