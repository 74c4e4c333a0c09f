"""model.scan_blocks: the ViT's blocks as one nn.scan loop, and the conversions between the layouts.

* scanned and unrolled ViTs give the same tokens and gradients for the same parameters after
  conversion, both ways, with and without remat; round trips are bit-exact;
* stochastic depth under scan: each layer drops with its own rate (linear 0 .. drop_path_rate,
  checked exactly through the 1/keep scale of kept samples) and its own key;
* the optimiser's per-tensor rules (no decay for 1-d parameters, DINO's per-tensor clipping) see
  each scanned layer as the unrolled tensor it stands for;
* config: the key is checked, old configs load and resume without it, a layout change on resume
  is refused with one error;
* a tiny ``train.py --config.model.scan_blocks=True`` run trains and its checkpoint evaluates;
  the converter writes the scanned layout (here from a NumPy state dict, so without torch; the
  timm parity of that layout is in tests/test_convert.py).
"""

from __future__ import annotations

import json
import os
import subprocess

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ssl_ad import convert
from ssl_ad.config_check import validate_train_config
from ssl_ad.config_defaults import base_config, fill_legacy_model_keys, mae_block
from ssl_ad.errors import UserInputError
from ssl_ad.evaluation.embedding import embed_images, load_checkpoint
from ssl_ad.models import layouts
from ssl_ad.models.vit import Attention, DropPath, ViT, drop_path_rates
from ssl_ad.train import config_history
from ssl_ad.train.optim import clip_per_tensor, decay_mask
from tests.conftest import REPO, tiny_train_argv

KW = dict(image_size=16, patch_size=4, width=32, depth=2, num_heads=2)
ENV = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")


def _images(n=2, size=16, seed=1):
    return jax.random.normal(jax.random.key(seed), (n, size, size, 3))


def _init(model, x):
    return jax.jit(model.init)(jax.random.key(0), x)["params"]


@pytest.fixture(scope="module")
def vit_params():
    """(unrolled, scanned) parameters of ViT(**KW), each initialised in its own layout."""
    x = _images()
    return _init(ViT(**KW), x), _init(ViT(**KW, scan_blocks=True), x)


def _max_diff(a, b) -> float:
    return max(float(jnp.abs(x - y).max()) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _bit_equal(a, b) -> bool:
    same = jax.tree.structure(a) == jax.tree.structure(b)
    return same and all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


@pytest.mark.parametrize("extra", [
    {"posemb": "learned"},
    {"posemb": "sincos", "use_cls": False, "remat": True},
])
def test_scanned_and_unrolled_agree_both_ways(extra):
    x = _images()
    unrolled, scanned = ViT(**KW, **extra), ViT(**KW, scan_blocks=True, **extra)
    pu = _init(unrolled, x)
    ps = _init(scanned, x)
    assert set(ps["blocks"]) == set(pu["block0"]) and "block0" not in ps
    assert ps["blocks"]["attn"]["qkv"]["kernel"].shape == (2, 32, 96)
    keep = jnp.array([[0, 3, 5], [1, 2, 15]])

    def tokens_and_grads(model, p):
        def loss(p):
            return (model.apply({"params": p}, x, train=True) ** 2).mean()

        return model.apply({"params": p}, x), model.apply({"params": p}, x, keep_idx=keep), jax.grad(loss)(p)

    run_u, run_s = jax.jit(lambda p: tokens_and_grads(unrolled, p)), jax.jit(lambda p: tokens_and_grads(scanned, p))
    for p_u, p_s in ((pu, layouts.unrolled_to_scan(pu)), (layouts.scan_to_unrolled(ps), ps)):
        (*tokens_u, gu), (*tokens_s, gs) = run_u(p_u), run_s(p_s)
        assert _max_diff(tokens_u, tokens_s) < 1e-5
        assert _max_diff(layouts.unrolled_to_scan(gu), gs) < 1e-5


def test_round_trips_are_exact_and_bad_trees_are_refused(vit_params):
    pu, ps = vit_params
    assert _bit_equal(layouts.scan_to_unrolled(layouts.unrolled_to_scan(pu)), pu)
    assert _bit_equal(layouts.unrolled_to_scan(layouts.scan_to_unrolled(ps)), ps)
    with pytest.raises(ValueError, match="already in the scanned layout"):
        layouts.unrolled_to_scan(ps)
    with pytest.raises(ValueError, match="not in the scanned layout"):
        layouts.scan_to_unrolled(pu)
    with pytest.raises(ValueError, match="block0..block"):
        layouts.unrolled_to_scan({k: v for k, v in pu.items() if k != "block0"})


def test_to_layout_converts_every_vit_and_nothing_else(vit_params):
    vit = vit_params[0]
    decoder = {"embed": {"kernel": jnp.ones((32, 8))}, "block0": vit["block0"], "block1": vit["block1"]}
    tree = {"params": {"encoder": vit, "decoder": decoder}, "extra": {"teacher": {"backbone": vit}, "center": jnp.ones(4)}}
    scanned = layouts.to_layout(tree, scanned=True)
    assert "blocks" in scanned["params"]["encoder"] and "blocks" in scanned["extra"]["teacher"]["backbone"]
    assert scanned["params"]["decoder"] is not decoder and _bit_equal(scanned["params"]["decoder"], decoder)
    assert _bit_equal(layouts.to_layout(scanned, scanned=False), tree)
    assert _bit_equal(layouts.to_layout(scanned, scanned=True), scanned)  # already there: unchanged


def _captured(model, params, x, rng):
    """Outputs of every Attention and DropPath in a train-mode pass (layer axis first when scanned)."""
    _, state = model.apply({"params": params}, x, train=True, rngs={"dropout": rng}, mutable=["intermediates"],
                           capture_intermediates=lambda mdl, _: isinstance(mdl, (Attention, DropPath)))
    return state["intermediates"]


def test_drop_path_under_scan_uses_each_layers_rate_and_key(vit_params):
    x = _images(n=500, size=8)
    rate, depth = 0.6, 3
    rates = drop_path_rates(rate, depth)
    np.testing.assert_allclose(rates, [0.0, 0.3, 0.6])
    stats = {}
    for scan in (False, True):
        model = ViT(**{**KW, "image_size": 8, "depth": depth}, drop_path_rate=rate, scan_blocks=scan)
        params = _init(model, x[:1])
        got = jax.jit(lambda p, x, model=model: _captured(model, p, x, jax.random.key(3)))(params, x)
        layers = [got["blocks"]] if scan else [got[f"block{i}"] for i in range(depth)]
        if scan:  # split the stacked layer axis
            layers = [jax.tree.map(lambda a, i=i: a[i], layers[0]) for i in range(depth)]
        dropped = []
        for i, layer in enumerate(layers):
            attn = np.asarray(layer["attn"]["__call__"][0])
            out = np.asarray(layer["drop_path1"]["__call__"][0])
            gone = np.abs(out).reshape(len(out), -1).max(-1) == 0
            # Kept samples are scaled by exactly 1 / (1 - rate of this layer).
            np.testing.assert_allclose(out[~gone] * (1 - rates[i]), attn[~gone], rtol=1e-5, atol=1e-6)
            dropped.append(gone)
        stats[scan] = [d.mean() for d in dropped]
        assert stats[scan][0] == 0.0
        np.testing.assert_allclose(stats[scan][1:], rates[1:], atol=0.075)  # 500 samples: ~3.5 sd
        assert not np.array_equal(dropped[1], dropped[2])  # each layer its own key
    # No stochastic depth: train mode is deterministic and needs no dropout key.
    for scan, params in zip((False, True), vit_params):
        model = ViT(**KW, scan_blocks=scan)
        both = jax.jit(lambda p, x, model=model: (model.apply({"params": p}, x, train=True), model.apply({"params": p}, x)))
        assert _max_diff(*both(params, _images())) == 0.0


def test_optimiser_rules_treat_each_scanned_layer_as_a_tensor(vit_params):
    pu = vit_params[0]
    params_u, params_s = {"encoder": pu}, layouts.to_layout({"encoder": pu}, scanned=True)
    mask_u, mask_s = decay_mask(params_u)["encoder"], decay_mask(params_s)["encoder"]
    assert mask_s["blocks"] == mask_u["block0"] == mask_u["block1"]
    assert {k: v for k, v in mask_s.items() if k != "blocks"} == {k: v for k, v in mask_u.items() if "block" not in k}
    assert mask_s["blocks"]["norm1"]["scale"] is False and mask_s["blocks"]["mlp"]["fc1"]["kernel"] is True
    # Gradients of very different sizes per layer: per-layer clipping differs from clipping the stack.
    grads_u = jax.tree.map(lambda p: p * 0 + 1.0, params_u)
    grads_u["encoder"]["block1"] = jax.tree.map(lambda g: g * 100.0, grads_u["encoder"]["block1"])
    clip = clip_per_tensor(3.0)
    clipped_u = jax.jit(lambda g: clip.update(g, clip.init(g))[0])(grads_u)
    clipped_s = jax.jit(lambda g: clip.update(g, clip.init(g))[0])(layouts.to_layout(grads_u, scanned=True))
    assert _max_diff(clipped_s, layouts.to_layout(clipped_u, scanned=True)) < 1e-6


def _mae_config(**model):
    c = base_config()
    c.method, c.mae = "mae", mae_block()
    c.model.update(model)
    return c


def test_config_key_is_checked_and_old_configs_load_and_resume():
    validate_train_config(_mae_config(scan_blocks=True))
    bad = _mae_config()
    del bad.model["scan_blocks"]  # type-safe ConfigDict: re-add with another type
    bad.model.scan_blocks = "yes"
    with pytest.raises(UserInputError, match="model.scan_blocks"):
        validate_train_config(bad)
    old = _mae_config().to_dict()
    del old["model"]["scan_blocks"]
    assert fill_legacy_model_keys(ml_collections.ConfigDict(old)).model.scan_blocks is False
    # A run saved before the key resumes unrolled; switching the layout on resume is refused by name.
    check = config_history.check_resume(old, _mae_config(), 10, (), "w")
    assert check.changes == {} and check.new_keys == {"model.scan_blocks": False}
    with pytest.raises(UserInputError, match=r"model\.scan_blocks: \(absent\) -> true"):
        config_history.check_resume(old, _mae_config(scan_blocks=True), 10, (), "w")
    with pytest.raises(UserInputError, match=r"model\.scan_blocks: true -> false"):
        config_history.check_resume(_mae_config(scan_blocks=True).to_dict(), _mae_config(), 10, (), "w")


def test_tiny_scanned_training_run_trains_and_evaluates(tmp_path, data_dir):
    workdir = tmp_path / "mae_scan"
    overrides = {"total_steps": 4, "log_every": 2, "checkpoint_every": 4, "optim.warmup_steps": 2,
                 "monitor.every_steps": 0, "model.drop_path_rate": 0.1, "model.scan_blocks": True}
    proc = subprocess.run(tiny_train_argv("mae", data_dir, workdir, overrides), cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(line) for line in open(workdir / "metrics.jsonl")]
    losses = [r["loss"] for r in rows if "loss" in r]
    assert losses and all(np.isfinite(losses))

    loaded = load_checkpoint(str(workdir))
    assert loaded.step == 4 and loaded.config.model.scan_blocks is True
    enc = loaded.encoder_params("default")
    assert "blocks" in enc and "block0" not in enc and "block0" in loaded.params["decoder"]  # decoder unrolled
    images = np.asarray(_images(n=3, size=28))
    feats = embed_images(loaded.encoder(), enc, images, "cls", batch_size=4)
    assert feats.shape == (3, 32) and np.all(np.isfinite(feats))
    unrolled = loaded.encoder().clone(scan_blocks=False)
    np.testing.assert_allclose(
        embed_images(unrolled, layouts.scan_to_unrolled(enc), images, "cls", batch_size=4), feats, atol=1e-5)
    # The MAE reconstruction path (decoder on scanned-encoder tokens) runs too.
    recon = jax.jit(loaded.method.reconstruct)(loaded.params, jnp.asarray(images), jax.random.key(0))
    assert np.all(np.isfinite(np.asarray(recon["error"])))


def _timm_state_dict(params) -> dict[str, np.ndarray]:
    """An unrolled ViT(**KW)'s parameters under timm's ``VisionTransformer`` names and layouts."""
    p = jax.tree.map(np.asarray, params)
    sd = {
        "patch_embed.proj.weight": p["patch_embed"]["kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": p["patch_embed"]["bias"],
        "cls_token": p["cls_token"],
        "pos_embed": np.concatenate([p["cls_pos"], p["pos_embed"]], axis=1),
        "norm.weight": p["norm"]["scale"], "norm.bias": p["norm"]["bias"],
    }
    for i in range(KW["depth"]):
        b = p[f"block{i}"]
        for name, sub in (("norm1", b["norm1"]), ("norm2", b["norm2"])):
            sd[f"blocks.{i}.{name}.weight"], sd[f"blocks.{i}.{name}.bias"] = sub["scale"], sub["bias"]
        for name, sub in (("attn.qkv", b["attn"]["qkv"]), ("attn.proj", b["attn"]["proj"]),
                          ("mlp.fc1", b["mlp"]["fc1"]), ("mlp.fc2", b["mlp"]["fc2"])):
            sd[f"blocks.{i}.{name}.weight"], sd[f"blocks.{i}.{name}.bias"] = sub["kernel"].T, sub["bias"]
    return sd


def test_converter_writes_the_scanned_layout(tmp_path, vit_params):
    spec = convert.ModelSpec(width=KW["width"], depth=KW["depth"], num_heads=KW["num_heads"],
                             patch_size=KW["patch_size"])
    conv = convert.convert_state_dict(_timm_state_dict(vit_params[0]), spec)
    config = convert.training_config(conv, "dino", scan_blocks=True)
    convert.check_against_model(conv, config)
    convert.write_checkpoint(str(tmp_path), convert.checkpoint_state(conv, "dino", scan_blocks=True), config, {})
    loaded = load_checkpoint(str(tmp_path))
    enc = loaded.encoder_params("teacher")
    assert loaded.config.model.scan_blocks is True and "block0" not in enc
    assert enc["blocks"]["attn"]["qkv"]["kernel"].shape == (KW["depth"], 32, 96)
    assert _bit_equal(layouts.scan_to_unrolled(enc), vit_params[0])  # the same numbers, stacked
