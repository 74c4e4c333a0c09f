"""Inductive evaluation protocols: which images a scorer fits on and is tested on.

A protocol turns labelled train/test splits into a list of :class:`Round`s.
Scorers are always fit on *training* normals and scored on the *test* split,
so no test image ever influences a fit (unlike a transductive setup).

A round that cannot be scored (no training normals, or a test set without
normal or without anomalous images, e.g. a class with training images but no
test images) is skipped with a logged warning naming it and the reason, which
is also recorded in the ``skipped`` dict a caller passes; a protocol raises
ValueError only when none of its rounds can be scored.

Protocol names (``PROTOCOLS`` plus ``MVTEC_VARIANTS``): ``leave_one_class_out``,
``one_class``, ``good_vs_defect``, ``mvtec`` and ``mvtec_study``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ssl_ad.errors import UserInputError

log = logging.getLogger(__name__)

__all__ = [
    "Round",
    "UnscoreableRound",
    "leave_one_class_out",
    "one_class",
    "good_vs_defect",
    "good_vs_defect_rounds",
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


class UnscoreableRound(ValueError):
    """A round without training normals, or whose test images are not both normal and anomalous."""


def _check_scoreable(name: str, train_idx: np.ndarray, anomalous: np.ndarray) -> None:
    """UnscoreableRound naming the round and why it cannot be scored."""
    if train_idx.size == 0:
        raise UnscoreableRound(f"Round {name!r}: no training normals (no train image is normal in this round).")
    if anomalous.all() or not anomalous.any():
        n_anom = int(anomalous.sum())
        raise UnscoreableRound(
            f"Round {name!r}: the test split needs both normal and anomalous images; "
            f"it has {anomalous.size - n_anom} normal and {n_anom} anomalous."
        )


def _make_round(name: str, train_idx: np.ndarray, test_is_anomaly: np.ndarray) -> Round:
    """Build a round over the whole test split, checking it is scoreable."""
    test_is_anomaly = np.asarray(test_is_anomaly, dtype=bool)
    _check_scoreable(name, train_idx, test_is_anomaly)
    return Round(
        name=name,
        train_idx=train_idx.astype(np.int64),
        test_idx=np.arange(test_is_anomaly.size, dtype=np.int64),
        test_is_anomaly=test_is_anomaly,
    )


def _collect(
    protocol: str, candidates: Sequence[tuple[str, Callable[[], Round]]], skipped: dict[str, str] | None
) -> list[Round]:
    """Builds every candidate round, skipping (with a warning) those that cannot be scored.

    Raises ValueError, listing every reason, only when no round is left.
    """
    rounds, reasons = [], {}
    for name, build in candidates:
        try:
            rounds.append(build())
        except UnscoreableRound as e:
            reasons[name] = str(e)
            log.warning("protocol %s: round %r skipped: %s", protocol, name, e)
    if skipped is not None:
        skipped.update(reasons)
    if not rounds:
        detail = " ".join(reasons.values()) or "there are no classes."
        raise ValueError(f"no round of protocol {protocol!r} can be scored: {detail}")
    return rounds


def leave_one_class_out(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    class_names: Sequence[str],
    max_train_per_round: int | None = None,
    seed: int = 0,
    skipped: dict[str, str] | None = None,
) -> list[Round]:
    """The original study's setting: round c treats class c as the anomaly.

    Fit on train images of every other class; test on all test images, with
    anomaly = (label == c). Unscoreable rounds are skipped (see the module doc).
    """
    n = len(class_names)
    y_tr = _as_labels(train_labels, n, "train_labels")
    y_te = _as_labels(test_labels, n, "test_labels")
    return _collect("leave_one_class_out", [
        (str(name), lambda c=c, name=name: _make_round(
            str(name), _subsample(np.flatnonzero(y_tr != c), max_train_per_round, seed, c), y_te == c))
        for c, name in enumerate(class_names)
    ], skipped)


def one_class(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    class_names: Sequence[str],
    max_train_per_round: int | None = None,
    seed: int = 0,
    skipped: dict[str, str] | None = None,
) -> list[Round]:
    """One-class setting: round c treats class c as the only normal class.

    Fit on train images of class c; test on all test images, with
    anomaly = (label != c). Unscoreable rounds are skipped (see the module doc).
    """
    n = len(class_names)
    y_tr = _as_labels(train_labels, n, "train_labels")
    y_te = _as_labels(test_labels, n, "test_labels")
    return _collect("one_class", [
        (str(name), lambda c=c, name=name: _make_round(
            str(name), _subsample(np.flatnonzero(y_tr == c), max_train_per_round, seed, c), y_te != c))
        for c, name in enumerate(class_names)
    ], skipped)


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


def good_vs_defect_rounds(
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    class_names: Sequence[str],
    max_train_per_round: int | None = None,
    seed: int = 0,
    skipped: dict[str, str] | None = None,
    normal_class: str = "good",
) -> list[Round]:
    """The industrial layout (``train/good``, ``test/{good,<defect>...}``) as one round.

    Fit on the train images of class ``normal_class``; test on all test
    images, with anomaly = (label != normal_class). Defect classes may exist in
    the test split only. The round is named after the normal class.
    """
    names = [str(c) for c in class_names]
    if normal_class not in names:
        raise ValueError(
            f"protocol 'good_vs_defect' needs a class named {normal_class!r} (the normal one; "
            f"set normal_class to choose another); the classes are {names}."
        )
    g = names.index(normal_class)
    y_tr = _as_labels(train_labels, len(names), "train_labels")
    y_te = _as_labels(test_labels, len(names), "test_labels")
    return _collect("good_vs_defect", [
        (normal_class, lambda: good_vs_defect(
            np.flatnonzero(y_tr == g), y_te != g, normal_class, max_train_per_round, seed))
    ], skipped)


MVTEC_VARIANTS = ("mvtec", "mvtec_study")


def _subset_round(name: str, train_idx: np.ndarray, test_idx: np.ndarray, is_anomaly: np.ndarray) -> Round:
    """A round over a subset ``test_idx`` of the test split, checked to be scoreable."""
    test_idx = np.asarray(test_idx, dtype=np.int64)
    anomalous = np.asarray(is_anomaly, dtype=bool)[test_idx]
    _check_scoreable(name, train_idx, anomalous)
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
    skipped: dict[str, str] | None = None,
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
        return _collect(variant, [
            (str(name), lambda: _subset_round(str(name), train_idx, np.arange(y_te.size), anomalous))
        ], skipped)
    n = len(class_names)
    y_tr = _as_labels(train_labels, n, "train_labels")
    y_te = _as_labels(y_te, n, "test_labels")

    def build(c: int, cname: str) -> Round:
        if variant == "mvtec":
            train_idx = np.flatnonzero(y_tr == c)
            test_idx = np.flatnonzero(y_te == c)
        else:
            train_idx = np.arange(y_tr.size, dtype=np.int64)
            test_idx = np.flatnonzero(~anomalous | (y_te == c))
        return _subset_round(cname, _subsample(train_idx, max_train_per_round, seed, c), test_idx, anomalous)

    return _collect(variant, [(str(cname), lambda c=c, cname=str(cname): build(c, cname))
                              for c, cname in enumerate(class_names)], skipped)


_ProtocolFn = Callable[..., list[Round]]

PROTOCOLS: dict[str, _ProtocolFn] = {
    "leave_one_class_out": leave_one_class_out,
    "one_class": one_class,
    "good_vs_defect": good_vs_defect_rounds,
}


def make_rounds(
    protocol: str,
    train_labels: np.ndarray,
    test_labels: np.ndarray,
    class_names: Sequence[str],
    max_train_per_round: int | None = None,
    seed: int = 0,
    skipped: dict[str, str] | None = None,
    normal_class: str = "good",
) -> list[Round]:
    """Build the rounds of a class-labelled protocol by name (``PROTOCOLS``).

    Unscoreable rounds are skipped and recorded in ``skipped`` (name -> reason);
    ``normal_class`` is the normal class of ``good_vs_defect``. MVTec AD's
    ``mvtec`` / ``mvtec_study`` use :func:`mvtec_rounds`.
    """
    try:
        fn = PROTOCOLS[protocol]
    except KeyError:
        raise ValueError(
            f"Unknown protocol {protocol!r}; valid: {', '.join(sorted(PROTOCOLS))}."
        ) from None
    extra = {"normal_class": normal_class} if fn is good_vs_defect_rounds else {}
    return fn(train_labels, test_labels, class_names, max_train_per_round=max_train_per_round, seed=seed,
              skipped=skipped, **extra)


def rounds_for(
    protocol: str, train: Any, test: Any, config: Any, skipped: dict[str, str] | None = None
) -> list[Round]:
    """The rounds of ``protocol`` for ImageSplits ``train`` / ``test`` under an evaluation ``config``
    (max_train_per_round, seed, normal_class, data.category): a class protocol, or 'mvtec' /
    'mvtec_study' (anomaly = test.is_anomaly).

    Unscoreable rounds are skipped and recorded in ``skipped``; a protocol with no scoreable
    round (or an unknown one) is a UserInputError.
    """
    max_train, seed = int(config.max_train_per_round) or None, int(config.seed)
    if protocol in MVTEC_VARIANTS:
        if test.is_anomaly is None:
            raise UserInputError(
                f"protocol {protocol!r} needs a test split with anomaly labels (e.g. mvtec_ad); {test.name} has none"
            )
        category = str(config.data.get("category", "") or "")
        try:
            return mvtec_rounds(
                train.labels, test.labels, test.is_anomaly, train.class_names, category == "all", protocol,
                name=category or train.name, max_train_per_round=max_train, seed=seed, skipped=skipped,
            )
        except ValueError as e:
            raise UserInputError(f"protocol {protocol!r}: {e}") from None
    if protocol not in PROTOCOLS:
        raise UserInputError(f"unknown protocol {protocol!r}; choose from {sorted(PROTOCOLS) + list(MVTEC_VARIANTS)}")
    try:
        return make_rounds(protocol, train.labels, test.labels, train.class_names, max_train_per_round=max_train,
                           seed=seed, skipped=skipped, normal_class=str(config.get("normal_class", "good")))
    except ValueError as e:
        raise UserInputError(f"protocol {protocol!r}: {e}") from None
