"""The JAX K-means / EM against scikit-learn, the shared per-round fits, and the subsampled elbow.

Tolerances (float32 on the device against sklearn's float64):

* K-means on separated clusters: the same labels up to a permutation, the same iteration count
  and inertia within 1e-6 relative; on an arbitrary curve point (k above the true number of
  clusters) inertia within 1e-3 relative.
* EM: the same iteration count, mean log-likelihood (``lower_bound_``) within 1e-5 nats,
  per-row log-likelihoods within 1e-4 nats, weights within 1e-6 and means within 1e-5 of the
  data's scale, component for component (both start from the same K-means labels).
"""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.covariance import LedoitWolf
from sklearn.datasets import make_blobs
from sklearn.metrics import adjusted_rand_score
from sklearn.mixture import GaussianMixture

from ssl_ad.config_defaults import eval_config
from ssl_ad.evaluation import scorers as sc
from ssl_ad.evaluation.features import EMBEDDING, FeatureSet
from ssl_ad.evaluation.protocols import make_rounds
from ssl_ad.evaluation.scoring import score_feature_set, score_rounds, scorer_kwargs

FEATURE_SCORERS = ("knn", "mahalanobis", "kmeans", "gmm_kmeans", "gmm")


def _blobs(seed: int, n: int = 600, centers: int = 4, dim: int = 10, std: float = 1.0) -> np.ndarray:
    x, _ = make_blobs(n_samples=n, centers=centers, n_features=dim, cluster_std=std, random_state=seed)
    return x


# --- K-means ------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [1, 2, 4])
def test_kmeans_matches_sklearn_on_separated_clusters(seed: int, k: int) -> None:
    x = _blobs(seed)
    ref = KMeans(n_clusters=k, n_init=2, random_state=seed).fit(x)
    got = sc.kmeans_fit(x, k, seed, n_init=2)
    assert adjusted_rand_score(ref.labels_, got.labels_) == 1.0
    assert got.n_iter_ == ref.n_iter_
    np.testing.assert_allclose(got.inertia_, ref.inertia_, rtol=1e-6)
    order = [int(np.argmin(np.linalg.norm(ref.cluster_centers_ - c, axis=1))) for c in got.cluster_centers_]
    np.testing.assert_allclose(got.cluster_centers_, ref.cluster_centers_[order], atol=1e-4)
    np.testing.assert_allclose(got.transform(x[:7]), ref.transform(x[:7])[:, order], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("seed", [0, 1])
def test_kmeans_inertia_curve_matches_sklearn(seed: int) -> None:
    x = _blobs(seed, std=2.5)
    inertias, models = sc.kmeans_inertias(x, (1, 8), seed, n_init=1)
    ref = {k: KMeans(n_clusters=k, n_init=1, random_state=seed).fit(x).inertia_ for k in range(1, 9)}
    for k in range(1, 9):
        np.testing.assert_allclose(inertias[k], ref[k], rtol=1e-3)
        assert models[k].cluster_centers_.shape == (k, x.shape[1])
    assert sc.choose_elbow_k(inertias) == sc.choose_elbow_k(ref)


def test_lloyd_moves_an_empty_cluster_like_sklearn() -> None:
    """A seed far from every row gets none: it takes the row farthest from its centre (sklearn's
    _relocate_empty_clusters_dense), and the run then matches KMeans(init=those seeds)."""
    x = _blobs(3, n=300, centers=2, dim=4)
    mean = x.mean(0)
    init = np.stack([x[0], x[-1], mean + 1e3])
    ref = KMeans(n_clusters=3, init=init, n_init=1).fit(x)
    rows = sc._DeviceRows.of(x)
    padded = np.zeros((8, 4), np.float32)
    padded[:3] = init - mean
    tol = float(np.mean(np.var(x, axis=0)) * 1e-4)
    centers, labels, n_iter = sc._lloyd(rows.x, rows.w, padded, np.arange(8) < 3, tol, 300)
    labels = np.asarray(labels)[:300]
    assert adjusted_rand_score(ref.labels_, labels) == 1.0 and len(set(labels)) == 3
    np.testing.assert_allclose(np.asarray(centers)[:3] + mean, ref.cluster_centers_, atol=1e-4)
    assert int(n_iter) == ref.n_iter_


def test_kmeans_fit_rejects_k_outside_the_rows() -> None:
    with pytest.raises(ValueError, match="1 <= k <= n_samples=5"):
        sc.kmeans_fit(np.zeros((5, 2)), 6, 0)


# --- EM -----------------------------------------------------------------------------


@pytest.mark.parametrize("covariance_type", sc.COVARIANCE_TYPES)
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("on_device", [True, False])
def test_gmm_matches_sklearn(covariance_type: str, seed: int, on_device: bool) -> None:
    x = _blobs(seed, n=800, centers=3, dim=6, std=1.5)
    x[:, 0] *= 3.0  # anisotropic, so that the covariance types differ
    ref = GaussianMixture(n_components=3, covariance_type=covariance_type, random_state=seed).fit(x)
    got = sc.gmm_fit(x, 3, covariance_type, seed=seed, on_device=on_device)
    assert got.on_device == on_device and got.converged_ and got.n_iter_ == ref.n_iter_
    scale = 1.0 if on_device else 1e-6  # float64 on the host: sklearn's numbers to rounding
    assert abs(got.lower_bound_ - ref.lower_bound_) < 1e-5 * scale
    np.testing.assert_allclose(got.score_samples(x), ref.score_samples(x), atol=1e-4 * scale)
    np.testing.assert_allclose(got.weights_, ref.weights_, atol=1e-6 * scale)
    np.testing.assert_allclose(got.means_, ref.means_, atol=1e-5 * scale * np.abs(x).max())


def test_gmm_runs_small_rounds_in_float64_on_the_host() -> None:
    """Fewer than 2 rows per covariance dimension and component: float32 cannot carry the
    regularised inverse of a rank-deficient scatter, so EM runs in float64 like sklearn."""
    x = np.random.default_rng(0).standard_normal((6, 6)) * 80.0
    ref = GaussianMixture(n_components=2, random_state=0).fit(x)
    got = sc.gmm_fit(x, 2)
    assert not got.on_device and got.n_iter_ == ref.n_iter_
    np.testing.assert_allclose(got.score_samples(x), ref.score_samples(x), rtol=1e-6)
    assert sc.gmm_fit(_blobs(0, n=800, centers=3, dim=6), 3).on_device


def test_gmm_fit_raises_like_sklearn_on_a_singular_covariance() -> None:
    x = np.full((50, 3), 4.0)  # every row the same: a zero covariance, and no regularisation
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        GaussianMixture(n_components=1, reg_covar=0.0, random_state=0).fit(x)
    with pytest.raises(ValueError, match="ill-defined empirical covariance"):
        sc.gmm_fit(x, 1, reg_covar=0.0)


def test_ledoit_wolf_matches_sklearn() -> None:
    rng = np.random.default_rng(0)
    for n, d in ((200, 6), (40, 60), (30, 1)):
        x = rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 2.0
        ref = LedoitWolf().fit(x)
        location, covariance, shrinkage = sc.ledoit_wolf(x)
        np.testing.assert_allclose(location, ref.location_, rtol=1e-12)
        np.testing.assert_allclose(covariance, ref.covariance_, rtol=1e-10, atol=1e-12)
        assert abs(shrinkage - ref.shrinkage_) < 1e-12


# --- one PCA / elbow / mixture per round ------------------------------------------------


def _round_data(seed: int = 0, n: int = 400, dim: int = 24) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    means = rng.standard_normal((3, dim)) * 4.0
    train = means[rng.integers(0, 3, n)] + rng.standard_normal((n, dim))
    test = np.concatenate([means[rng.integers(0, 3, 60)] + rng.standard_normal((60, dim)),
                           rng.standard_normal((40, dim)) * 4.0])
    return train, test


@pytest.mark.parametrize("residual", ["auto", "always"])
def test_a_shared_cache_gives_the_scores_of_separate_fits_with_one_pca(residual: str, monkeypatch) -> None:
    fits = []

    class CountingPCA(sc.PCA):
        def fit(self, x, y=None):
            fits.append(x.shape)
            return super().fit(x, y)

    monkeypatch.setattr(sc, "PCA", CountingPCA)
    train, test = _round_data()
    kwargs = dict(pca_dims=8, pca_residual=residual)
    extra = {"knn": {}, "mahalanobis": {}, "kmeans": {"k_range": (1, 5)}, "gmm_kmeans": {"k_range": (1, 5)},
             "gmm": {"k_range": (1, 5)}}
    alone = {n: sc.build_scorer(n, **kwargs, **extra[n]).fit(train).score(test) for n in FEATURE_SCORERS}
    assert len(fits) == 5
    cache = sc.FitCache()
    shared = {n: sc.build_scorer(n, cache=cache, **kwargs, **extra[n]).fit(train).score(test) for n in FEATURE_SCORERS}
    assert len(fits) == 6  # the five shared one (cosine kNN's uncentred projection included)
    for n in FEATURE_SCORERS:
        np.testing.assert_array_equal(shared[n], alone[n])
    assert cache.hits > 0


def test_the_uncentred_projection_from_the_centred_one_is_x_times_the_basis() -> None:
    train, test = _round_data(1)
    cache = sc.FitCache()
    notes: list[str] = []
    proj = sc._fit_pca(train, 8, 0, notes, "auto", centred=False, cache=cache)
    assert proj.base is not None
    np.testing.assert_allclose(sc._project(proj, test, cache), test @ proj.basis.T, rtol=1e-12, atol=1e-12)


def test_gmm_and_gmm_kmeans_fit_one_mixture_and_the_elbow_is_shared(monkeypatch) -> None:
    calls = {"gmm": 0, "kmeans": 0}
    gmm_fit, kmeans_fit = sc.gmm_fit, sc.kmeans_fit

    def counting_gmm(*a, **k):
        calls["gmm"] += 1
        return gmm_fit(*a, **k)

    def counting_kmeans(*a, **k):
        calls["kmeans"] += 1
        return kmeans_fit(*a, **k)

    monkeypatch.setattr(sc, "gmm_fit", counting_gmm)
    monkeypatch.setattr(sc, "kmeans_fit", counting_kmeans)
    train, test = _round_data(2)
    cache = sc.FitCache()
    for name in ("kmeans", "gmm", "gmm_kmeans"):
        sc.build_scorer(name, pca_dims=8, k_range=(1, 5), n_init=1, cache=cache).fit(train).score(test)
    assert calls["gmm"] == 1
    # one elbow on z (5 fits, the one at k shared by kmeans and the GMM's initialisation) and one on z[kept]
    assert calls["kmeans"] == 10


def test_score_feature_set_rows_equal_scoring_each_scorer_alone() -> None:
    rng = np.random.default_rng(5)
    y_tr, y_te = rng.integers(0, 3, 450), rng.integers(0, 3, 120)
    centres = rng.standard_normal((3, 16)) * 3.0
    fs = FeatureSet("f", EMBEDDING, (centres[y_tr] + rng.standard_normal((450, 16))).astype(np.float32),
                    (centres[y_te] + rng.standard_normal((120, 16))).astype(np.float32), 0.0, {})
    rounds = make_rounds("leave_one_class_out", y_tr, y_te, ["a", "b", "c"])
    config = eval_config()
    config.pca_dims = 8
    for name in ("kmeans", "gmm_kmeans", "gmm"):
        config.scorer_args[name].k_range = (1, 4)
    together = score_feature_set(fs, FEATURE_SCORERS, "loco", rounds, config)
    for (row, extra), name in zip(together, FEATURE_SCORERS):
        alone, _ = score_rounds(fs, name, "loco", rounds, config)
        assert row["scorer"] == name and row["per_round"] == alone["per_round"]
        assert row["warnings"] == alone["warnings"] and row.get("k_first_round") == alone.get("k_first_round")
        assert extra["scorer"]._cache is not None and not extra["scorer"]._cache._memo  # cleared after the round


# --- the elbow on a subsample --------------------------------------------------------------


@pytest.mark.parametrize("name", ["kmeans", "gmm_kmeans", "gmm"])
def test_the_elbow_on_a_subsample_records_its_size_and_k(name: str) -> None:
    x, _ = make_blobs(n_samples=3000, centers=3, n_features=8, cluster_std=0.6, random_state=0)
    scorer = sc.build_scorer(name, pca_dims=None, k_range=(1, 8), n_init=1, elbow_samples=500).fit(x)
    k = scorer.fitted_n_components if name == "gmm" else scorer.k
    assert k == 3 and scorer.elbow_n_samples == 500
    assert sorted(scorer.inertias) == list(range(1, 9))
    assert any("subsample of 500 training normals" in w for w in scorer.warnings)
    if name == "kmeans":  # the model at the chosen k is fit on every row
        assert scorer._kmeans.labels_.shape == (3000,)
        again = sc.build_scorer(name, pca_dims=None, k_range=(1, 8), n_init=1, elbow_samples=500).fit(x)
        np.testing.assert_array_equal(again.score(x[:50]), scorer.score(x[:50]))  # the subsample is seeded
    every = sc.build_scorer(name, pca_dims=None, k_range=(1, 8), n_init=1, elbow_samples=None).fit(x)
    kept = 3000 - getattr(every, "n_dropped", 0)  # gmm_kmeans: its K-means elbow runs on the kept normals
    assert every.elbow_n_samples == kept and not any("subsample" in w for w in every.warnings)


def test_a_round_smaller_than_elbow_samples_is_not_subsampled() -> None:
    x, _ = make_blobs(n_samples=400, centers=3, n_features=6, random_state=1)
    small = sc.KMeansScorer(pca_dims=None, k_range=(1, 6), n_init=1, elbow_samples=10_000).fit(x)
    every = sc.KMeansScorer(pca_dims=None, k_range=(1, 6), n_init=1, elbow_samples=None).fit(x)
    assert small.elbow_n_samples == every.elbow_n_samples == 400 and small.inertias == every.inertias
    np.testing.assert_array_equal(small.score(x), every.score(x))


def test_elbow_samples_config_key() -> None:
    config = eval_config()
    assert all(config.scorer_args[n].elbow_samples == 10_000 for n in ("kmeans", "gmm_kmeans", "gmm"))
    config.scorer_args.kmeans.elbow_samples = 0
    assert scorer_kwargs(config, "kmeans")["elbow_samples"] is None  # 0 = every normal
    assert scorer_kwargs(config, "gmm")["elbow_samples"] == 10_000
