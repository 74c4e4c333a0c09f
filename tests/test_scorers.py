"""Tests for ssl_ad.evaluation.scorers on synthetic Gaussian features."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy.spatial.distance import cdist
from sklearn.covariance import LedoitWolf
from sklearn.datasets import make_blobs
from sklearn.metrics import roc_auc_score

from ssl_ad.evaluation import scorers as sc

DIM = 16
MU_A = np.eye(DIM)[0] * 6.0
MU_B = np.eye(DIM)[1] * 6.0

# One entry per scorer (KNN twice, once per metric), kept small for speed.
CONFIGS = {
    "kmeans": ("kmeans", dict(pca_dims=10, k_range=(1, 6))),
    "gmm_kmeans": ("gmm_kmeans", dict(pca_dims=10, k_range=(1, 6))),
    "gmm": ("gmm", dict(pca_dims=10, k_range=(1, 6))),
    "knn_cosine": ("knn", dict(k=2, metric="cosine", chunk_size=64)),
    "knn_l2": ("knn", dict(k=2, metric="l2", chunk_size=64)),
    "mahalanobis": ("mahalanobis", dict()),
}


def _gauss(rng: np.random.Generator, mu: np.ndarray, n: int, std: float = 1.0) -> np.ndarray:
    return mu + std * rng.standard_normal((n, mu.size))


def _make(config: str) -> sc.Scorer:
    name, kwargs = CONFIGS[config]
    return sc.build_scorer(name, **kwargs)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_far_anomalies_are_detected(config: str) -> None:
    rng = np.random.default_rng(0)
    train = _gauss(rng, MU_A, 300)
    test = np.concatenate([_gauss(rng, MU_A, 150), _gauss(rng, MU_B, 150)])
    y = np.r_[np.zeros(150), np.ones(150)]
    scores = _make(config).fit(train).score(test)
    assert scores.shape == (300,)
    assert roc_auc_score(y, scores) > 0.95


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_same_distribution_is_chance(config: str) -> None:
    rng = np.random.default_rng(1)
    train = _gauss(rng, MU_A, 300)
    test = _gauss(rng, MU_A, 800)
    y = np.r_[np.zeros(400), np.ones(400)]
    scores = _make(config).fit(train).score(test)
    assert abs(roc_auc_score(y, scores) - 0.5) < 0.1


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_far_point_scores_higher(config: str) -> None:
    rng = np.random.default_rng(2)
    scorer = _make(config).fit(_gauss(rng, MU_A, 200))
    near, far = MU_A, MU_A + 20.0 * np.eye(DIM)[2]
    s = scorer.score(np.stack([near, far]))
    assert s[1] > s[0]


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_fit_never_sees_test_data(config: str) -> None:
    """A tight test-only cluster would look 'normal' to a transductive scorer."""
    rng = np.random.default_rng(3)
    scorer = _make(config).fit(_gauss(rng, MU_A, 300))
    a = _gauss(rng, MU_A, 100)
    b = _gauss(rng, MU_B, 100, std=0.01)
    s = scorer.score(np.concatenate([a, b]))
    assert s[100:].min() > s[:100].max()


def test_pca_dims_above_the_feature_width_is_one_fact_for_every_round() -> None:
    rng = np.random.default_rng(5)
    notes = []
    for n in (120, 300):  # rounds of different sizes, both with more normals than features
        scorer = sc.build_scorer("knn", pca_dims=100)
        scorer.fit(rng.standard_normal((n, 48)))
        notes.append([w for w in scorer.warnings if "pca_dims" in w])
    assert notes[0] == notes[1] == [
        "pca_dims 100 is at least the feature width 48: PCA keeps all 48 dimensions (a rotation; nothing is dropped)."]


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_pca_clamp_small_sample(config: str) -> None:
    rng = np.random.default_rng(4)
    name, kwargs = CONFIGS[config]
    scorer = sc.build_scorer(name, **{**kwargs, "pca_dims": 100})
    scorer.fit(rng.standard_normal((30, 50)) + 3.0)
    assert scorer.score(rng.standard_normal((5, 50))).shape == (5,)
    assert any("pca_dims clamped from 100 to 29" in w for w in scorer.warnings)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_invalid_fit_inputs(config: str) -> None:
    scorer = _make(config)
    with pytest.raises(ValueError, match="at least 2"):
        scorer.fit(np.ones((1, DIM)))
    bad = np.random.default_rng(5).standard_normal((20, DIM))
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or Inf"):
        scorer.fit(bad)
    bad[3, 2] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        scorer.fit(bad)


def test_score_before_fit_and_wrong_width() -> None:
    scorer = sc.MahalanobisScorer()
    with pytest.raises(RuntimeError):
        scorer.score(np.zeros((2, 3)))
    scorer.fit(np.random.default_rng(0).standard_normal((20, 3)))
    with pytest.raises(ValueError, match="columns"):
        scorer.score(np.zeros((2, 4)))


def test_build_scorer_unknown_name_lists_valid() -> None:
    with pytest.raises(ValueError, match="gmm_kmeans.*kmeans.*knn.*mae_recon.*mahalanobis"):
        sc.build_scorer("recon")
    assert isinstance(sc.build_scorer("knn", k=1), sc.KNNScorer)


# --- elbow -----------------------------------------------------------------


def test_elbow_picks_three_blobs() -> None:
    x, _ = make_blobs(n_samples=300, centers=3, n_features=8, cluster_std=0.6, random_state=0)
    scorer = sc.KMeansScorer(pca_dims=None, k_range=(1, 10), seed=0).fit(x)
    assert scorer.k == 3
    assert sorted(scorer.inertias) == list(range(1, 11))


def test_elbow_rule_on_hand_curve() -> None:
    # Sharp knee at k=3; straight line and too-short curves fall back to the smallest k.
    assert sc.choose_elbow_k({1: 100.0, 2: 60.0, 3: 10.0, 4: 8.0, 5: 7.0}) == 3
    assert sc.choose_elbow_k({1: 4.0, 2: 3.0, 3: 2.0, 4: 1.0}) == 1
    assert sc.choose_elbow_k({2: 5.0, 3: 1.0}) == 2
    assert sc.choose_elbow_k({1: 1.0, 2: 1.0, 3: 1.0}) == 1


def test_k_range_clamped_to_samples() -> None:
    x = np.random.default_rng(0).standard_normal((5, 3))
    scorer = sc.KMeansScorer(pca_dims=None, k_range=(1, 10)).fit(x)
    assert max(scorer.inertias) == 5
    assert any("k_range" in w for w in scorer.warnings)


# --- gmm_kmeans ----------------------------------------------------------------


def test_gmm_kmeans_drops_train_only() -> None:
    rng = np.random.default_rng(6)
    n_train = 317
    train = _gauss(rng, MU_A, n_train)
    test = np.concatenate([_gauss(rng, MU_A, 40), _gauss(rng, MU_B, 13)])
    scorer = sc.GMMKMeansScorer(pca_dims=10, drop_fraction=0.06, k_range=(1, 5)).fit(train)
    assert scorer.n_dropped == int(np.floor(0.06 * n_train + 0.5)) == 19
    assert scorer.score(test).shape == (len(test),)


def test_gmm_kmeans_drops_the_least_likely_train_points() -> None:
    rng = np.random.default_rng(7)
    directions = rng.standard_normal((10, DIM))
    outliers = MU_A + 30.0 * directions / np.linalg.norm(directions, axis=1, keepdims=True)
    train = np.concatenate([_gauss(rng, MU_A, 190), outliers])
    scorer = sc.GMMKMeansScorer(pca_dims=None, drop_fraction=0.05, n_components=1, k_range=(1, 4)).fit(train)
    assert scorer.fitted_n_components == 1
    np.testing.assert_array_equal(scorer.dropped_idx, np.arange(190, 200))


# --- knn -----------------------------------------------------------------------


def _brute_knn(train: np.ndarray, query: np.ndarray, k: int, metric: str) -> np.ndarray:
    d = cdist(query, train, metric="cosine" if metric == "cosine" else "euclidean")
    return np.sort(d, axis=1)[:, :k].mean(axis=1)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
@pytest.mark.parametrize("k", [1, 2])
def test_knn_matches_brute_force(metric: str, k: int) -> None:
    rng = np.random.default_rng(8)
    train = rng.standard_normal((53, 8)) + 1.0
    query = np.concatenate([rng.standard_normal((28, 8)) + 1.0, train[5:6]])  # 29 rows, one duplicate
    scorer = sc.KNNScorer(k=k, metric=metric, chunk_size=7, train_chunk_size=11).fit(train)
    got = scorer.score(query)
    np.testing.assert_allclose(got, _brute_knn(train, query, k, metric), rtol=1e-5, atol=1e-5)
    if k == 1:
        assert abs(got[-1]) < 1e-6


def _max_intermediate_size(jaxpr) -> int:
    biggest = 0
    for eqn in jaxpr.eqns:
        for var in eqn.outvars:
            biggest = max(biggest, int(np.prod(getattr(var.aval, "shape", ()))))
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)
            if inner is not None:
                biggest = max(biggest, _max_intermediate_size(getattr(inner, "jaxpr", inner)))
    return biggest


def test_knn_never_builds_full_distance_matrix() -> None:
    chunk_q, n_chunks, chunk_t, dim, k = 8, 6, 16, 2, 2
    n_train = n_chunks * chunk_t
    closed = jax.make_jaxpr(lambda q, t, v: sc._knn_mean_distance(q, t, v, k=k, metric="l2"))(
        np.zeros((chunk_q, dim), np.float32),
        np.zeros((n_chunks, chunk_t, dim), np.float32),
        np.ones((n_chunks, chunk_t), bool),
    )
    biggest = _max_intermediate_size(closed.jaxpr)
    assert biggest < chunk_q * n_train
    assert biggest >= chunk_q * chunk_t  # the per-chunk distance block is there


def test_knn_k_larger_than_train_is_clamped_and_noted() -> None:
    train = np.ones((3, 2)) + np.arange(3)[:, None] * np.array([1.0, 2.0])
    scorer = sc.KNNScorer(k=5, metric="l2").fit(train)
    assert scorer.fitted_k == 3 and scorer.k == 5
    assert scorer.warnings == ["k clamped from 5 to n_samples=3."]
    query = np.array([[0.0, 0.0]])
    np.testing.assert_allclose(scorer.score(query), _brute_knn(train, query, 3, "l2"), rtol=1e-5)


# --- PCA keeps the residual when the normals are too few (issue 12, case 1) ----------


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_knn_with_too_few_normals_for_pca_equals_knn_on_the_raw_features(metric: str) -> None:
    """pca_dims >= n - 1: the kept components plus the residual norm preserve every distance
    (and, uncentred, every cosine) to a training normal, so PCA changes no score at all."""
    rng = np.random.default_rng(11)
    train = rng.standard_normal((7, 40)) + 2.0
    query = np.concatenate([rng.standard_normal((9, 40)) + 2.0, train[:1]])
    scorer = sc.KNNScorer(k=2, metric=metric, pca_dims=100).fit(train)
    assert any("residual" in w for w in scorer.warnings)
    np.testing.assert_allclose(scorer.score(query), _brute_knn(train, query, 2, metric), rtol=1e-5, atol=1e-5)
    plain = sc.KNNScorer(k=2, metric=metric, pca_dims=100, pca_residual="never").fit(train).score(query)
    assert not np.allclose(plain, _brute_knn(train, query, 2, metric), rtol=1e-3)


def test_kmeans_with_too_few_normals_scores_the_raw_distance_to_the_centroid() -> None:
    rng = np.random.default_rng(12)
    train, query = rng.standard_normal((6, 30)), rng.standard_normal((5, 30)) * 2.0
    scorer = sc.KMeansScorer(pca_dims=100, k_range=(1, 1)).fit(train)
    np.testing.assert_allclose(scorer.score(query), np.linalg.norm(query - train.mean(0), axis=1), rtol=1e-6)


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_a_novel_direction_is_anomalous_even_when_pca_spans_every_normal(config: str) -> None:
    """5 normals in 50 dims: a test point off their span in a new direction must outscore fresh normals."""
    rng = np.random.default_rng(13)
    base = rng.standard_normal(50) * 3.0
    train = base + rng.standard_normal((5, 50)) * 0.3
    normals = base + rng.standard_normal((20, 50)) * 0.3
    novel = normals[:20] + 4.0 * np.eye(50)[7]
    name, kwargs = CONFIGS[config]
    scorer = sc.build_scorer(name, **{**kwargs, "pca_dims": 100}).fit(train)
    s = scorer.score(np.concatenate([normals, novel]))
    assert roc_auc_score(np.r_[np.zeros(20), np.ones(20)], s) == 1.0


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_enough_normals_leave_pca_unchanged_and_always_adds_the_residual(config: str) -> None:
    """With n - 1 > pca_dims (the demo: 2,000 normals, 100 dims) 'auto' is exactly plain PCA."""
    rng = np.random.default_rng(14)
    train, query = rng.standard_normal((60, 20)), rng.standard_normal((15, 20))
    name, kwargs = CONFIGS[config]
    auto = sc.build_scorer(name, **{**kwargs, "pca_dims": 8})
    np.testing.assert_array_equal(
        auto.fit(train).score(query),
        sc.build_scorer(name, **{**kwargs, "pca_dims": 8, "pca_residual": "never"}).fit(train).score(query),
    )
    assert not any("residual" in w for w in auto.warnings)
    always = sc.build_scorer(name, **{**kwargs, "pca_dims": 8, "pca_residual": "always"}).fit(train)
    assert always._pca.dims == 9 and always.score(query).shape == (15,)
    with pytest.raises(ValueError, match="pca_residual"):
        sc.build_scorer(name, **{**kwargs, "pca_dims": 8, "pca_residual": "sometimes"}).fit(train)


# --- mahalanobis ---------------------------------------------------------------


def test_mahalanobis_matches_numpy_formula() -> None:
    rng = np.random.default_rng(9)
    mix = rng.standard_normal((6, 6))
    train = rng.standard_normal((200, 6)) @ mix + 2.0
    query = rng.standard_normal((25, 6)) @ mix
    lw = LedoitWolf().fit(train)
    d = query - lw.location_
    expected = np.einsum("ij,jk,ik->i", d, np.linalg.inv(lw.covariance_), d)
    got = sc.MahalanobisScorer(pca_dims=None).fit(train).score(query)
    np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_mae_recon_scorer_matches_formula_and_fits_on_train_only() -> None:
    rng = np.random.default_rng(0)
    train = rng.gamma(2.0, 1.0, size=(200, 16))
    test = np.concatenate([rng.gamma(2.0, 1.0, size=(50, 16)), rng.gamma(2.0, 1.0, size=(50, 16)) + 3.0])
    scorer = sc.build_scorer("mae_recon").fit(train)
    expected = ((test - train.mean(0)) / (train.std(0) + 1e-6)).mean(1)
    np.testing.assert_allclose(scorer.score(test), expected, rtol=1e-10)
    plain = sc.build_scorer("mae_recon", normalize=False).fit(train)
    np.testing.assert_allclose(plain.score(test), test.mean(1))
    is_anomaly = np.r_[np.zeros(50), np.ones(50)]
    from sklearn.metrics import roc_auc_score

    assert roc_auc_score(is_anomaly, scorer.score(test)) > 0.95


def test_cosine_knn_with_pca_keeps_a_tight_normal_class_normal() -> None:
    """Centring on one class's mean before cosine would put its own points in random
    directions and score them as anomalous; the uncentred projection must not."""
    rng = np.random.default_rng(0)
    normal_dir, other_dir = np.zeros(50), np.zeros(50)
    normal_dir[0], other_dir[1] = 10.0, 10.0
    train = normal_dir + rng.normal(0, 0.5, size=(300, 50))
    test = np.concatenate([normal_dir + rng.normal(0, 0.5, size=(100, 50)), other_dir + rng.normal(0, 0.5, size=(100, 50))])
    is_anomaly = np.r_[np.zeros(100), np.ones(100)]
    from sklearn.metrics import roc_auc_score

    scores = sc.KNNScorer(k=2, metric="cosine", pca_dims=10).fit(train).score(test)
    assert roc_auc_score(is_anomaly, scores) > 0.99
