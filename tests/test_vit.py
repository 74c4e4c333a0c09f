import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssl_ad.models.vit import ViT, pool_tokens, resize_posemb, sincos_2d_posemb


@pytest.mark.parametrize(
    "image,patch,width,depth,heads,cls",
    [(32, 4, 32, 1, 2, True), (28, 4, 48, 2, 3, False), (64, 16, 64, 1, 4, True)],
)
def test_output_shapes(image, patch, width, depth, heads, cls):
    model = ViT(image_size=image, patch_size=patch, width=width, depth=depth, num_heads=heads, use_cls=cls)
    x = jnp.zeros((2, image, image, 3))
    params = model.init(jax.random.key(0), x)
    tokens = model.apply(params, x)
    n = (image // patch) ** 2
    assert tokens.shape == (2, n + int(cls), width)
    # A subset of patches (MAE) and another crop size (DINO local crops).
    keep = jnp.tile(jnp.arange(3)[None], (2, 1))
    assert model.apply(params, x, keep_idx=keep).shape == (2, 3 + int(cls), width)
    small = jnp.zeros((2, image // 2, image // 2, 3))
    assert model.apply(params, small).shape == (2, (image // 2 // patch) ** 2 + int(cls), width)


def test_cls_flag_controls_parameters():
    with_cls = ViT(image_size=16, patch_size=4, width=16, depth=1, num_heads=2, use_cls=True)
    without = with_cls.clone(use_cls=False)
    x = jnp.zeros((1, 16, 16, 3))
    assert "cls_token" in with_cls.init(jax.random.key(0), x)["params"]
    assert "cls_token" not in without.init(jax.random.key(0), x)["params"]


def test_pooling():
    tokens = jnp.arange(2 * 3 * 4, dtype=jnp.float32).reshape(2, 3, 4)
    np.testing.assert_allclose(pool_tokens(tokens, "cls", True), tokens[:, 0])
    np.testing.assert_allclose(pool_tokens(tokens, "mean", True), tokens[:, 1:].mean(1))
    np.testing.assert_allclose(pool_tokens(tokens, "mean", False), tokens.mean(1))
    assert pool_tokens(tokens, "cls+mean", True).shape == (2, 8)
    with pytest.raises(ValueError):
        pool_tokens(tokens, "cls", False)


def test_sincos_and_resize():
    table = sincos_2d_posemb(4, 8)
    assert table.shape == (16, 8)
    # Position (row 0, col 1): x-part uses col=1, y-part row=0 -> sin(0)=0, cos(0)=1.
    np.testing.assert_allclose(table[1, 4:6], [0.0, 0.0], atol=1e-7)
    np.testing.assert_allclose(table[1, 6:8], [1.0, 1.0], atol=1e-7)
    emb = jnp.asarray(table)[None]
    assert resize_posemb(emb, 4) is emb
    assert resize_posemb(emb, 2).shape == (1, 4, 8)


def test_drop_path_only_in_training():
    model = ViT(image_size=16, patch_size=4, width=16, depth=2, num_heads=2, drop_path_rate=0.5)
    x = jax.random.normal(jax.random.key(1), (4, 16, 16, 3))
    params = model.init(jax.random.key(0), x)
    a = model.apply(params, x)
    b = model.apply(params, x)
    np.testing.assert_array_equal(a, b)
    c = model.apply(params, x, train=True, rngs={"dropout": jax.random.key(2)})
    assert not np.allclose(a, c)
