import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_ad.methods.mae import (
    inverse_permutation,
    masked_mse,
    num_visible,
    patch_targets,
    patchify,
    permute_tokens,
    random_masking,
    unpatchify,
)


def numpy_mae_loss(pred, images, mask, patch, norm_pix):
    """Independent loop-based MAE loss: mean over masked patches of per-patch MSE."""
    b, h, _, _ = images.shape
    g = h // patch
    losses = []
    for i in range(b):
        for r in range(g):
            for c in range(g):
                k = r * g + c
                if mask[i, k] == 0:
                    continue
                tgt = images[i, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch, :].reshape(-1)
                if norm_pix:
                    tgt = (tgt - tgt.mean()) / np.sqrt(tgt.var(ddof=1) + 1e-6)
                losses.append(np.mean((pred[i, k] - tgt) ** 2))
    return float(np.mean(losses))


@pytest.mark.parametrize("n,ratio", [(16, 0.75), (49, 0.75), (64, 0.5), (10, 0.9)])
def test_masking_counts_and_restore(n, ratio):
    keep, mask, restore = random_masking(jax.random.key(0), 5, n, ratio)
    n_keep = int(round(n * (1 - ratio)))
    assert keep.shape == (5, n_keep) and num_visible(n, ratio) == n_keep
    np.testing.assert_array_equal(mask.sum(1), n - n_keep)
    # Visible positions are exactly the kept indices.
    for i in range(5):
        assert set(np.flatnonzero(mask[i] == 0)) == set(np.asarray(keep[i]))
    # ids_restore inverts the shuffle: x_shuffled gathered by ids_restore is x.
    x = jnp.tile(jnp.arange(n)[None], (5, 1))
    noise_order = jnp.argsort(restore, axis=1)  # == ids_shuffle
    shuffled = jnp.take_along_axis(x, noise_order, 1)
    np.testing.assert_array_equal(jnp.take_along_axis(shuffled, restore, 1), x)


def test_masking_equals_the_reference_double_argsort_and_gathered_mask():
    """models_mae.py: ids_restore = argsort(ids_shuffle), mask = gather([0]*n_keep + [1]*rest, ids_restore)."""
    for seed in range(3):
        rng = jax.random.key(seed)
        keep, mask, restore = random_masking(rng, 7, 49, 0.75)
        ids_shuffle = jnp.argsort(jax.random.uniform(rng, (7, 49)), axis=1)
        ref_restore = jnp.argsort(ids_shuffle, axis=1)
        ref_mask = jnp.take_along_axis(jnp.ones((7, 49)).at[:, :12].set(0.0), ref_restore, axis=1)
        np.testing.assert_array_equal(restore, ref_restore)
        np.testing.assert_array_equal(mask, ref_mask)
        np.testing.assert_array_equal(keep, ids_shuffle[:, :12])
        assert mask.dtype == ref_mask.dtype and restore.dtype == ref_restore.dtype


def test_permute_tokens_value_and_gradient_equal_take_along_axis():
    x = jax.random.normal(jax.random.key(1), (4, 49, 8))
    perm = jax.vmap(lambda k: jax.random.permutation(k, 49))(jax.random.split(jax.random.key(2), 4))
    w = jnp.arange(8.0)

    def ref(x):
        return jnp.sum(jnp.sin(jnp.take_along_axis(x, perm[..., None], axis=1)) * w)

    def ours(x):
        return jnp.sum(jnp.sin(permute_tokens(x, perm, inverse_permutation(perm))) * w)

    np.testing.assert_array_equal(jax.jit(ref)(x), jax.jit(ours)(x))
    np.testing.assert_array_equal(jax.jit(jax.grad(ref))(x), jax.jit(jax.grad(ours))(x))


def test_masks_differ_across_samples_and_keys():
    _, m1, _ = random_masking(jax.random.key(0), 4, 64, 0.75)
    _, m2, _ = random_masking(jax.random.key(1), 4, 64, 0.75)
    assert not np.array_equal(m1[0], m1[1])
    assert not np.array_equal(m1, m2)


def test_patchify_roundtrip():
    x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
    p = patchify(x, 4)
    assert p.shape == (2, 4, 48)
    np.testing.assert_array_equal(p[0, 1], np.asarray(x[0, 0:4, 4:8, :]).reshape(-1))
    np.testing.assert_array_equal(unpatchify(p, 4), x)


@pytest.mark.parametrize("norm_pix", [False, True])
def test_loss_matches_numpy_and_ignores_visible(norm_pix):
    rng = np.random.default_rng(0)
    images = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
    pred = rng.normal(size=(2, 4, 48)).astype(np.float32)
    mask = np.array([[1, 0, 1, 0], [0, 0, 1, 1]], np.float32)
    target = patch_targets(jnp.asarray(images), 4, norm_pix)
    got = float(masked_mse(jnp.asarray(pred), target, jnp.asarray(mask)))
    assert got == pytest.approx(numpy_mae_loss(pred, images, mask, 4, norm_pix), rel=1e-5)
    # Changing the prediction of a visible patch changes nothing.
    pred2 = pred.copy()
    pred2[0, 1] += 100.0
    assert float(masked_mse(jnp.asarray(pred2), target, jnp.asarray(mask))) == pytest.approx(got, rel=1e-6)
