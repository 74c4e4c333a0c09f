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
"""

from __future__ import annotations

import abc
import functools
import logging
import math
from collections.abc import Mapping
from typing import Any, TypeVar

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
from sklearn.cluster import KMeans
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA
from sklearn.mixture import GaussianMixture

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
    "build_scorer",
    "choose_elbow_k",
    "kmeans_inertias",
]


# --------------------------------------------------------------------------
# Input validation and shared steps
# --------------------------------------------------------------------------


def _as_matrix(features: np.ndarray, what: str) -> np.ndarray:
    """Return ``features`` as a finite 2-D float64 array or raise ValueError."""
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


RESIDUAL_MODES = ("auto", "always", "never")


class _Projection:
    """PCA fit on a round's training normals, optionally plus the residual norm as one more coordinate.

    ``transform(x)`` returns the coordinates in the kept basis and, with ``residual``, appends
    ``||c - B^T B c||`` (``c`` = ``x`` minus the training mean, or ``x`` itself when
    ``centred=False``, as cosine kNN projects without centring): the distance of the point from
    the subspace, i.e. the squared prediction error (SPE / Q statistic) of PCA-based monitoring
    (Jackson & Mudholkar, 1979, Technometrics 21(3)) and the out-of-subspace term of
    probabilistic PCA (Tipping & Bishop, 1999, JRSS-B 61(3)), which PCA alone throws away.
    """

    def __init__(self, pca: PCA | None, basis: np.ndarray, mean: np.ndarray | None, residual: bool) -> None:
        self.pca, self.basis, self.mean, self.residual = pca, basis, mean, residual

    @property
    def dims(self) -> int:
        return int(self.basis.shape[0]) + int(self.residual)

    def transform(self, x: np.ndarray) -> np.ndarray:
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
) -> _Projection | None:
    """Fit PCA with dims clamped to what the data supports (None = no PCA), keeping the residual.

    PCA cannot have more components than ``min(n_samples - 1, n_features)``
    meaningful directions, so a request above that is clamped and noted.

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
    """
    if pca_dims is None:
        return None
    if pca_dims < 1:
        raise ValueError(f"pca_dims must be a positive int or None; got {pca_dims}.")
    if residual not in RESIDUAL_MODES:
        raise ValueError(f"pca_residual must be one of {RESIDUAL_MODES}; got {residual!r}.")
    n, d = x.shape
    limit = min(n - 1, d)
    dims = min(pca_dims, limit)
    if dims < pca_dims:
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
        _, s, vt = np.linalg.svd(x, full_matrices=False)  # the span of the uncentred normals
        rank = int(np.sum(s > s[0] * max(x.shape) * np.finfo(np.float64).eps)) if s.size and s[0] > 0 else 0
        return _Projection(None, vt[: max(rank, 1)], None, True)
    pca = PCA(n_components=dims, random_state=seed).fit(x)
    return _Projection(pca, pca.components_, pca.mean_ if centred else None, keep)


def _project(pca: _Projection | None, x: np.ndarray) -> np.ndarray:
    return x if pca is None else pca.transform(x)


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
# Elbow selection
# --------------------------------------------------------------------------


def kmeans_inertias(
    x: np.ndarray, k_range: tuple[int, int], seed: int, n_init: int
) -> tuple[dict[int, float], dict[int, KMeans]]:
    """Fit K-means for every k in the inclusive ``k_range``; return inertias and models."""
    inertias: dict[int, float] = {}
    models: dict[int, KMeans] = {}
    for k in range(k_range[0], k_range[1] + 1):
        model = KMeans(n_clusters=k, n_init=n_init, random_state=seed).fit(x)
        inertias[k] = float(model.inertia_)
        models[k] = model
    return inertias, models


def choose_elbow_k(inertias: Mapping[int, float]) -> int:
    """Pick k at the elbow of an inertia curve ("kneedle" / max distance to chord).

    Rule (deterministic): normalise k and inertia to [0, 1] so that the curve
    runs from (0, 1) to (1, 0); the chord joining the first and last points is
    then ``x + y = 1``. The elbow is the k whose point lies furthest *below*
    that chord, i.e. maximises ``1 - x - y`` (proportional to the
    perpendicular distance). Ties go to the smallest k. If no point lies below
    the chord (fewer than 3 ks, a flat/increasing curve, or a straight line)
    the smallest k is returned, as there is no evidence for more clusters.
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


def _fit_elbow_kmeans(
    z: np.ndarray, k_range: tuple[int, int], seed: int, n_init: int, notes: list[str]
) -> tuple[int, dict[int, float], KMeans]:
    """Fit K-means over the (clamped) k_range and keep the model at the elbow k."""
    inertias, models = kmeans_inertias(z, _clamp_k_range(k_range, z.shape[0], notes), seed, n_init)
    k = choose_elbow_k(inertias)
    return k, inertias, models[k]


def _resolve_n_components(
    z: np.ndarray,
    n_components: int | None,
    k_range: tuple[int, int],
    seed: int,
    n_init: int,
    notes: list[str],
) -> tuple[int, dict[int, float]]:
    """GMM size: a fixed int (clamped to n_samples) or, if None, the K-means elbow k."""
    n = z.shape[0]
    if n_components is None:
        inertias, _ = kmeans_inertias(z, _clamp_k_range(k_range, n, notes), seed, n_init)
        return choose_elbow_k(inertias), inertias
    if n_components < 1:
        raise ValueError(f"n_components must be >= 1 or None; got {n_components}.")
    if n_components > n:
        notes.append(f"n_components clamped from {n_components} to n_samples={n}.")
    return min(int(n_components), n), {}


# --------------------------------------------------------------------------
# Scorer base class
# --------------------------------------------------------------------------


class Scorer(abc.ABC):
    """Common fit/score contract: fit on training normals, higher score = more anomalous."""

    def __init__(self) -> None:
        self.warnings: list[str] = []
        self._n_features: int | None = None

    def fit(self: _S, train_features: np.ndarray) -> _S:
        """Fit on training normals only. Raises ValueError on < 2 rows or NaN/Inf."""
        x = _as_matrix(train_features, "train_features")
        if x.shape[0] < 2:
            raise ValueError(f"fit needs at least 2 training samples; got {x.shape[0]}.")
        self.warnings = []
        self._fit(x)
        self._n_features = x.shape[1]
        for note in self.warnings:
            logger.warning("%s: %s", type(self).__name__, note)
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

    @abc.abstractmethod
    def _fit(self, x: np.ndarray) -> None:
        """Fit on validated float64 training features."""

    @abc.abstractmethod
    def _score(self, x: np.ndarray) -> np.ndarray:
        """Score validated float64 features."""


# --------------------------------------------------------------------------
# Clustering / density scorers
# --------------------------------------------------------------------------


class KMeansScorer(Scorer):
    """Distance to the nearest K-means centroid in PCA space, k chosen by elbow.

    Standardisation is skipped on purpose: PCA already centres the features
    and the scorer should respect the backbone's feature scale.
    """

    def __init__(
        self,
        pca_dims: int | None = 100,
        k_range: tuple[int, int] = (1, 10),
        seed: int = 0,
        n_init: int = 4,
        pca_residual: str = "auto",
    ) -> None:
        super().__init__()
        self.pca_dims = pca_dims
        self.pca_residual = pca_residual
        self.k_range = k_range
        self.seed = seed
        self.n_init = n_init
        self.k: int | None = None
        self.inertias: dict[int, float] = {}

    def _fit(self, x: np.ndarray) -> None:
        self._pca = _fit_pca(x, self.pca_dims, self.seed, self.warnings, self.pca_residual)
        z = _project(self._pca, x)
        self.k, self.inertias, self._kmeans = _fit_elbow_kmeans(
            z, self.k_range, self.seed, self.n_init, self.warnings
        )

    def _score(self, x: np.ndarray) -> np.ndarray:
        return self._kmeans.transform(_project(self._pca, x)).min(axis=1)


class GMMKMeansScorer(Scorer):
    """The original study's recipe, applied inductively: GMM-cleaned K-means.

    Steps, all on the training normals: PCA; GaussianMixture; drop the
    ``n_dropped = floor(drop_fraction * n_train + 0.5)`` lowest-likelihood
    training points (round-half-up, capped so at least 2 remain); refit
    K-means with the elbow rule on the kept points. Test points are never
    dropped: ``score`` returns the nearest-centroid distance for every row.

    ``n_components=None`` sets the GMM size to the elbow k of K-means on the
    full training set (``self.n_components`` records it); an int fixes it.
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
    ) -> None:
        super().__init__()
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
        self.k: int | None = None
        self.inertias: dict[int, float] = {}
        self.fitted_n_components: int | None = None
        self.n_dropped: int = 0
        self.dropped_idx: np.ndarray = np.zeros((0,), dtype=np.int64)

    def _fit(self, x: np.ndarray) -> None:
        self._pca = _fit_pca(x, self.pca_dims, self.seed, self.warnings, self.pca_residual)
        z = _project(self._pca, x)
        n = z.shape[0]

        n_components, _ = _resolve_n_components(
            z, self.n_components, self.k_range, self.seed, self.n_init, self.warnings
        )
        self.fitted_n_components = n_components
        gmm = GaussianMixture(
            n_components=n_components,
            covariance_type=self.covariance_type,
            reg_covar=self.reg_covar,
            random_state=self.seed,
        ).fit(z)

        n_dropped = int(math.floor(self.drop_fraction * n + 0.5))
        if n_dropped > n - 2:
            self.warnings.append(f"n_dropped capped from {n_dropped} to {n - 2} to keep 2 samples.")
            n_dropped = n - 2
        order = np.argsort(gmm.score_samples(z), kind="stable")
        self.n_dropped = n_dropped
        self.dropped_idx = np.sort(order[:n_dropped])
        kept = np.ones(n, dtype=bool)
        kept[self.dropped_idx] = False

        self.k, self.inertias, self._kmeans = _fit_elbow_kmeans(
            z[kept], self.k_range, self.seed, self.n_init, self.warnings
        )

    def _score(self, x: np.ndarray) -> np.ndarray:
        return self._kmeans.transform(_project(self._pca, x)).min(axis=1)


class GMMScorer(Scorer):
    """Negative log-likelihood under a GaussianMixture fit on training normals.

    ``n_components=None`` picks the size with the K-means elbow rule over
    ``k_range`` (recorded in ``self.fitted_n_components``).
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
    ) -> None:
        super().__init__()
        self.pca_dims = pca_dims
        self.pca_residual = pca_residual
        self.n_components = n_components
        self.covariance_type = covariance_type
        self.reg_covar = reg_covar
        self.k_range = k_range
        self.seed = seed
        self.n_init = n_init
        self.inertias: dict[int, float] = {}
        self.fitted_n_components: int | None = None

    def _fit(self, x: np.ndarray) -> None:
        self._pca = _fit_pca(x, self.pca_dims, self.seed, self.warnings, self.pca_residual)
        z = _project(self._pca, x)
        n_components, self.inertias = _resolve_n_components(
            z, self.n_components, self.k_range, self.seed, self.n_init, self.warnings
        )
        self.fitted_n_components = n_components
        self._gmm = GaussianMixture(
            n_components=n_components,
            covariance_type=self.covariance_type,
            reg_covar=self.reg_covar,
            random_state=self.seed,
        ).fit(z)

    def _score(self, x: np.ndarray) -> np.ndarray:
        return -self._gmm.score_samples(_project(self._pca, x))


class MahalanobisScorer(Scorer):
    """Squared Mahalanobis distance to a Gaussian fit with Ledoit-Wolf shrinkage.

    Shrinkage keeps the covariance well conditioned when n_samples is not
    much larger than the feature dimension (typical for ViT features). With the
    residual coordinate of :func:`_fit_pca` (training normals ~0 there) the
    shrinkage target gives it variance ``alpha * trace(S) / p``, so the score is
    the in-span Mahalanobis distance plus a scaled squared residual, the T^2 + Q
    pair of PCA monitoring (Jackson & Mudholkar, 1979).
    """

    def __init__(
        self, pca_dims: int | None = None, shrinkage: str = "ledoit_wolf", seed: int = 0, pca_residual: str = "auto"
    ) -> None:
        super().__init__()
        if shrinkage != "ledoit_wolf":
            raise ValueError(f"Unknown shrinkage {shrinkage!r}; only 'ledoit_wolf' is supported.")
        self.pca_dims = pca_dims
        self.pca_residual = pca_residual
        self.shrinkage = shrinkage
        self.seed = seed

    def _fit(self, x: np.ndarray) -> None:
        self._pca = _fit_pca(x, self.pca_dims, self.seed, self.warnings, self.pca_residual)
        z = _project(self._pca, x)
        lw = LedoitWolf().fit(z)
        self.location_ = lw.location_
        self.covariance_ = lw.covariance_
        try:
            self._chol = scipy.linalg.cho_factor(self.covariance_, lower=True)
        except np.linalg.LinAlgError as err:
            raise ValueError(
                "Shrunk covariance is not positive definite (are all features constant?)."
            ) from err

    def _score(self, x: np.ndarray) -> np.ndarray:
        d = _project(self._pca, x) - self.location_
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

    ``train_chunks`` is (n_chunks, chunk_t, d) with ``train_valid`` masking
    padding. A scan walks the train chunks keeping a running top-k, so peak
    memory is O(chunk_q * chunk_t). Neighbours are selected with the squared
    L2 expansion (for cosine, rows are unit-normalised, so it is monotone in
    cosine distance); the final k distances are recomputed directly from the
    selected rows to avoid the expansion's cancellation error (e.g. exact
    duplicates come out as 0, not ~1e-3).
    """
    n_chunks, chunk_t, _ = train_chunks.shape
    chunk_q = queries.shape[0]
    q_sq = jnp.sum(queries * queries, axis=1)

    def merge(carry, inputs):
        best_d, best_i = carry
        t, valid, offset = inputs
        cross = jnp.matmul(queries, t.T, precision=jax.lax.Precision.HIGHEST)
        d2 = q_sq[:, None] + jnp.sum(t * t, axis=1)[None, :] - 2.0 * cross
        d2 = jnp.where(valid[None, :], jnp.maximum(d2, 0.0), jnp.inf)
        idx = jnp.broadcast_to(offset + jnp.arange(chunk_t, dtype=jnp.int32), (chunk_q, chunk_t))
        cand_d = jnp.concatenate([best_d, d2], axis=1)
        cand_i = jnp.concatenate([best_i, idx], axis=1)
        neg_top, pos = jax.lax.top_k(-cand_d, k)
        return (-neg_top, jnp.take_along_axis(cand_i, pos, axis=1)), None

    init = (
        jnp.full((chunk_q, k), jnp.inf, dtype=queries.dtype),
        jnp.zeros((chunk_q, k), dtype=jnp.int32),
    )
    offsets = jnp.arange(n_chunks, dtype=jnp.int32) * chunk_t
    (_, best_i), _ = jax.lax.scan(merge, init, (train_chunks, train_valid, offsets))

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
    ``train_chunk_size``), so no N x N matrix is ever built. Self-matches are
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
    ) -> None:
        super().__init__()
        if metric not in self._METRICS:
            raise ValueError(f"Unknown metric {metric!r}; valid: {', '.join(self._METRICS)}.")
        if k < 1:
            raise ValueError(f"k must be >= 1; got {k}.")
        if chunk_size < 1 or (train_chunk_size is not None and train_chunk_size < 1):
            raise ValueError("chunk sizes must be >= 1.")
        self.k = k
        self.metric = metric
        self.chunk_size = chunk_size
        self.train_chunk_size = train_chunk_size or chunk_size
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
        return _project(self._pca, x)

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
            x, self.pca_dims, self.seed, self.warnings, self.pca_residual, centred=self.metric != "cosine"
        )
        z = self._reduce(x)
        self._center = z.mean(axis=0)
        t = self._prepare(z)
        chunk_t = min(self.train_chunk_size, t.shape[0])
        padded = _pad_rows(t, chunk_t)
        n_chunks = padded.shape[0] // chunk_t
        valid = np.arange(padded.shape[0]) < t.shape[0]
        self._train_chunks = jnp.asarray(padded.reshape(n_chunks, chunk_t, -1))
        self._train_valid = jnp.asarray(valid.reshape(n_chunks, chunk_t))

    def _score(self, x: np.ndarray) -> np.ndarray:
        q = self._prepare(self._reduce(x))
        n = q.shape[0]
        chunk_q = min(self.chunk_size, n)
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

    def __init__(self, normalize: bool = True, eps: float = 1e-6) -> None:
        super().__init__()
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
    """Instantiate the scorer registered under ``name`` with ``kwargs``."""
    try:
        cls = SCORERS[name]
    except KeyError:
        raise ValueError(f"Unknown scorer {name!r}; valid names: {', '.join(sorted(SCORERS))}.") from None
    return cls(**kwargs)
