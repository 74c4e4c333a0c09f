"""ViT initialisation, local-crop position-embedding interpolation and CLS position against the
PyTorch references (facebookresearch/dino ``vision_transformer.py``, facebookresearch/mae
``models_mae.py``), checked with independent formulas; the legacy rule reproduces the
parameters of the code before the split exactly."""

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ssl_ad.config_defaults import (
    LEGACY_MODEL_KEYS,
    base_config,
    dino_block,
    fill_legacy_model_keys,
    mae_block,
)
from ssl_ad.methods import build_method
from ssl_ad.methods.dino import DINOHead
from ssl_ad.models.vit import (
    ViT,
    reference_trunc_normal,
    resize_posemb,
    sincos_2d_posemb,
    vit_from_config,
)

# Read when something compiles, so setting it after the imports is enough.
jax.config.update("jax_disable_most_optimizations", True)

C = 3  # image channels


def _cfg(method: str, posemb: str, **model) -> ml_collections.ConfigDict:
    c = base_config()
    c.method = method
    c.model.update({"image_size": 8, "patch_size": 4, "width": 8, "depth": 1, "num_heads": 2, "posemb": posemb})
    c.model.update(model)
    if method == "mae":
        c.mae = mae_block()
        c.mae.update({"decoder_width": 8, "decoder_depth": 1, "decoder_heads": 2})
    else:
        c.dino = dino_block()
        c.dino.update({"out_dim": 16, "hidden_dim": 8, "bottleneck_dim": 4})
    return c


def _init(method: str, config) -> dict:
    m = build_method(config)
    s = config.model.image_size
    batch = {"image": jnp.zeros((1, s, s, C))} if method == "mae" else {"global": jnp.zeros((1, 2, s, s, C))}
    return m.init(jax.random.key(0), batch)[0]


def _leaves(tree) -> dict[str, np.ndarray]:
    return {
        "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf, np.float64)
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]
    }


# -- legacy: the parameters of ssl_ad before the per-method rules, bit for bit ----------------------

# Per-leaf (sum, sum of squares) of MAE / DINO parameters initialised by the code before this
# change (git HEAD of ssl_ad/models/vit.py etc.) for _cfg(...) with jax.random.key(0); 0.0 / 1.0 =
# every entry equals that value.
OLD_DIGEST = {
    "mae:decoder/block0/attn/proj/bias": 0.0,
    "mae:decoder/block0/attn/proj/kernel": (-0.6809077, 7.524288758),
    "mae:decoder/block0/attn/qkv/bias": 0.0,
    "mae:decoder/block0/attn/qkv/kernel": (-3.3348783, 12.229506939),
    "mae:decoder/block0/mlp/fc1/bias": 0.0,
    "mae:decoder/block0/mlp/fc1/kernel": (-2.1985042, 12.760234675),
    "mae:decoder/block0/mlp/fc2/bias": 0.0,
    "mae:decoder/block0/mlp/fc2/kernel": (0.9019737, 13.763958293),
    "mae:decoder/block0/norm1/bias": 0.0,
    "mae:decoder/block0/norm1/scale": 1.0,
    "mae:decoder/block0/norm2/bias": 0.0,
    "mae:decoder/block0/norm2/scale": 1.0,
    "mae:decoder/embed/bias": 0.0,
    "mae:decoder/embed/kernel": (5.5584635, 9.43137222),
    "mae:decoder/mask_token": (-0.0388854, 0.001260085),
    "mae:decoder/norm/bias": 0.0,
    "mae:decoder/norm/scale": 1.0,
    "mae:decoder/pred/bias": 0.0,
    "mae:decoder/pred/kernel": (-0.8571587, 13.415440774),
    "mae:encoder/block0/attn/proj/bias": 0.0,
    "mae:encoder/block0/attn/proj/kernel": (-1.7545354, 8.662184518),
    "mae:encoder/block0/attn/qkv/bias": 0.0,
    "mae:encoder/block0/attn/qkv/kernel": (2.0034531, 11.620572001),
    "mae:encoder/block0/mlp/fc1/bias": 0.0,
    "mae:encoder/block0/mlp/fc1/kernel": (4.3710359, 13.655584842),
    "mae:encoder/block0/mlp/fc2/bias": 0.0,
    "mae:encoder/block0/mlp/fc2/kernel": (-4.7674506, 13.803257056),
    "mae:encoder/block0/norm1/bias": 0.0,
    "mae:encoder/block0/norm1/scale": 1.0,
    "mae:encoder/block0/norm2/bias": 0.0,
    "mae:encoder/block0/norm2/scale": 1.0,
    "mae:encoder/cls_pos": (-0.002933, 0.003709505),
    "mae:encoder/cls_token": (-0.0462851, 0.003428583),
    "mae:encoder/norm/bias": 0.0,
    "mae:encoder/norm/scale": 1.0,
    "mae:encoder/patch_embed/bias": 0.0,
    "mae:encoder/patch_embed/kernel": (0.0439144, 4.497558148),
    "dino:backbone/block0/attn/proj/bias": 0.0,
    "dino:backbone/block0/attn/proj/kernel": (-1.7545354, 8.662184518),
    "dino:backbone/block0/attn/qkv/bias": 0.0,
    "dino:backbone/block0/attn/qkv/kernel": (2.0034531, 11.620572001),
    "dino:backbone/block0/mlp/fc1/bias": 0.0,
    "dino:backbone/block0/mlp/fc1/kernel": (4.3710359, 13.655584842),
    "dino:backbone/block0/mlp/fc2/bias": 0.0,
    "dino:backbone/block0/mlp/fc2/kernel": (-4.7674506, 13.803257056),
    "dino:backbone/block0/norm1/bias": 0.0,
    "dino:backbone/block0/norm1/scale": 1.0,
    "dino:backbone/block0/norm2/bias": 0.0,
    "dino:backbone/block0/norm2/scale": 1.0,
    "dino:backbone/cls_pos": (0.069845, 0.00138794),
    "dino:backbone/cls_token": (-0.002933, 0.003709505),
    "dino:backbone/norm/bias": 0.0,
    "dino:backbone/norm/scale": 1.0,
    "dino:backbone/patch_embed/bias": 0.0,
    "dino:backbone/patch_embed/kernel": (0.0439144, 4.497558148),
    "dino:backbone/pos_embed": (0.0207747, 0.009126696),
    "dino:head/last_layer/kernel": (3.9833947, 5.764087736),
    "dino:head/mlp0/bias": 0.0,
    "dino:head/mlp0/kernel": (0.0884836, 0.024238475),
    "dino:head/mlp1/bias": 0.0,
    "dino:head/mlp1/kernel": (0.0439882, 0.017933679),
    "dino:head/mlp2/bias": 0.0,
    "dino:head/mlp2/kernel": (-0.0190528, 0.009116546),
}


def _old_style_config(method: str, posemb: str) -> ml_collections.ConfigDict:
    """A config as saved before model.init / posemb_interpolation / cls_pos existed."""
    c = _cfg(method, posemb)
    for key in LEGACY_MODEL_KEYS:
        del c.model[key]
    return c


@pytest.mark.parametrize("method,posemb", [("mae", "sincos"), ("dino", "learned")])
def test_legacy_mode_reproduces_the_old_parameters(method, posemb):
    config = fill_legacy_model_keys(_old_style_config(method, posemb))
    assert {k: config.model[k] for k in LEGACY_MODEL_KEYS} == LEGACY_MODEL_KEYS
    got = _leaves(_init(method, config))
    want = {k.split(":", 1)[1]: v for k, v in OLD_DIGEST.items() if k.startswith(method + ":")}
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        if isinstance(value, tuple):
            np.testing.assert_allclose([got[key].sum(), (got[key] ** 2).sum()], value, rtol=1e-5, atol=1e-6,
                                       err_msg=key)
        else:
            assert np.all(got[key] == value), key


def test_fill_legacy_keeps_explicit_values():
    c = _cfg("mae", "sincos", init="dino")
    del c.model["cls_pos"]
    fill_legacy_model_keys(c)
    assert c.model.init == "dino" and c.model.cls_pos == "learned"
    assert c.model.posemb_interpolation == "torch_bicubic"


# -- the reference defaults -------------------------------------------------------------------------


def test_reference_init_follows_the_method():
    assert build_method(_cfg("mae", "sincos")).encoder.init_style == "mae"
    assert build_method(_cfg("mae", "learned")).encoder.init_style == "mae"
    dino = build_method(_cfg("dino", "learned"))
    assert dino.student.init_style == dino.teacher.init_style == "dino" and dino.head.init_style == "dino"
    assert build_method(_cfg("dino", "sincos")).student.init_style == "dino"
    # Without a method (random-init baseline): the positional embedding's reference.
    assert vit_from_config(_cfg("mae", "sincos").model).init_style == "mae"
    assert vit_from_config(_cfg("dino", "learned").model).init_style == "dino"
    assert vit_from_config(_cfg("dino", "learned", init="xavier_legacy").model, method="dino").init_style == (
        "xavier_legacy"
    )
    assert build_method(_cfg("dino", "learned", init="xavier_legacy")).head.init_style == "xavier_legacy"
    with pytest.raises(ValueError):
        vit_from_config(_cfg("mae", "sincos", init="he").model)


@pytest.mark.parametrize(
    "method,posemb,cls_pos,present",
    [("mae", "sincos", "reference", False), ("dino", "learned", "reference", True), ("mae", "sincos", "learned", True),
     ("dino", "learned", "zero", False)],
)
def test_cls_pos_parameter_present_or_absent(method, posemb, cls_pos, present):
    enc = _init(method, _cfg(method, posemb, cls_pos=cls_pos))["encoder" if method == "mae" else "backbone"]
    assert ("cls_pos" in enc) == present
    assert ("pos_embed" in enc) == (posemb == "learned")
    assert "cls_token" in enc


def test_zero_cls_position_is_the_fixed_zero_row():
    """cls_pos='zero' == a learned cls_pos that is 0: the CLS token enters with no position added."""
    x = jax.random.normal(jax.random.key(3), (2, 8, 8, C))
    zero = ViT(image_size=8, patch_size=4, width=8, depth=1, num_heads=2, posemb="sincos", cls_pos="reference")
    learned = zero.clone(cls_pos="learned")
    p = zero.init(jax.random.key(0), x)["params"]
    q = dict(p, cls_pos=jnp.zeros((1, 1, 8)))
    np.testing.assert_allclose(zero.apply({"params": p}, x), learned.apply({"params": q}, x), rtol=0, atol=0)


def mae_get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """facebookresearch/mae util/pos_embed.py get_2d_sincos_pos_embed(..., cls_token=True), transcribed."""

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])
    emb = np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)
    return np.concatenate([np.zeros([1, embed_dim]), emb], axis=0)


def test_sincos_table_is_maes_with_a_zero_cls_row():
    ref = mae_get_2d_sincos_pos_embed(16, 5)
    assert np.all(ref[0] == 0)
    np.testing.assert_allclose(sincos_2d_posemb(5, 16), ref[1:], atol=1e-6)


# -- initialiser statistics on real parameter trees ---------------------------------------------------

D, P = 384, 4  # width, patch: enough samples per tensor for 1-2 % checks
FAN_IN = C * P * P


@functools.cache
def _big(style: str, posemb: str) -> dict[str, np.ndarray]:
    vit = ViT(image_size=32, patch_size=P, width=D, depth=1, num_heads=6, posemb=posemb, init_style=style,
              cls_pos="learned")
    x = jnp.zeros((1, 32, 32, C))
    return _leaves(jax.jit(lambda k: vit.init(k, x)["params"])(jax.random.key(1)))


def _check_uniform(x: np.ndarray, bound: float, what: str):
    assert np.abs(x).max() <= bound * (1 + 1e-6), what
    assert np.abs(x).max() > 0.95 * bound, what  # fills the range (not a narrower rule)
    n = x.size
    tol = 4 * math.sqrt(0.8 / (4 * n)) + 1e-3  # ~4 sigma of the relative error of a uniform's sample std
    assert abs(x.std() / (bound / math.sqrt(3)) - 1) < tol, (what, x.std(), bound / math.sqrt(3))


def _check_normal(x: np.ndarray, std: float, what: str, untruncated: bool = True):
    tol = 4 / math.sqrt(2 * x.size) + 1e-3
    assert abs(x.std() / std - 1) < tol, (what, x.std())
    assert abs(x.mean()) < 4 * std / math.sqrt(x.size), what
    if untruncated:  # flax's truncated_normal would stop at 2 std
        assert np.abs(x).max() > 2.5 * std, what


def _check_common(p: dict[str, np.ndarray]):
    for key, x in p.items():
        if key.endswith("scale"):
            assert np.all(x == 1), key
        elif key.endswith("bias") and not key.startswith("patch_embed"):
            assert np.all(x == 0), key


def test_dino_init_matches_the_reference_rule():
    p = _big("dino", "learned")
    _check_common(p)
    for key in ("block0/attn/qkv/kernel", "block0/attn/proj/kernel", "block0/mlp/fc1/kernel", "block0/mlp/fc2/kernel"):
        _check_normal(p[key], 0.02, key)  # trunc_normal_(std=.02), bounds +-2 absolute
    _check_normal(p["pos_embed"], 0.02, "pos_embed")
    _check_normal(p["cls_pos"], 0.02, "cls_pos", untruncated=False)
    _check_normal(p["cls_token"], 0.02, "cls_token", untruncated=False)
    # PatchEmbed.proj: nn.Conv2d default, weight and bias U(+-1/sqrt(C*p*p)).
    _check_uniform(p["patch_embed/kernel"], 1 / math.sqrt(FAN_IN), "patch kernel")
    _check_uniform(p["patch_embed/bias"], 1 / math.sqrt(FAN_IN), "patch bias")


def test_mae_init_matches_the_reference_rule():
    p = _big("mae", "sincos")
    _check_common(p)
    assert "pos_embed" not in p
    xavier = {
        "block0/attn/qkv/kernel": (D, 3 * D),  # one (3D, D) nn.Linear
        "block0/attn/proj/kernel": (D, D),
        "block0/mlp/fc1/kernel": (D, 4 * D),
        "block0/mlp/fc2/kernel": (4 * D, D),
    }
    for key, (fan_in, fan_out) in xavier.items():
        _check_uniform(p[key], math.sqrt(6 / (fan_in + fan_out)), key)
    # xavier_uniform_ on the flattened (D, C*p*p) kernel: wider than flax's receptive-field fans.
    bound = math.sqrt(6 / (FAN_IN + D))
    assert bound > math.sqrt(6 / (P * P * (C + D)))
    _check_uniform(p["patch_embed/kernel"], bound, "patch kernel")
    _check_uniform(p["patch_embed/bias"], 1 / math.sqrt(FAN_IN), "patch bias")  # conv default, untouched
    _check_normal(p["cls_token"], 0.02, "cls_token", untruncated=False)  # normal_(std=.02)


def test_mae_decoder_mask_token_and_linears():
    c = _cfg("mae", "sincos")
    c.mae.update({"decoder_width": 256, "decoder_depth": 1, "decoder_heads": 4})
    dec = _leaves(_init("mae", c)["decoder"])
    _check_common(dec)
    _check_normal(dec["mask_token"], 0.02, "mask_token", untruncated=False)
    _check_uniform(dec["block0/attn/qkv/kernel"], math.sqrt(6 / (4 * 256)), "decoder qkv")
    _check_uniform(dec["embed/kernel"], math.sqrt(6 / (8 + 256)), "decoder embed")


def test_legacy_style_statistics():
    p = _big("xavier_legacy", "learned")
    assert np.all(p["patch_embed/bias"] == 0)
    # flax xavier on the (p, p, C, D) kernel: receptive-field fans.
    _check_uniform(p["patch_embed/kernel"], math.sqrt(6 / (P * P * (C + D))), "patch kernel")
    # flax truncated_normal(0.02): cut at 2 std, std 0.0176.
    x = p["pos_embed"]
    assert np.abs(x).max() <= 0.04 and abs(x.std() / 0.01759 - 1) < 0.03


def test_dino_head_init():
    head = DINOHead(out_dim=4096, hidden_dim=512, bottleneck_dim=256, num_layers=3)
    p = _leaves(head.init(jax.random.key(2), jnp.zeros((1, 384)))["params"])
    for key in ("mlp0/kernel", "mlp1/kernel", "mlp2/kernel"):
        _check_normal(p[key], 0.02, key)  # DINOHead._init_weights: trunc_normal_(std=.02) == N(0, .02^2)
        assert np.all(p[key.replace("kernel", "bias")] == 0)
    # weight_norm(nn.Linear(256, out, bias=False)): v at torch's Linear default, g fixed 1 (no parameter).
    _check_uniform(p["last_layer/kernel"], 1 / math.sqrt(256), "last_layer v")
    assert "last_layer/scale" not in p
    legacy = DINOHead(out_dim=16, hidden_dim=4096, bottleneck_dim=8, num_layers=2, init_style="xavier_legacy")
    q = _leaves(legacy.init(jax.random.key(2), jnp.zeros((1, 384)))["params"])
    assert np.abs(q["mlp0/kernel"]).max() <= 0.04  # flax's 2-std truncation


def test_reference_trunc_normal_is_untruncated_at_std_002():
    x = np.asarray(reference_trunc_normal(0.02)(jax.random.key(0), (400_000,)), np.float64)
    _check_normal(x, 0.02, "trunc_normal_")
    assert np.abs(x).max() <= 2.0
    kurt = ((x - x.mean()) ** 4).mean() / x.var() ** 2
    assert abs(kurt - 3) < 0.05  # a Gaussian's; flax's 2-std truncation gives ~2.4


# -- position-embedding interpolation for local crops -------------------------------------------------


def keys_cubic(d: float, a: float = -0.75) -> float:
    """The cubic convolution kernel W(d) (Keys 1981) at distance |d|, with PyTorch's a = -0.75."""
    d = abs(d)
    if d <= 1:
        return (a + 2) * d**3 - (a + 3) * d**2 + 1
    if d < 2:
        return a * d**3 - 5 * a * d**2 + 8 * a * d - 4 * a
    return 0.0


def numpy_bicubic(img: np.ndarray, out: int, scale: float) -> np.ndarray:
    """Independent 2-D bicubic resize of (g, g, D), pixel by pixel: source x = (i + 0.5) / scale - 0.5,
    the 4x4 neighbours around it with indices clamped to the image (align_corners=False, no antialias)."""
    g = img.shape[0]
    res = np.zeros((out, out, img.shape[2]))
    for i in range(out):
        for j in range(out):
            y, x = (i + 0.5) / scale - 0.5, (j + 0.5) / scale - 0.5
            y0, x0 = math.floor(y), math.floor(x)
            for m in range(y0 - 1, y0 + 3):
                for n in range(x0 - 1, x0 + 3):
                    w = keys_cubic(y - m) * keys_cubic(x - n)
                    res[i, j] += w * img[min(max(m, 0), g - 1), min(max(n, 0), g - 1)]
    return res


@pytest.mark.parametrize("grid,new", [(7, 3), (6, 4), (4, 6), (5, 2)])
def test_torch_bicubic_matches_numpy_reference(grid, new):
    emb = np.random.default_rng(0).normal(size=(1, grid * grid, 5)).astype(np.float32)
    got = np.asarray(resize_posemb(jnp.asarray(emb), new, "torch_bicubic")).reshape(new, new, 5)
    want = numpy_bicubic(emb.reshape(grid, grid, 5).astype(np.float64), new, (new + 0.1) / grid)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grid,new", [(14, 6), (7, 3), (4, 6)])
def test_torch_bicubic_matches_torch_interpolate(grid, new):
    """DINO's interpolate_pos_encoding, line by line in torch."""
    torch = pytest.importorskip("torch")
    dim = 6
    emb = np.random.default_rng(1).normal(size=(1, grid * grid, dim)).astype(np.float32)
    w0 = h0 = new + 0.1
    ref = torch.nn.functional.interpolate(
        torch.from_numpy(emb).reshape(1, grid, grid, dim).permute(0, 3, 1, 2),
        scale_factor=(w0 / math.sqrt(grid * grid), h0 / math.sqrt(grid * grid)),
        mode="bicubic",
    )
    assert ref.shape[-2:] == (new, new)
    ref = ref.permute(0, 2, 3, 1).reshape(1, -1, dim).numpy()
    got = np.asarray(resize_posemb(jnp.asarray(emb), new, "torch_bicubic"))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=2e-6)
    # The old rule (antialiased jax.image.resize) is a different function when shrinking.
    if new < grid:
        assert np.abs(np.asarray(resize_posemb(jnp.asarray(emb), new, "antialiased")) - ref).max() > 1e-3


def test_vit_uses_the_configured_interpolation():
    vit = ViT(image_size=16, patch_size=4, width=8, depth=1, num_heads=2)
    assert vit.posemb_interpolation == "torch_bicubic"
    x = jax.random.normal(jax.random.key(0), (1, 8, 8, C))
    p = vit.init(jax.random.key(1), jnp.zeros((1, 16, 16, C)))["params"]
    tokens = vit.apply({"params": p}, x, method=ViT.patchify_embed)
    patches = vit.apply({"params": p}, x, method=lambda m, im: m.patch_embed(im)).reshape(1, 4, 8)
    np.testing.assert_allclose(tokens, patches + resize_posemb(p["pos_embed"], 2, "torch_bicubic"), atol=1e-6)
    old = vit.clone(posemb_interpolation="antialiased")
    np.testing.assert_allclose(
        old.apply({"params": p}, x, method=ViT.patchify_embed),
        patches + jax.image.resize(p["pos_embed"].reshape(1, 4, 4, 8), (1, 2, 2, 8), "bicubic").reshape(1, 4, 8),
        atol=1e-6,
    )
    with pytest.raises(ValueError):
        vit.clone(posemb_interpolation="nearest").init(jax.random.key(1), x)


# -- old checkpoints still load ---------------------------------------------------------------------------


def test_checkpoint_saved_before_the_new_keys_loads_and_embeds_the_same(tmp_path):
    from ssl_ad.evaluation.embedding import embed_images, load_checkpoint
    from ssl_ad.checkpointing import Checkpointer

    old = _old_style_config("mae", "sincos")
    params = _init("mae", fill_legacy_model_keys(_old_style_config("mae", "sincos")))
    assert "cls_pos" in params["encoder"]  # what MAE checkpoints of then hold
    ckpt = Checkpointer(str(tmp_path / "checkpoints"), max_to_keep=1)
    ckpt.save(0, {"params": params}, {"step": 0, "config": old.to_dict(), "version": "old"})
    ckpt.close()
    loaded = load_checkpoint(str(tmp_path))
    assert loaded.config.model.cls_pos == "learned" and loaded.config.model.init == "xavier_legacy"
    images = np.asarray(jax.random.normal(jax.random.key(5), (3, 8, 8, C)))
    feats = embed_images(loaded.encoder(), loaded.encoder_params("default"), images, "cls", batch_size=4)
    legacy_vit = ViT(image_size=8, patch_size=4, width=8, depth=1, num_heads=2, posemb="sincos", cls_pos="learned",
                     posemb_interpolation="antialiased", init_style="xavier_legacy")
    want = np.asarray(legacy_vit.apply({"params": params["encoder"]}, images))[:, 0]
    np.testing.assert_allclose(feats, want, rtol=1e-5, atol=1e-5)
