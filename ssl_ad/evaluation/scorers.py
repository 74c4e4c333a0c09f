"""Anomaly scorers over frozen feature vectors.

Every scorer follows one contract so that protocols can treat them alike:

* ``fit(train_features)`` sees only the training *normals* of a round (never
  test data), and returns ``self``;
* ``score(features)`` returns one float per input row, where **higher means
  more anomalous**.

Scorers record human-readable notes about silent adjustments (e.g. PCA dims,
kNN k, k_range or GMM components clamped to the sample count) in
``self.warnings`` so that reports can show them next to the numbers they affect.

The optional PCA (``pca_dims``) is fit on the round's normals; when they are
too few to span more than the kept components, the residual norm (distance
from their span) is kept as one more coordinate, so that no scorer loses the
part of a test feature that no normal has (see :func:`_fit_pca`).

Shared work: the scorers of one round fit the same PCA, the same K-means elbow
and (``gmm`` and ``gmm_kmeans``) the same Gaussian mixture. Given one
:class:`FitCache` (``cache=``), they fit each of these once per round
(:mod:`ssl_ad.evaluation.scoring` makes one per round); without it every scorer
fits its own, with the same numbers.

K-means (Lloyd's iterations) and the Gaussian mixture's EM run in JAX on the
default device (:func:`kmeans_fit`, :func:`gmm_fit`), in float32, with
scikit-learn's initialisation, stopping rules and empty-cluster handling; the
host keeps the k-means++ seeding and the float64 Cholesky factors, and runs EM
in float64 for rounds with fewer than 2 rows per covariance dimension and
component (cheap there, and beyond float32). sklearn's ``KMeans`` /
``GaussianMixture`` are the reference they are tested against.
"""

from __future__ import annotations

import abc
import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from sklearn.cluster import kmeans_plusplus
from sklearn.decomposition import PCA

logger = logging.getLogger(__name__)

_S = TypeVar("_S", bound="Scorer")

__all__ = [
    "Scorer",
    "KMeansScorer",
    "GMMKMeansScorer",
    "GMMScorer",
    "KNNScorer",
    "MahalanobisScorer",
    "MAEReconScorer",
    "SCORERS",
    "Elbow",
    "FitCache",
    "KMeansFit",
    "GaussianMixtureFit",
    "build_scorer",
    "choose_elbow_k",
    "elbow",
    "gmm_fit",
    "kmeans_fit",
    "kmeans_inertias",
    "ledoit_wolf",
]

ELBOW_SAMPLES = 10_000  # default rows the K-means elbow is chosen on (seeded subsample; None/0 = all)
_HIGHEST = jax.lax.Precision.HIGHEST  # full float32 matmuls on GPUs/TPUs too (no TF32 / bf16 passes)


# --------------------------------------------------------------------------
# Input validation and shared steps
# --------------------------------------------------------------------------


def _as_matrix(features: np.ndarray, what: str) -> np.ndarray:
    """Return ``features`` as a finite 2-D float64 array or raise ValueError (no copy if already float64)."""
    x = np.asarray(features)
    if x.ndim != 2:
        raise ValueError(f"{what} must be a 2-D array (n_samples, n_features); got shape {x.shape}.")
    if x.shape[1] < 1:
        raise ValueError(f"{what} must have at least one feature column; got shape {x.shape}.")
    x = x.astype(np.float64, copy=False)
    if not np.all(np.isfinite(x)):
        bad = int(np.sum(~np.isfinite(x).all(axis=1)))
        raise ValueError(f"{what} contains NaN or Inf values in {bad} row(s).")
    return x


class FitCache:
    """Memo of the fits that several scorers of one round share (PCA, projections, K-means, elbow, GMM).

    An entry is keyed by the *identity* of its input arrays (``id``) plus its settings, so
    scorers share a fit only when they are given the very same array object (as
    :func:`ssl_ad.evaluation.scoring.score_feature_set` does: one float64 train and one test
    matrix per round). The cache holds a reference to every keyed input, so an id cannot be
    reused while the entry lives; :meth:`clear` drops everything (call it after each round).
    A computation that raises is not stored.
    """

    def __init__(self) -> None:
        self._memo: dict[tuple, Any] = {}
        self._held: list[Any] = []
        self.hits = 0

    def get(self, inputs: Sequence[Any], settings: tuple[Hashable, ...], compute: Callable[[], Any]) -> Any:
        """``compute()`` once per (identity of each of ``inputs``, ``settings``); later calls return it."""
        key = tuple(id(a) for a in inputs) + tuple(settings)
        if key in self._memo:
            self.hits += 1
            return self._memo[key]
        value = compute()
        self._memo[key] = value
        self._held.extend(inputs)
        return value

    def clear(self) -> None:
        self._memo.clear()
        self._held.clear()


RESIDUAL_MODES = ("auto", "always", "never")


class _Projection:
    """PCA fit on a round's training normals, optionally plus the residual norm as one more coordinate.

    ``transform(x)`` returns the coordinates in the kept basis and, with ``residual``, appends
    ``||c - B^T B c||`` (``c`` = ``x`` minus the training mean, or ``x`` itself when
    ``centred=False``, as cosine kNN projects without centring): the distance of the point from
    the subspace, i.e. the squared prediction error (SPE / Q statistic) of PCA-based monitoring
    (Jackson & Mudholkar, 1979, Technometrics 21(3)) and the out-of-subspace term of
    probabilistic PCA (Tipping & Bishop, 1999, JRSS-B 61(3)), which PCA alone throws away.

    ``base``: the centred projection with the same basis; an uncentred one without the residual
    is then ``base.transform(x) + mean B^T`` (x B^T to rounding), so that a round's centred and
    uncentred scorers share one matrix product per input.
    """

    def __init__(self, pca: PCA | None, basis: np.ndarray, mean: np.ndarray | None, residual: bool,
                 base: _Projection | None = None) -> None:
        self.pca, self.basis, self.mean, self.residual = pca, basis, mean, residual
        self.base = base
        self.shift = None if base is None else base.mean @ basis.T

    @property
    def dims(self) -> int:
        return int(self.basis.shape[0]) + int(self.residual)

    def transform(self, x: np.ndarray, base_z: np.ndarray | None = None) -> np.ndarray:
        """(n, dims) coordinates of ``x`` (n, d); ``base_z`` = ``self.base.transform(x)`` if known."""
        if self.base is not None:
            return (self.base.transform(x) if base_z is None else base_z) + self.shift
        if self.mean is not None and self.pca is not None:
            z = self.pca.transform(x)  # sklearn's own arithmetic: unchanged numbers without the residual
        else:
            z = (x if self.mean is None else x - self.mean) @ self.basis.T
        if not self.residual:
            return z
        c = x if self.mean is None else x - self.mean
        r = np.linalg.norm(c - z @ self.basis, axis=1)
        return np.concatenate([z, r[:, None]], axis=1)


def _fit_pca(
    x: np.ndarray,
    pca_dims: int | None,
    seed: int,
    notes: list[str],
    residual: str = "auto",
    centred: bool = True,
    cache: FitCache | None = None,
) -> _Projection | None:
    """Fit PCA with dims clamped to what the data supports (None = no PCA), keeping the residual.

    PCA cannot have more components than ``min(n_samples - 1, n_features)``
    meaningful directions, so a request above that is clamped and noted. When only the feature
    width limits it (``n_features <= n_samples - 1``) the note says that every dimension is kept,
    in words that do not depend on the round, so a run logs the fact once (``cli.SayOnce``).

    ``residual`` says when the residual norm (distance from the kept subspace, see
    :class:`_Projection`) is appended as one more coordinate:

    * ``'auto'`` (default): when the round has too few normals for the projection to be a
      reduction, ``pca_dims >= n_samples - 1 < n_features``. The kept components then span the
      normals' whole affine hull, so the projection drops nothing of the normals and only the
      part of a test point outside their span, which is exactly where a novel anomaly lies (a
      bar where no training image has one). Every training normal has residual 0, so
      ``[z, r]`` preserves every Euclidean distance to a training normal or to any mean of
      them (kNN-L2, K-means centroids) exactly; for cosine kNN the basis is the span of the
      *uncentred* normals, so norms and dot products with them are preserved exactly too. With
      more normals (e.g. the demo's 2,000 per round at 100 dims) nothing changes.
    * ``'always'``: every round (the PCA T^2 + Q practice);
    * ``'never'``: plain PCA (the original study's recipe).

    With a ``cache``, scorers given the same ``x`` share one fit (sklearn's ``PCA``, seeded
    with ``seed``; centred and uncentred projections share it) and one :class:`_Projection`
    object per setting. Raises ValueError for ``pca_dims < 1`` or an unknown ``residual``.
    """
    if pca_dims is None:
        return None
    if pca_dims < 1:
        raise ValueError(f"pca_dims must be a positive int or None; got {pca_dims}.")
    if residual not in RESIDUAL_MODES:
        raise ValueError(f"pca_residual must be one of {RESIDUAL_MODES}; got {residual!r}.")
    cache = cache if cache is not None else FitCache()
    n, d = x.shape
    limit = min(n - 1, d)
    dims = min(pca_dims, limit)
    if dims < pca_dims and d <= n - 1:  # only the feature width limits it: the same fact every round
        notes.append(f"pca_dims {pca_dims} is at least the feature width {d}: PCA keeps all {d} dimensions "
                     "(a rotation; nothing is dropped).")
    elif dims < pca_dims:
        notes.append(f"pca_dims clamped from {pca_dims} to {dims} (n_samples={n}, n_features={d}).")
    spans_all = pca_dims >= n - 1 and n - 1 < d  # the components would be the normals' whole span
    keep = dims < d and (residual == "always" or (residual == "auto" and spans_all))
    if keep and residual == "auto":
        notes.append(
            f"PCA keeps the residual norm as one more dimension: the {n} training normals span only "
            f"{n - 1} of {d} dimensions, so a plain projection would drop everything outside their span "
            "(pca_residual='auto')."
        )
    if not centred and keep and spans_all:

        def uncentred_span() -> _Projection:
            _, s, vt = np.linalg.svd(x, full_matrices=False)  # the span of the uncentred normals
            rank = int(np.sum(s > s[0] * max(x.shape) * np.finfo(np.float64).eps)) if s.size and s[0] > 0 else 0
            return _Projection(None, vt[: max(rank, 1)], None, True)

        return cache.get((x,), ("uncentred_span",), uncentred_span)

    def projection(centred: bool, keep: bool) -> _Projection:
        pca = cache.get((x,), ("pca", dims, seed), lambda: PCA(n_components=dims, random_state=seed).fit(x))
        if not centred and not keep:  # x B^T = (x - mean) B^T + mean B^T: shares the centred product
            return _Projection(pca, pca.components_, None, False, base=get(True, False))
        return _Projection(pca, pca.components_, pca.mean_ if centred else None, keep)

    def get(centred: bool, keep: bool) -> _Projection:
        return cache.get((x,), ("projection", dims, seed, keep, centred), lambda: projection(centred, keep))

    return get(centred, keep)


def _project(pca: _Projection | None, x: np.ndarray, cache: FitCache | None = None) -> np.ndarray:
    """``x`` in the projection's coordinates (memoised per (projection, x) in ``cache``)."""
    if pca is None:
        return x
    if cache is None:
        return pca.transform(x)
    base_z = None if pca.base is None else _project(pca.base, x, cache)
    return cache.get((pca, x), ("transform",), lambda: pca.transform(x, base_z))


def _clamp_k_range(k_range: tuple[int, int], n_samples: int, notes: list[str]) -> tuple[int, int]:
    """Clamp an inclusive ``(k_min, k_max)`` range so that k never exceeds n_samples."""
    k_min, k_max = int(k_range[0]), int(k_range[1])
    if k_min < 1 or k_max < k_min:
        raise ValueError(f"k_range must be (k_min, k_max) with 1 <= k_min <= k_max; got {k_range}.")
    if k_max > n_samples:
        notes.append(f"k_range {k_range} clamped to k <= n_samples={n_samples}.")
        k_max = n_samples
        k_min = min(k_min, k_max)
    return k_min, k_max


# --------------------------------------------------------------------------
# Rows on the device
# --------------------------------------------------------------------------


def _bucket(n: int) -> int:
    """Rows padded to a multiple of 2^(bit_length(n) - 4) (>= 256): at most 1/8 extra, and rounds
    of nearly equal size share one compiled program."""
    step = max(256, 1 << max(int(n).bit_length() - 4, 0))
    return -(-n // step) * step


@dataclasses.dataclass(frozen=True)
class _DeviceRows:
    """Rows centred on their mean (float64 on the host), float32 on the device, zero-padded.

    ``x`` (n_pad, d) and ``w`` (n_pad,) (1 = a real row, 0 = padding); ``offset`` (d,) the
    float64 mean subtracted; ``n`` the real rows; ``host`` the centred float64 rows (n, d).
    """

    x: jax.Array
    w: jax.Array
    offset: np.ndarray
    host: np.ndarray
    n: int

    @staticmethod
    def of(x: np.ndarray) -> _DeviceRows:
        x = np.asarray(x, dtype=np.float64)
        offset = x.mean(axis=0)
        host = x - offset
        n = x.shape[0]
        pad = _bucket(n) - n
        w = np.r_[np.ones(n, np.float32), np.zeros(pad, np.float32)]
        padded = np.pad(host.astype(np.float32), ((0, pad), (0, 0)))
        return _DeviceRows(jnp.asarray(padded), jnp.asarray(w), offset, host, n)


# --------------------------------------------------------------------------
# K-means: Lloyd's iterations in JAX
# --------------------------------------------------------------------------


@jax.jit
def _lloyd(
    x: jax.Array, w: jax.Array, centers: jax.Array, valid: jax.Array, tol: jax.Array, max_iter: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Lloyd's algorithm as sklearn's ``_kmeans_single_lloyd`` runs it; returns (centers, labels, n_iter).

    ``x`` (n, d) rows, ``w`` (n,) weights (0 = padding), ``centers`` (K, d) the seeds with
    ``valid`` (K,) marking the real ones (padding centres are never nearest). One iteration
    assigns every row to its nearest centre and moves each centre to the weighted mean of its
    rows; a centre left without rows is moved to the row farthest from its own centre (the
    farthest first), as sklearn's ``_relocate_empty_clusters_dense``. It stops when no label
    changes (strict convergence), when the summed squared centre shift is <= ``tol``, or after
    ``max_iter`` iterations. The labels returned are those of the final centres.
    """
    n_centers = centers.shape[0]
    x_sq = jnp.sum(x * x, axis=1)
    ids = jnp.arange(n_centers)

    def assign(c):
        d2 = x_sq[:, None] - 2.0 * jnp.matmul(x, c.T, precision=_HIGHEST) + jnp.sum(c * c, axis=1)[None, :]
        return jnp.argmin(jnp.where(valid[None, :], d2, jnp.inf), axis=1).astype(jnp.int32)

    def update(c, labels):
        onehot = (labels[:, None] == ids[None, :]).astype(x.dtype) * w[:, None]
        counts = jnp.sum(onehot, axis=0)
        sums = jnp.matmul(onehot.T, x, precision=_HIGHEST)
        empty = valid & (counts == 0)

        def relocate(state):
            sums, counts = state
            dist = jnp.sum((x - c[labels]) ** 2, axis=1) * w  # padding rows: 0, never picked
            _, far = jax.lax.top_k(dist, n_centers)
            rank = jnp.clip(jnp.cumsum(empty) - 1, 0, n_centers - 1)
            p = far[rank]  # the row each empty centre takes (ignored where not empty)
            wp = jnp.where(empty, w[p], 0.0)
            sums = sums.at[labels[p]].add(-x[p] * wp[:, None])
            counts = counts.at[labels[p]].add(-wp)
            return jnp.where(empty[:, None], x[p] * wp[:, None], sums), jnp.where(empty, wp, counts)

        sums, counts = jax.lax.cond(jnp.any(empty), relocate, lambda s: s, (sums, counts))
        filled = counts > 0
        return jnp.where(filled[:, None], sums / jnp.where(filled, counts, 1.0)[:, None], c)

    def cond(state):
        _, _, i, done = state
        return (~done) & (i < max_iter)

    def body(state):
        c, labels_old, i, _ = state
        labels = assign(c)
        new = update(c, labels)
        shift = jnp.sum(jnp.where(valid[:, None], (new - c) ** 2, 0.0))
        return new, labels, i + 1, jnp.all(labels == labels_old) | (shift <= tol)

    init = (centers, jnp.full(x.shape[:1], -1, jnp.int32), jnp.asarray(0, jnp.int32), jnp.asarray(False))
    centers, _, n_iter, _ = jax.lax.while_loop(cond, body, init)
    return centers, assign(centers), n_iter


@dataclasses.dataclass
class KMeansFit:
    """A fitted K-means model (attribute names as sklearn's ``KMeans``).

    ``cluster_centers_`` (k, d) float64, ``labels_`` (n,) int, ``inertia_`` the weighted sum of
    squared distances of the rows to their centre (float64, in the input's units squared),
    ``n_iter_`` Lloyd iterations of the kept run.
    """

    cluster_centers_: np.ndarray
    labels_: np.ndarray
    inertia_: float
    n_iter_: int

    def transform(self, x: np.ndarray) -> np.ndarray:
        """(n, k) Euclidean distances of the rows of ``x`` (n, d) to every centre, in float64."""
        x = np.asarray(x, dtype=np.float64)
        return np.stack([np.linalg.norm(x - c, axis=1) for c in self.cluster_centers_], axis=1)


def kmeans_fit(
    x: np.ndarray | _DeviceRows,
    k: int,
    seed: int,
    n_init: int = 1,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> KMeansFit:
    """K-means with k-means++ seeding, as ``sklearn.cluster.KMeans(k, n_init=n_init, random_state=seed)``.

    ``x`` (n, d) rows (or rows already on the device). The rows are centred on their mean
    (as sklearn does); each of ``n_init`` runs is seeded by sklearn's ``kmeans_plusplus``
    (Arthur & Vassilvitskii, 2007) on the host in float64, drawing from one
    ``RandomState(seed)`` in turn, exactly as ``KMeans`` does, and iterated by :func:`_lloyd`
    (Lloyd, 1982) in float32 on the default JAX device with sklearn's tolerance
    (``tol`` x the mean per-feature variance) and ``max_iter``. The run with the lowest inertia
    is kept. Raises ValueError unless 1 <= k <= n.
    """
    rows = x if isinstance(x, _DeviceRows) else _DeviceRows.of(x)
    if not 1 <= k <= rows.n:
        raise ValueError(f"k-means needs 1 <= k <= n_samples={rows.n}; got k={k}.")
    tol_abs = float(np.mean(np.var(rows.host, axis=0)) * tol)
    n_centers = max(8, -(-k // 8) * 8)  # one compiled program for every k up to 8, 16, ...
    valid = jnp.asarray(np.arange(n_centers) < k)
    random_state = np.random.RandomState(seed)
    best: KMeansFit | None = None
    for _ in range(n_init):
        seeds, _ = kmeans_plusplus(rows.host, k, random_state=random_state)
        padded = np.zeros((n_centers, rows.host.shape[1]), np.float32)
        padded[:k] = seeds
        centers, labels, n_iter = _lloyd(rows.x, rows.w, jnp.asarray(padded), valid, tol_abs, max_iter)
        centers = np.asarray(centers, dtype=np.float64)[:k]
        labels = np.asarray(labels)[: rows.n].astype(np.int64)
        inertia = float(np.sum((rows.host - centers[labels]) ** 2))
        if best is None or inertia < best.inertia_:
            best = KMeansFit(centers + rows.offset, labels, inertia, int(n_iter))
    assert best is not None
    return best


# --------------------------------------------------------------------------
# Elbow selection
# --------------------------------------------------------------------------


def kmeans_inertias(
    x: np.ndarray, k_range: tuple[int, int], seed: int, n_init: int, cache: FitCache | None = None
) -> tuple[dict[int, float], dict[int, KMeansFit]]:
    """Fit K-means (:func:`kmeans_fit`) for every k in the inclusive ``k_range``; return inertias and models.

    ``x`` (n, d); inertias in squared input units. With ``cache`` each fit is shared by
    every caller with the same ``x``, k, seed and n_init.
    """
    cache = cache if cache is not None else FitCache()
    rows = cache.get((x,), ("device_rows",), lambda: _DeviceRows.of(x))
    models = {
        k: cache.get((x,), ("kmeans", k, seed, n_init), lambda k=k: kmeans_fit(rows, k, seed, n_init))
        for k in range(k_range[0], k_range[1] + 1)
    }
    return {k: m.inertia_ for k, m in models.items()}, models


def choose_elbow_k(inertias: Mapping[int, float]) -> int:
    """Pick k at the elbow of an inertia curve ("kneedle" / max distance to chord).

    Rule (deterministic): normalise k and inertia to [0, 1] so that the curve
    runs from (0, 1) to (1, 0); the chord joining the first and last points is
    then ``x + y = 1``. The elbow is the k whose point lies furthest *below*
    that chord, i.e. maximises ``1 - x - y`` (proportional to the
    perpendicular distance). Ties go to the smallest k. If no point lies below
    the chord (fewer than 3 ks, a flat/increasing curve, or a straight line)
    the smallest k is returned, as there is no evidence for more clusters.
    (Satopää et al., 2011, "Finding a 'Kneedle' in a Haystack".)
    """
    if not inertias:
        raise ValueError("inertias is empty.")
    ks = np.array(sorted(inertias), dtype=np.float64)
    y = np.array([inertias[int(k)] for k in ks], dtype=np.float64)
    if len(ks) < 3:
        return int(ks[0])
    span = y[0] - y[-1]
    if not span > 0:
        return int(ks[0])
    x_n = (ks - ks[0]) / (ks[-1] - ks[0])
    y_n = (y - y[-1]) / span
    below = 1.0 - x_n - y_n
    best = int(np.argmax(below))
    if below[best] <= 1e-12:
        return int(ks[0])
    return int(ks[best])


@dataclasses.dataclass(frozen=True)
class Elbow:
    """An elbow choice: ``k``, the ``inertias`` it was read from (k -> inertia on the rows it ran
    on), and ``n_samples``, how many rows that was (the seeded subsample, or all)."""

    k: int
    inertias: dict[int, float]
    n_samples: int


def _subsample_rows(n: int, max_samples: int | None, seed: int) -> np.ndarray | None:
    """Sorted indices of a seeded subsample of ``max_samples`` of ``n`` rows (None: use all)."""
    if not max_samples or n <= max_samples:
        return None
    return np.sort(np.random.default_rng(seed).choice(n, size=int(max_samples), replace=False))


def elbow(
    x: np.ndarray,
    k_range: tuple[int, int],
    seed: int,
    n_init: int,
    notes: list[str],
    max_samples: int | None = ELBOW_SAMPLES,
    cache: FitCache | None = None,
) -> Elbow:
    """k by the elbow rule (:func:`choose_elbow_k`) on at most ``max_samples`` rows of ``x`` (n, d).

    The K-means curve over ``k_range`` (clamped to the rows, noted) is fit on a seeded
    subsample (``numpy.random.default_rng(seed).choice`` without replacement) when ``x`` has
    more than ``max_samples`` rows (None or 0 = all rows), which is noted; the caller then fits
    its model at that k on all rows once. Raises ValueError for a bad ``k_range``.
    """
    cache = cache if cache is not None else FitCache()
    idx = _subsample_rows(x.shape[0], max_samples, seed)
    if idx is not None:
        notes.append(f"elbow k chosen on a seeded subsample of {len(idx):,} training normals (elbow_samples).")
    k_range = _clamp_k_range(k_range, x.shape[0] if idx is None else len(idx), notes)

    def compute() -> Elbow:
        rows = x if idx is None else cache.get((x,), ("subsample", len(idx), seed), lambda: x[idx])
        inertias, _ = kmeans_inertias(rows, k_range, seed, n_init, cache)
        return Elbow(choose_elbow_k(inertias), inertias, rows.shape[0])

    return cache.get((x,), ("elbow", k_range, seed, n_init, None if idx is None else len(idx)), compute)


def _fit_elbow_kmeans(
    z: np.ndarray,
    k_range: tuple[int, int],
    seed: int,
    n_init: int,
    notes: list[str],
    max_samples: int | None = ELBOW_SAMPLES,
    cache: FitCache | None = None,
) -> tuple[Elbow, KMeansFit]:
    """The elbow k (on at most ``max_samples`` rows) and K-means at that k fit on all of ``z``."""
    cache = cache if cache is not None else FitCache()
    chosen = elbow(z, k_range, seed, n_init, notes, max_samples, cache)
    model = cache.get((z,), ("kmeans", chosen.k, seed, n_init), lambda: kmeans_fit(
        cache.get((z,), ("device_rows",), lambda: _DeviceRows.of(z)), chosen.k, seed, n_init))
    return chosen, model


def _resolve_n_components(
    z: np.ndarray,
    n_components: int | None,
    k_range: tuple[int, int],
    seed: int,
    n_init: int,
    notes: list[str],
    max_samples: int | None = ELBOW_SAMPLES,
    cache: FitCache | None = None,
) -> tuple[int, Elbow | None]:
    """GMM size: a fixed int (clamped to n_samples) or, if None, the K-means elbow k."""
    n = z.shape[0]
    if n_components is None:
        chosen = elbow(z, k_range, seed, n_init, notes, max_samples, cache)
        return chosen.k, chosen
    if n_components < 1:
        raise ValueError(f"n_components must be >= 1 or None; got {n_components}.")
    if n_components > n:
        notes.append(f"n_components clamped from {n_components} to n_samples={n}.")
    return min(int(n_components), n), None


# --------------------------------------------------------------------------
# Gaussian mixture: EM in JAX (float64 numpy for small rounds)
# --------------------------------------------------------------------------

COVARIANCE_TYPES = ("full", "tied", "diag", "spherical")


@dataclasses.dataclass(frozen=True)
class _Ops:
    """The array operations one EM step needs: JAX on the default device, or NumPy on the host."""

    xp: Any
    map: Callable[[Callable, tuple], Any]  # f over the leading axis of a tuple of arrays, stacked
    logsumexp: Callable[..., Any]
    matmul: Callable[[Any, Any], Any]


_JAX_OPS = _Ops(jnp, lambda f, xs: jax.lax.map(f, xs), jax.scipy.special.logsumexp,
                functools.partial(jnp.matmul, precision=_HIGHEST))
_NUMPY_OPS = _Ops(np, lambda f, xs: np.stack([f(t) for t in zip(*xs)]), scipy.special.logsumexp, np.matmul)


def _weighted_log_prob(ops: _Ops, x, means, prec_chol, log_det, log_weights):
    """(n, k) ``log w_j + log N(x_i | mu_j, Sigma_j)`` from ``prec_chol`` (k, d, d) with
    ``Sigma_j^-1 = P_j P_j^T`` and ``log_det`` (k,) = ``log det P_j`` (sklearn's
    ``_estimate_log_gaussian_prob`` for 'full'; the other types arrive as full P)."""

    def mahalanobis_sq(args):
        mu, p = args
        y = ops.matmul(x - mu, p)
        return ops.xp.sum(y * y, axis=1)

    maha = ops.map(mahalanobis_sq, (means, prec_chol))  # (k, n): one (n, d) block at a time
    log_prob = -0.5 * (x.shape[1] * math.log(2.0 * math.pi) + maha) + log_det[:, None]
    return (log_prob + log_weights[:, None]).T


def _log_likelihood(ops: _Ops, x, means, prec_chol, log_det, log_weights):
    """(n,) ``log p(x_i)`` under the mixture (logsumexp of :func:`_weighted_log_prob`)."""
    return ops.logsumexp(_weighted_log_prob(ops, x, means, prec_chol, log_det, log_weights), axis=1)


def _m_step(ops: _Ops, x, resp):
    """Weighted counts (k,), means (k, d) and centred scatter / count (k, d, d) of rows ``x`` (n, d)
    under responsibilities ``resp`` (n, k) (sklearn's ``_estimate_gaussian_parameters``,
    'full', without ``reg_covar``; padding rows have resp 0)."""
    nk = ops.xp.sum(resp, axis=0) + 10 * ops.xp.finfo(x.dtype).eps
    means = ops.matmul(resp.T, x) / nk[:, None]

    def scatter(args):
        mu, r = args
        a = (x - mu) * ops.xp.sqrt(r)[:, None]
        return ops.matmul(a.T, a)  # A^T A: NumPy hands it to BLAS syrk

    return nk, means, ops.map(scatter, (means, resp.T)) / nk[:, None, None]


def _em_step(ops: _Ops, x, w, means, prec_chol, log_det, log_weights):
    """One EM iteration: E-step under the current parameters, then the M-step statistics.

    Returns (per-row ``log p(x_i)`` (n,), counts, means, covariances) as :func:`_m_step`.
    """
    wlp = _weighted_log_prob(ops, x, means, prec_chol, log_det, log_weights)
    log_norm = ops.logsumexp(wlp, axis=1)
    resp = ops.xp.exp(wlp - log_norm[:, None]) * w[:, None]
    return (log_norm, *_m_step(ops, x, resp))


# (log_likelihood, m_step, em_step) per backend: jitted on the device, plain NumPy float64 on the host
_EM = {
    True: tuple(jax.jit(functools.partial(f, _JAX_OPS)) for f in (_log_likelihood, _m_step, _em_step)),
    False: tuple(functools.partial(f, _NUMPY_OPS) for f in (_log_likelihood, _m_step, _em_step)),
}


def _em_on_device(n: int, d: int, k: int) -> bool:
    """EM runs on the device in float32 when the round has at least 2 rows per covariance
    dimension and component (n >= 2 k (d + 1)); fewer rows leave (nearly) rank-deficient
    scatters, whose regularised inverses float32 cannot carry, and are cheap in float64 on the host."""
    return n >= 2 * k * (d + 1)


def _precision_cholesky(nk: np.ndarray, covs: np.ndarray, covariance_type: str, reg_covar: float
                        ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(covariances as full (k, d, d), their precision Cholesky factors P (k, d, d), log det P (k,)),
    in float64 on the host, from full scatters ``covs`` (k, d, d) reduced to ``covariance_type``
    plus ``reg_covar`` on the diagonal (sklearn's ``_estimate_gaussian_covariances_*`` and
    ``_compute_precision_cholesky``); eigenvalues a float32 scatter rounded below 0 are clipped to 0
    first. Raises ValueError when a covariance is not positive definite."""
    covs = np.asarray(covs, dtype=np.float64)
    k, d, _ = covs.shape
    eye = np.eye(d)
    if covariance_type == "full":
        full = covs.copy()
    elif covariance_type == "tied":
        nk = np.asarray(nk, dtype=np.float64)
        full = np.broadcast_to(np.tensordot(nk, covs, axes=1) / nk.sum(), covs.shape).copy()
    elif covariance_type == "diag":
        full = np.diagonal(covs, axis1=1, axis2=2)[:, :, None] * eye
    elif covariance_type == "spherical":
        full = np.diagonal(covs, axis1=1, axis2=2).mean(axis=1)[:, None, None] * eye
    else:
        raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}; got {covariance_type!r}.")
    full += reg_covar * eye
    prec = np.empty_like(full)
    for j in range(k):
        try:
            try:
                chol = scipy.linalg.cholesky(full[j], lower=True)
            except np.linalg.LinAlgError:
                # a float32 scatter of a nearly singular component: rounding (~1e-7 of its largest
                # eigenvalue) can leave it slightly indefinite where float64 would not; clip that to 0
                # and add reg_covar again (a truly singular one with reg_covar=0 still fails).
                vals, vecs = np.linalg.eigh(full[j] - reg_covar * eye)
                full[j] = (vecs * np.maximum(vals, 0.0)) @ vecs.T + reg_covar * eye
                chol = scipy.linalg.cholesky(full[j], lower=True)
        except np.linalg.LinAlgError as err:
            raise ValueError(
                "Fitting the mixture model failed because some components have ill-defined empirical "
                "covariance (for instance caused by singleton or collapsed samples). Try to decrease the "
                "number of components, or increase reg_covar."
            ) from err
        prec[j] = scipy.linalg.solve_triangular(chol, eye, lower=True).T
    return full, prec, np.sum(np.log(np.diagonal(prec, axis1=1, axis2=2)), axis=1)


@dataclasses.dataclass
class GaussianMixtureFit:
    """A fitted Gaussian mixture (attribute names as sklearn's ``GaussianMixture``).

    ``weights_`` (k,), ``means_`` (k, d), ``covariances_`` (k, d, d) (every covariance type as
    full matrices, ``reg_covar`` included), ``precisions_cholesky_`` (k, d, d), float64;
    ``converged_``, ``n_iter_``, ``lower_bound_`` (mean log-likelihood per training row, nats);
    ``on_device``: whether EM ran (and scoring runs) on the JAX device in float32, else in
    float64 on the host (:func:`gmm_fit`).
    """

    weights_: np.ndarray
    means_: np.ndarray
    covariances_: np.ndarray
    precisions_cholesky_: np.ndarray
    converged_: bool
    n_iter_: int
    lower_bound_: float
    on_device: bool = True

    def score_samples(self, x: np.ndarray) -> np.ndarray:
        """(n,) log-likelihood ``log p(x_i)`` (nats) of the rows of ``x`` (n, d)."""
        x = np.asarray(x, dtype=np.float64)
        if x.shape[0] == 0:
            return np.zeros((0,), np.float64)
        offset = np.sum(self.weights_[:, None] * self.means_, axis=0)  # centre: float32 accuracy
        log_det = np.sum(np.log(np.diagonal(self.precisions_cholesky_, axis1=1, axis2=2)), axis=1)
        args = (self.means_ - offset, self.precisions_cholesky_, log_det, np.log(self.weights_))
        if not self.on_device:
            return _EM[False][0](x - offset, *args)
        n = x.shape[0]
        rows = np.pad(x - offset, ((0, _bucket(n) - n), (0, 0)))  # few compiled shapes
        log_lik = _EM[True][0](*(jnp.asarray(a.astype(np.float32)) for a in (rows, *args)))
        return np.asarray(log_lik, dtype=np.float64)[:n]


def gmm_fit(
    x: np.ndarray | _DeviceRows,
    n_components: int,
    covariance_type: str = "full",
    reg_covar: float = 1e-6,
    seed: int = 0,
    tol: float = 1e-3,
    max_iter: int = 100,
    init_labels: np.ndarray | None = None,
    on_device: bool | None = None,
) -> GaussianMixtureFit:
    """EM for a Gaussian mixture as ``sklearn.mixture.GaussianMixture(n_components, covariance_type,
    reg_covar=reg_covar, random_state=seed)`` fits it (Dempster, Laird & Rubin, 1977).

    ``x`` (n, d) rows (or rows already on the device). Initialisation: hard responsibilities
    from K-means labels (``init_labels`` (n,), else :func:`kmeans_fit` with ``n_init=1`` and
    ``seed``, the clustering sklearn's ``init_params='kmeans'`` uses), then the M-step. Each
    iteration (E-step and M-step) runs on the rows centred on their mean: on the default JAX
    device in float32 when ``on_device`` (None: when the round is large enough for float32,
    :func:`_em_on_device`), else in float64 NumPy on the host. The covariances are reduced to
    ``covariance_type``, regularised by ``reg_covar`` and factorised in float64 on the host. It
    stops when the mean log-likelihood changes by less than ``tol`` between iterations, or after
    ``max_iter`` (``converged_`` False). Raises ValueError for a covariance that is not positive
    definite, an unknown ``covariance_type`` or ``n_components`` outside [1, n].
    """
    if covariance_type not in COVARIANCE_TYPES:
        raise ValueError(f"covariance_type must be one of {COVARIANCE_TYPES}; got {covariance_type!r}.")
    rows = x if isinstance(x, _DeviceRows) else _DeviceRows.of(x)
    if not 1 <= n_components <= rows.n:
        raise ValueError(f"a mixture needs 1 <= n_components <= n_samples={rows.n}; got {n_components}.")
    if init_labels is None:
        init_labels = kmeans_fit(rows, n_components, seed, n_init=1).labels_
    if on_device is None:
        on_device = _em_on_device(rows.n, rows.host.shape[1], n_components)
    _, m_step, em_step = _EM[on_device]
    if on_device:
        data, w, dtype, put = rows.x, rows.w, np.float32, jnp.asarray
        labels = np.full(rows.x.shape[0], -1)
        labels[: rows.n] = init_labels
    else:
        data, w, dtype, put = rows.host, np.ones(rows.n), np.float64, np.asarray
        labels = np.asarray(init_labels)
    resp = put((labels[:, None] == np.arange(n_components)[None, :]).astype(dtype))

    def parameters(nk, means, covs):
        nk = np.asarray(nk, dtype=np.float64)
        full, prec, log_det = _precision_cholesky(nk, covs, covariance_type, reg_covar)
        return nk / nk.sum(), np.asarray(means, dtype=np.float64), full, prec, log_det

    weights, means, full, prec, log_det = parameters(*m_step(data, resp))
    lower, converged, n_iter = -np.inf, False, 0
    for n_iter in range(1, max_iter + 1):
        previous = lower
        log_norm, nk, new_means, covs = em_step(
            data, w, *(put(a.astype(dtype)) for a in (means, prec, log_det, np.log(weights))))
        lower = float(np.mean(np.asarray(log_norm)[: rows.n], dtype=np.float64))
        weights, means, full, prec, log_det = parameters(nk, new_means, covs)
        if abs(lower - previous) < tol:
            converged = True
            break
    return GaussianMixtureFit(weights, means + rows.offset, full, prec, converged, n_iter, lower, on_device)


# --------------------------------------------------------------------------
# Scorer base class
# --------------------------------------------------------------------------


class Scorer(abc.ABC):
    """Common fit/score contract: fit on training normals, higher score = more anomalous.

    ``cache``: a :class:`FitCache` shared with the round's other scorers (None: a private one
    for the duration of ``fit``); it changes which fits are reused, never the numbers.
    """

    def __init__(self, cache: FitCache | None = None) -> None:
        self.warnings: list[str] = []
        self._n_features: int | None = None
        self.cache = cache
        self._cache: FitCache | None = None  # the cache in use while fitting / scoring

    def fit(self: _S, train_features: np.ndarray) -> _S:
        """Fit on training normals only. Raises ValueError on < 2 rows or NaN/Inf."""
        x = _as_matrix(train_features, "train_features")
        if x.shape[0] < 2:
            raise ValueError(f"fit needs at least 2 training samples; got {x.shape[0]}.")
        self.warnings = []
        self._cache = self.cache if self.cache is not None else FitCache()
        try:
            self._fit(x)
        finally:
            if self.cache is None:
                self._cache.clear()
                self._cache = None  # a private cache must not keep the training rows alive
        self._n_features = x.shape[1]
        for note in self.warnings:  # a round's scorers share their fits: each fact is logged once (cli.SayOnce)
            logger.warning("%s", note)
        return self

    def score(self, features: np.ndarray) -> np.ndarray:
        """Return one anomaly score per row of ``features`` (higher = more anomalous)."""
        if self._n_features is None:
            raise RuntimeError(f"{type(self).__name__}.score called before fit.")
        x = _as_matrix(features, "features")
        if x.shape[1] != self._n_features:
            raise ValueError(
                f"features have {x.shape[1]} columns but the scorer was fit on {self._n_features}."
            )
        if x.shape[0] == 0:
            return np.zeros((0,), dtype=np.float64)
        return np.asarray(self._score(x), dtype=np.float64)

    def _project(self, x: np.ndarray) -> np.ndarray:
        """``x`` through the fitted PCA (``self._pca``), memoised in the shared cache if any."""
        return _project(self._pca, x, self._cache)

    @abc.abstractmethod
    def _fit(self, x: np.ndarray) -> None:
        """Fit on validated float64 training features."""

    @abc.abstractmethod
    def _score(self, x: np.ndarray) -> np.ndarray:
        """Score validated float64 features."""


# --------------------------------------------------------------------------
# Clustering / density scorers
# --------------------------------------------------------------------------


def _shared_gmm(cache: FitCache, z: np.ndarray, n_components: int, covariance_type: str, reg_covar: float,
                seed: int) -> GaussianMixtureFit:
    """The round's mixture on ``z`` (``gmm`` and ``gmm_kmeans`` fit the same one), initialised from
    the shared K-means fit at ``n_components`` with ``n_init=1`` (sklearn's GMM initialisation)."""

    def compute() -> GaussianMixtureFit:
        rows = cache.get((z,), ("device_rows",), lambda: _DeviceRows.of(z))
        init = cache.get((z,), ("kmeans", n_components, seed, 1), lambda: kmeans_fit(rows, n_components, seed, 1))
        return gmm_fit(rows, n_components, covariance_type, reg_covar, seed, init_labels=init.labels_)

    return cache.get((z,), ("gmm", n_components, covariance_type, reg_covar, seed), compute)


def _gmm_notes(gmm: GaussianMixtureFit, notes: list[str]) -> None:
    if not gmm.converged_:
        notes.append(f"GMM EM did not converge in {gmm.n_iter_} iterations (tol 1e-3); scored with the last fit.")


class KMeansScorer(Scorer):
    """Distance to the nearest K-means centroid in PCA space, k chosen by elbow.

    Standardisation is skipped on purpose: PCA already centres the features
    and the scorer should respect the backbone's feature scale. The elbow runs on a seeded
    subsample of at most ``elbow_samples`` normals (None/0 = all; ``elbow_n_samples`` records
    how many), then K-means at the chosen ``k`` is fit once on all of them.
    """

    def __init__(
        self,
        pca_dims: int | None = 100,
        k_range: tuple[int, int] = (1, 10),
        seed: int = 0,
        n_init: int = 4,
        pca_residual: str = "auto",
        elbow_samples: int | None = ELBOW_SAMPLES,
        cache: FitCache | None = None,
    ) -> None:
        super().__init__(cache)
        self.pca_dims = pca_dims
        self.pca_residual = pca_residual
        self.k_range = k_range
        self.seed = seed
        self.n_init = n_init
        self.elbow_samples = elbow_samples
        self.k: int | None = None
        self.inertias: dict[int, float] = {}
        self.elbow_n_samples: int | None = None

    def _fit(self, x: np.ndarray) -> None:
        self._pca = _fit_pca(x, self.pca_dims, self.seed, self.warnings, self.pca_residual, cache=self._cache)
        z = self._project(x)
        chosen, self._kmeans = _fit_elbow_kmeans(
            z, self.k_range, self.seed, self.n_init, self.warnings, self.elbow_samples, self._cache
        )
        self.k, self.inertias, self.elbow_n_samples = chosen.k, dict(chosen.inertias), chosen.n_samples

    def _score(self, x: np.ndarray) -> np.ndarray:
        return self._kmeans.transform(self._project(x)).min(axis=1)


class GMMKMeansScorer(Scorer):
    """The original study's recipe, applied inductively: GMM-cleaned K-means.

    Steps, all on the training normals: PCA; Gaussian mixture (:func:`gmm_fit`); drop the
    ``n_dropped = floor(drop_fraction * n_train + 0.5)`` lowest-likelihood
    training points (round-half-up, capped so at least 2 remain); refit
    K-means with the elbow rule on the kept points. Test points are never
    dropped: ``score`` returns the nearest-centroid distance for every row.

    ``n_components=None`` sets the GMM size to the elbow k of K-means on the
    full training set (``self.n_components`` records it); an int fixes it. Both elbows run on
    at most ``elbow_samples`` rows (seeded subsample; ``elbow_n_samples`` records the second's).
    """

    def __init__(
        self,
        pca_dims: int | None = 100,
        drop_fraction: float = 0.06,
        n_components: int | None = None,
        k_range: tuple[int, int] = (1, 10),
        covariance_type: str = "full",
        reg_covar: float = 1e-6,
        seed: int = 0,
        n_init: int = 4,
        pca_residual: str = "auto",
        elbow_samples: int | None = ELBOW_SAMPLES,
        cache: FitCache | None = None,
    ) -> None:
        super().__init__(cache)
        if not 0.0 <= drop_fraction < 1.0:
            raise ValueError(f"drop_fraction must be in [0, 1); got {drop_fraction}.")
        self.pca_dims = pca_dims
        self.pca_residual = pca_residual
        self.drop_fraction = drop_fraction
        self.n_components = n_components
        self.k_range = k_range
        self.covariance_type = covariance_type
        self.reg_covar = reg_covar
        self.seed = seed
        self.n_init = n_init
        self.elbow_samples = elbow_samples
        self.k: int | None = None
        self.inertias: dict[int, float] = {}
        self.elbow_n_samples: int | None = None
        self.fitted_n_components: int | None = None
        self.n_dropped: int = 0
        self.dropped_idx: np.ndarray = np.zeros((0,), dtype=np.int64)

    def _fit(self, x: np.ndarray) -> None:
        cache = self._cache
        self._pca = _fit_pca(x, self.pca_dims, self.seed, self.warnings, self.pca_residual, cache=cache)
        z = self._project(x)
        n = z.shape[0]

        n_components, _ = _resolve_n_components(
            z, self.n_components, self.k_range, self.seed, self.n_init, self.warnings, self.elbow_samples, cache
        )
        self.fitted_n_components = n_components
        gmm = _shared_gmm(cache, z, n_components, self.covariance_type, self.reg_covar, self.seed)
        _gmm_notes(gmm, self.warnings)

        n_dropped = int(math.floor(self.drop_fraction * n + 0.5))
        if n_dropped > n - 2:
            self.warnings.append(f"n_dropped capped from {n_dropped} to {n - 2} to keep 2 samples.")
            n_dropped = n - 2
        log_lik = cache.get((gmm, z), ("score_samples",), lambda: gmm.score_samples(z))
        order = np.argsort(log_lik, kind="stable")
        self.n_dropped = n_dropped
        self.dropped_idx = np.sort(order[:n_dropped])
        kept = np.ones(n, dtype=bool)
        kept[self.dropped_idx] = False

        chosen, self._kmeans = _fit_elbow_kmeans(
            z[kept], self.k_range, self.seed, self.n_init, self.warnings, self.elbow_samples, cache
        )
        self.k, self.inertias, self.elbow_n_samples = chosen.k, dict(chosen.inertias), chosen.n_samples

    def _score(self, x: np.ndarray) -> np.ndarray:
        return self._kmeans.transform(self._project(x)).min(axis=1)


class GMMScorer(Scorer):
    """Negative log-likelihood under a Gaussian mixture (:func:`gmm_fit`) fit on training normals.

    ``n_components=None`` picks the size with the K-means elbow rule over
    ``k_range`` on at most ``elbow_samples`` rows (recorded in ``self.fitted_n_components``
    and ``elbow_n_samples``).
    """

    def __init__(
        self,
        pca_dims: int | None = 100,
        n_components: int | None = None,
        covariance_type: str = "full",
        reg_covar: float = 1e-6,
        k_range: tuple[int, int] = (1, 10),
        seed: int = 0,
        n_init: int = 4,
        pca_residual: str = "auto",
        elbow_samples: int | None = ELBOW_SAMPLES,
        cache: FitCache | None = None,
    ) -> None:
        super().__init__(cache)
        self.pca_dims = pca_dims
        self.pca_residual = pca_residual
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.reg_covar = reg_covar
        self.k_range = k_range
        self.seed = seed
        self.n_init = n_init
        self.elbow_samples = elbow_samples
        self.inertias: dict[int, float] = {}
        self.elbow_n_samples: int | None = None
        self.fitted_n_components: int | None = None

    def _fit(self, x: np.ndarray) -> None:
        self._pca = _fit_pca(x, self.pca_dims, self.seed, self.warnings, self.pca_residual, cache=self._cache)
        z = self._project(x)
        n_components, chosen = _resolve_n_components(
            z, self.n_components, self.k_range, self.seed, self.n_init, self.warnings, self.elbow_samples,
            self._cache,
        )
        if chosen is not None:
            self.inertias, self.elbow_n_samples = dict(chosen.inertias), chosen.n_samples
        self.fitted_n_components = n_components
        self._gmm = _shared_gmm(self._cache, z, n_components, self.covariance_type, self.reg_covar, self.seed)
        _gmm_notes(self._gmm, self.warnings)

    def _score(self, x: np.ndarray) -> np.ndarray:
        return -self._gmm.score_samples(self._project(x))


def ledoit_wolf(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """(location (d,), shrunk covariance (d, d), shrinkage in [0, 1]) of rows ``x`` (n, d), float64.

    The Ledoit-Wolf estimator (Ledoit & Wolf, 2004, J. Multivariate Anal. 88(2)) exactly as
    ``sklearn.covariance.LedoitWolf().fit(x)`` computes it (``location_``, ``covariance_``,
    ``shrinkage_``), from one Gram matrix instead of sklearn's three: its ``sum(X2.T @ X2)``
    (X2 = the squared centred entries) is the sum over rows of the squared row norms squared,
    and its ``sum((X.T @ X) ** 2)`` reuses the empirical covariance. Equal to sklearn's to
    rounding (the sums run in another order).
    """
    location = x.mean(0)
    xc = x - location
    n, d = xc.shape
    if d == 1:
        return location, np.atleast_2d((xc**2).mean()), 0.0
    emp_cov = (xc.T @ xc) / n
    sq_norms = np.einsum("ij,ij->i", xc, xc)
    trace_terms = np.sum(xc**2, axis=0) / n  # sklearn's emp_cov_trace
    mu = np.sum(trace_terms) / d
    beta_ = float(np.sum(sq_norms**2))
    delta_ = float(np.sum(emp_cov**2))  # = sum((X.T X)^2) / n^2
    beta = 1.0 / (d * n) * (beta_ / n - delta_)
    delta = (delta_ - 2.0 * mu * trace_terms.sum() + d * mu**2) / d
    beta = min(beta, delta)
    shrinkage = 0.0 if beta == 0 else beta / delta
    shrunk = (1.0 - shrinkage) * emp_cov
    shrunk.flat[:: d + 1] += shrinkage * (np.trace(emp_cov) / d)
    return location, shrunk, shrinkage


class MahalanobisScorer(Scorer):
    """Squared Mahalanobis distance to a Gaussian fit with Ledoit-Wolf shrinkage.

    Shrinkage keeps the covariance well conditioned when n_samples is not
    much larger than the feature dimension (typical for ViT features). With the
    residual coordinate of :func:`_fit_pca` (training normals ~0 there) the
    shrinkage target gives it variance ``alpha * trace(S) / p``, so the score is
    the in-span Mahalanobis distance plus a scaled squared residual, the T^2 + Q
    pair of PCA monitoring (Jackson & Mudholkar, 1979). The estimator is :func:`ledoit_wolf`
    (sklearn's ``LedoitWolf``, with one Gram matrix instead of three).
    """

    def __init__(
        self,
        pca_dims: int | None = None,
        shrinkage: str = "ledoit_wolf",
        seed: int = 0,
        pca_residual: str = "auto",
        cache: FitCache | None = None,
    ) -> None:
        super().__init__(cache)
        if shrinkage != "ledoit_wolf":
            raise ValueError(f"Unknown shrinkage {shrinkage!r}; only 'ledoit_wolf' is supported.")
        self.pca_dims = pca_dims
        self.pca_residual = pca_residual
        self.shrinkage = shrinkage
        self.seed = seed

    def _fit(self, x: np.ndarray) -> None:
        self._pca = _fit_pca(x, self.pca_dims, self.seed, self.warnings, self.pca_residual, cache=self._cache)
        z = self._project(x)
        self.location_, self.covariance_, self.shrinkage_ = ledoit_wolf(z)
        try:
            self._chol = scipy.linalg.cho_factor(self.covariance_, lower=True)
        except np.linalg.LinAlgError as err:
            raise ValueError(
                "Shrunk covariance is not positive definite (are all features constant?)."
            ) from err

    def _score(self, x: np.ndarray) -> np.ndarray:
        d = self._project(x) - self.location_
        solved = scipy.linalg.cho_solve(self._chol, d.T)
        return np.einsum("ij,ji->i", d, solved)


# --------------------------------------------------------------------------
# k-NN in JAX
# --------------------------------------------------------------------------


@functools.partial(jax.jit, static_argnames=("k", "metric"))
def _knn_mean_distance(
    queries: jax.Array, train_chunks: jax.Array, train_valid: jax.Array, k: int, metric: str
) -> jax.Array:
    """Mean distance from each query to its k nearest train rows.

    ``queries`` (chunk_q, d); ``train_chunks`` (n_chunks, chunk_t, d) with ``train_valid``
    (n_chunks, chunk_t) masking padding. A scan walks the train chunks: each step takes the
    chunk's k nearest (``lax.top_k`` of one (chunk_q, chunk_t) block) and merges them with the
    running k best, so peak memory is O(chunk_q * chunk_t). Neighbours are ranked by
    ``||t||^2 - 2 q.t`` (the squared L2 distance less the query's own norm, the same for all its
    candidates; for cosine, rows are unit-normalised, so it is monotone in cosine distance);
    the final k distances are recomputed directly from the selected rows to avoid the
    expansion's cancellation error (e.g. exact duplicates come out as 0, not ~1e-3).
    """
    n_chunks, chunk_t, _ = train_chunks.shape
    chunk_q = queries.shape[0]
    per_chunk = min(k, chunk_t)
    train_t = jnp.swapaxes(train_chunks, 1, 2)  # (n_chunks, d, chunk_t): the matmul's natural layout
    train_sq = jnp.where(train_valid, jnp.sum(train_chunks * train_chunks, axis=2), jnp.inf)

    def merge(carry, inputs):
        best_d, best_i = carry
        t, sq, offset = inputs
        d2 = sq[None, :] - 2.0 * jnp.matmul(queries, t, precision=jax.lax.Precision.HIGHEST)
        neg_chunk, pos_chunk = jax.lax.top_k(-d2, per_chunk)  # padding (inf) is never among them
        cand_d = jnp.concatenate([best_d, -neg_chunk], axis=1)
        cand_i = jnp.concatenate([best_i, offset + pos_chunk.astype(jnp.int32)], axis=1)
        neg_top, pos = jax.lax.top_k(-cand_d, k)
        return (-neg_top, jnp.take_along_axis(cand_i, pos, axis=1)), None

    init = (
        jnp.full((chunk_q, k), jnp.inf, dtype=queries.dtype),
        jnp.zeros((chunk_q, k), dtype=jnp.int32),
    )
    offsets = jnp.arange(n_chunks, dtype=jnp.int32) * chunk_t
    (_, best_i), _ = jax.lax.scan(merge, init, (train_t, train_sq, offsets))

    neighbours = train_chunks.reshape(n_chunks * chunk_t, -1)[best_i]  # (chunk_q, k, d)
    if metric == "cosine":
        dist = 1.0 - jnp.sum(queries[:, None, :] * neighbours, axis=-1)
    else:
        diff = queries[:, None, :] - neighbours
        dist = jnp.sqrt(jnp.sum(diff * diff, axis=-1))
    return jnp.mean(dist, axis=1)


def _pad_rows(x: np.ndarray, multiple: int) -> np.ndarray:
    pad = (-x.shape[0]) % multiple
    return np.pad(x, ((0, pad), (0, 0))) if pad else x


class KNNScorer(Scorer):
    """Mean distance to the k nearest training normals, computed in JAX.

    Both queries and train rows are processed in chunks (``chunk_size`` and
    ``train_chunk_size``, default 4096), so no N x N matrix is ever built. Self-matches are
    not excluded: train and test are different sets, and a query identical to
    a train row simply gets distance 0 for that neighbour. A ``k`` above the
    number of training normals is clamped to it (``fitted_k``) and noted.
    """

    _METRICS = ("cosine", "l2")

    def __init__(
        self,
        k: int = 2,
        metric: str = "cosine",
        chunk_size: int = 1024,
        train_chunk_size: int | None = None,
        pca_dims: int | None = None,
        seed: int = 0,
        pca_residual: str = "auto",
        cache: FitCache | None = None,
    ) -> None:
        super().__init__(cache)
        if metric not in self._METRICS:
            raise ValueError(f"Unknown metric {metric!r}; valid: {', '.join(self._METRICS)}.")
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}.")
        if chunk_size < 1 or (train_chunk_size is not None and train_chunk_size < 1):
            raise ValueError("chunk sizes must be >= 1.")
        self.k = k
        self.metric = metric
        self.chunk_size = chunk_size
        self.train_chunk_size = train_chunk_size or 4096  # 1024 x 4096 blocks: the fastest on CPU
        self.pca_dims = pca_dims
        self.pca_residual = pca_residual
        self.seed = seed
        self.fitted_k: int | None = None

    def _reduce(self, x: np.ndarray) -> np.ndarray:
        """PCA projection (plus the residual, see :func:`_fit_pca`); for cosine WITHOUT centring.

        Cosine compares directions from the origin. After centring on one class's mean its own
        test points sit near the origin in random directions, so a tight normal class would score
        as anomalous (AUROC below chance); projecting onto the principal axes keeps the angles.
        """
        return self._project(x)

    def _prepare(self, z: np.ndarray) -> np.ndarray:
        """Cosine: unit-normalise rows. L2: centre on the train mean (less cancellation)."""
        if self.metric == "cosine":
            norms = np.linalg.norm(z, axis=1, keepdims=True)
            return (z / np.maximum(norms, 1e-12)).astype(np.float32)
        return (z - self._center).astype(np.float32)

    def _fit(self, x: np.ndarray) -> None:
        self.fitted_k = min(self.k, x.shape[0])
        if self.fitted_k < self.k:
            self.warnings.append(f"k clamped from {self.k} to n_samples={x.shape[0]}.")
        self._pca = _fit_pca(
            x, self.pca_dims, self.seed, self.warnings, self.pca_residual, centred=self.metric != "cosine",
            cache=self._cache,
        )
        z = self._reduce(x)
        self._center = z.mean(axis=0)
        t = self._prepare(z)
        chunk_t = min(self.train_chunk_size, _bucket(t.shape[0]))  # rounds of similar size: one program
        padded = _pad_rows(t, chunk_t)
        n_chunks = padded.shape[0] // chunk_t
        valid = np.arange(padded.shape[0]) < t.shape[0]
        self._train_chunks = jnp.asarray(padded.reshape(n_chunks, chunk_t, -1))
        self._train_valid = jnp.asarray(valid.reshape(n_chunks, chunk_t))

    def _score(self, x: np.ndarray) -> np.ndarray:
        q = self._prepare(self._reduce(x))
        n = q.shape[0]
        chunk_q = min(self.chunk_size, _bucket(n))
        padded = _pad_rows(q, chunk_q)
        out = [
            _knn_mean_distance(
                jnp.asarray(padded[start : start + chunk_q]),
                self._train_chunks,
                self._train_valid,
                k=self.fitted_k,
                metric=self.metric,
            )
            for start in range(0, padded.shape[0], chunk_q)
        ]
        return np.asarray(jnp.concatenate(out))[:n].astype(np.float64)


# --------------------------------------------------------------------------
# Factory
# --------------------------------------------------------------------------

# Plain name -> class map; add image-based scorers (e.g. "mae_recon") here.
class MAEReconScorer(Scorer):
    """MAE reconstruction error: the input rows are per-patch error maps (flattened).

    With ``normalize`` each patch position is z-scored by the training normals' error
    statistics before averaging, so patches that are always hard to reconstruct (digit
    strokes, object edges) do not dominate; without it the score is the plain mean error.
    """

    def __init__(self, normalize: bool = True, eps: float = 1e-6, cache: FitCache | None = None) -> None:
        super().__init__(cache)
        self.normalize = normalize
        self.eps = eps

    def _fit(self, x: np.ndarray) -> None:
        self.mean_ = x.mean(axis=0)
        self.std_ = x.std(axis=0)

    def _score(self, x: np.ndarray) -> np.ndarray:
        if not self.normalize:
            return x.mean(axis=1)
        return ((x - self.mean_) / (self.std_ + self.eps)).mean(axis=1)


SCORERS: dict[str, type[Scorer]] = {
    "kmeans": KMeansScorer,
    "gmm_kmeans": GMMKMeansScorer,
    "gmm": GMMScorer,
    "knn": KNNScorer,
    "mahalanobis": MahalanobisScorer,
    "mae_recon": MAEReconScorer,
}


def build_scorer(name: str, **kwargs: Any) -> Scorer:
    """Instantiate the scorer registered under ``name`` with ``kwargs`` (``cache=`` a shared
    :class:`FitCache`). Raises ValueError for an unknown name."""
    try:
        cls = SCORERS[name]
    except KeyError:
        raise ValueError(f"Unknown scorer {name!r}; valid names: {', '.join(sorted(SCORERS))}.") from None
    return cls(**kwargs)
