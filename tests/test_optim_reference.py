"""The optimiser against the reference code, written out independently in NumPy.

DINO (facebookresearch/dino): utils.clip_gradients (per-tensor clipping, clip / (norm + 1e-6)),
utils.cancel_gradients_last_layer (grad = None: PyTorch's AdamW skips the parameter: no moment
update, no per-parameter step, no weight decay), utils.get_params_groups (no decay iff the name
ends in '.bias' or the tensor is 1-d), lr / wd set from the global iteration.
MAE (facebookresearch/mae): timm add_weight_decay (same rule), clip_grad_norm_ (global).
"""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from ssl_ad.config_defaults import base_config
from ssl_ad.errors import UserInputError
from ssl_ad.train.optim import (
    TOKEN_AND_POSEMB_NAMES,
    HoldState,
    clip_per_tensor,
    decay_mask,
    make_optimizer,
    resolve_clip_mode,
)
from ssl_ad.schedules import lr_schedule, wd_schedule

TOTAL, BATCH = 20, 256


def _cfg(**kw) -> ml_collections.ConfigDict:
    o = base_config().optim
    o.base_lr, o.min_lr, o.warmup_steps = 1e-2, 1e-4, 2  # lr = base_lr at batch 256
    o.b1, o.b2 = 0.9, 0.999
    o.weight_decay, o.weight_decay_end = 0.04, 0.4  # rising cosine, as DINO's
    for k, v in kw.items():
        o[k] = v
    return o


def _tree(seed=0, scale=1.0):
    """A small DINO-like parameter (or gradient) tree: kernels, biases, a token, a last layer."""
    rng = np.random.default_rng(seed)

    def f(*shape):
        return jnp.asarray(scale * rng.normal(size=shape), jnp.float32)

    return {
        "backbone": {"cls_token": f(1, 1, 4), "dense": {"kernel": f(4, 4), "bias": f(4)}, "norm": {"scale": f(4)}},
        "head": {"mlp0": {"kernel": f(4, 3), "bias": f(3)}, "last_layer": {"kernel": f(3, 5)}},
    }


def _paths(tree):
    return {"/".join(str(k.key) for k in p): np.asarray(v, np.float64) for p, v in jax.tree_util.tree_leaves_with_path(tree)}


# ---------------------------------------------------------------------------------------------
# Independent NumPy reference: PyTorch's AdamW with DINO's clipping and last-layer cancelling
# ---------------------------------------------------------------------------------------------


def np_reference_adamw(params, grads_seq, lr, wd, *, b1, b2, clip=0.0, clip_mode="per_tensor",
                       frozen=(), freeze_steps=0, no_decay_extra=(), eps=1e-8):
    """Runs len(grads_seq) steps; returns (params per step, per-parameter state) as dicts by path."""
    p = _paths(params)
    state = {k: {"m": np.zeros_like(v), "v": np.zeros_like(v), "step": 0} for k, v in p.items()}
    history = []
    for it, g_tree in enumerate(grads_seq):
        g = _paths(g_tree)
        if clip and clip_mode == "per_tensor":  # utils.clip_gradients
            for k in g:
                norm = np.sqrt((g[k] ** 2).sum())
                coef = clip / (norm + 1e-6)
                if coef < 1:
                    g[k] = g[k] * coef
        elif clip:  # optax.clip_by_global_norm
            norm = np.sqrt(sum((x ** 2).sum() for x in g.values()))
            if norm > clip:
                g = {k: x * clip / norm for k, x in g.items()}
        lr_t, wd_t = float(lr(it)), float(wd(it))  # param_group lr / wd from the global iteration
        for k in p:
            if it < freeze_steps and any(f in k for f in frozen):
                continue  # grad is None: AdamW skips the parameter entirely
            s = state[k]
            s["step"] += 1
            decayed = not (k.endswith("bias") or p[k].ndim <= 1 or any(t in k for t in no_decay_extra))
            if decayed:
                p[k] = p[k] * (1 - lr_t * wd_t)
            s["m"] = b1 * s["m"] + (1 - b1) * g[k]
            s["v"] = b2 * s["v"] + (1 - b2) * g[k] ** 2
            m_hat = s["m"] / (1 - b1 ** s["step"])
            v_hat = s["v"] / (1 - b2 ** s["step"])
            p[k] = p[k] - lr_t * m_hat / (np.sqrt(v_hat) + eps)
        history.append({k: v.copy() for k, v in p.items()})
    return history, state


def _run(tx, params, grads_seq):
    opt_state = tx.init(params)
    update = jax.jit(tx.update)
    history, states = [], []
    for g in grads_seq:
        u, opt_state = update(g, opt_state, params)
        params = optax.apply_updates(params, u)
        history.append(_paths(params))
        states.append(opt_state)
    return history, states


def _grads(n, seed=1):
    return [_tree(seed + i, scale=(5.0 if i % 2 == 0 else 0.1)) for i in range(n)]


# ---------------------------------------------------------------------------------------------
# 5. Gradient clipping
# ---------------------------------------------------------------------------------------------


def test_per_tensor_clip_matches_dino_clip_gradients():
    big = np.arange(1.0, 7.0, dtype=np.float32).reshape(2, 3)  # norm sqrt(91) ~ 9.54 > 3
    small = np.array([0.3, -0.4, 1.2], np.float32)  # norm 1.3 < 3
    edge = np.array([3.0, 0.0], np.float32)  # norm exactly 3: coef = 3 / (3 + 1e-6) < 1, clipped
    tree = {"a": {"kernel": jnp.asarray(big)}, "b": jnp.asarray(small), "c": jnp.asarray(edge)}
    out, _ = clip_per_tensor(3.0).update(tree, optax.EmptyState())
    for got, g in ((out["a"]["kernel"], big), (out["b"], small), (out["c"], edge)):
        g = g.astype(np.float64)
        coef = 3.0 / (np.sqrt((g ** 2).sum()) + 1e-6)
        expected = g * coef if coef < 1 else g
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=0)
    np.testing.assert_array_equal(np.asarray(out["b"]), small)  # below the threshold: untouched
    assert np.linalg.norm(np.asarray(out["a"]["kernel"])) < 3.0  # each tensor ends at ~clip, not the total
    assert np.linalg.norm(np.asarray(out["c"])) < 3.0


def test_clip_mode_resolution():
    assert resolve_clip_mode(_cfg(), "dino") == "per_tensor"
    assert resolve_clip_mode(_cfg(), "mae") == "global"
    assert resolve_clip_mode(_cfg(clip_mode="global"), "dino") == "global"
    assert resolve_clip_mode(_cfg(clip_mode="per_tensor"), "mae") == "per_tensor"
    with pytest.raises(UserInputError, match="needs the method"):
        make_optimizer(_cfg(clip_norm=3.0), TOTAL, BATCH)
    make_optimizer(_cfg(), TOTAL, BATCH)  # no clipping: no method needed
    with pytest.raises(UserInputError, match="clip_mode"):
        make_optimizer(_cfg(clip_mode="per-tensor"), TOTAL, BATCH, method="dino")


@pytest.mark.parametrize("method,mode", [("dino", "per_tensor"), ("mae", "global")])
def test_reference_clipping_through_the_whole_chain(method, mode):
    """Large and small gradients alternate, so per-tensor and global clipping give different Adam
    trajectories; the chain follows the method's reference (NumPy) one."""
    cfg = _cfg(clip_norm=3.0)
    tx, sched = make_optimizer(cfg, TOTAL, BATCH, method=method)
    params, grads = _tree(0), _grads(4)
    got, _ = _run(tx, params, grads)
    ref, _ = np_reference_adamw(params, grads, sched["lr"], sched["wd"], b1=cfg.b1, b2=cfg.b2, clip=3.0, clip_mode=mode)
    other, _ = np_reference_adamw(params, grads, sched["lr"], sched["wd"], b1=cfg.b1, b2=cfg.b2, clip=3.0,
                                  clip_mode="global" if mode == "per_tensor" else "per_tensor")
    for step in range(4):
        for k in ref[step]:
            np.testing.assert_allclose(got[step][k], ref[step][k], rtol=1e-5, atol=1e-6, err_msg=f"{k} step {step}")
    assert max(np.abs(ref[-1][k] - other[-1][k]).max() for k in ref[-1]) > 1e-4  # the modes do differ here


def test_global_mode_is_optax_clip_by_global_norm_then_adamw():
    cfg = _cfg(clip_norm=3.0, clip_mode="global")
    tx, sched = make_optimizer(cfg, TOTAL, BATCH, method="dino")
    old = optax.chain(
        optax.clip_by_global_norm(3.0),
        optax.adamw(sched["lr"], b1=cfg.b1, b2=cfg.b2, weight_decay=sched["wd"], mask=decay_mask),
    )
    params, grads = _tree(0), _grads(4)
    a, _ = _run(tx, params, grads)
    b, _ = _run(old, params, grads)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])


# ---------------------------------------------------------------------------------------------
# 6. Freezing the last layer
# ---------------------------------------------------------------------------------------------


def _hold_state(opt_state) -> HoldState:
    found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=lambda x: isinstance(x, HoldState))
             if isinstance(s, HoldState)]
    assert len(found) == 1
    return found[0]


def _adam_state(hold: HoldState) -> optax.ScaleByAdamState:
    (adam,) = [s for s in jax.tree_util.tree_leaves(hold.inner_state, is_leaf=lambda x: isinstance(x, optax.ScaleByAdamState))
               if isinstance(s, optax.ScaleByAdamState)]
    return adam


def test_frozen_last_layer_keeps_its_adam_state_and_restarts_bias_correction():
    freeze = 3
    cfg = _cfg(freeze_patterns=("last_layer",), freeze_steps=freeze)
    tx, sched = make_optimizer(cfg, TOTAL, BATCH, method="dino")
    params, grads = _tree(0), _grads(6)
    got, states = _run(tx, params, grads)
    init_last = np.asarray(params["head"]["last_layer"]["kernel"], np.float64)

    for i in range(freeze):  # during the freeze: no move (no decay either), moments and count at init
        np.testing.assert_array_equal(got[i]["head/last_layer/kernel"], init_last)
        adam = _adam_state(_hold_state(states[i]))
        assert int(adam.count) == 0
        for leaf in jax.tree_util.tree_leaves((adam.mu, adam.nu)):
            np.testing.assert_array_equal(np.asarray(leaf), 0.0)
        assert int(_hold_state(states[i]).count) == i + 1  # the global step does advance
    # Everything else moves from step 1 (step 0 has lr 0 in the warm-up).
    assert not np.array_equal(got[1]["head/mlp0/kernel"], got[0]["head/mlp0/kernel"])

    # The first update after the freeze: a fresh AdamW step (bias correction with count 1) at the
    # learning rate and weight decay of the GLOBAL step `freeze`, written out here.
    b1, b2, eps = cfg.b1, cfg.b2, 1e-8
    g = np.asarray(grads[freeze]["head"]["last_layer"]["kernel"], np.float64)
    m, v = (1 - b1) * g, (1 - b2) * g ** 2
    lr_t, wd_t = float(sched["lr"](freeze)), float(sched["wd"](freeze))
    assert lr_t != float(sched["lr"](0)) and wd_t != float(sched["wd"](0))  # the schedules do move
    p = got[freeze - 1]["head/last_layer/kernel"]
    expected = p * (1 - lr_t * wd_t) - lr_t * (m / (1 - b1)) / (np.sqrt(v / (1 - b2)) + eps)
    np.testing.assert_allclose(got[freeze]["head/last_layer/kernel"], expected, rtol=1e-5, atol=1e-6)
    adam = _adam_state(_hold_state(states[freeze]))
    assert int(adam.count) == 1
    np.testing.assert_allclose(np.asarray(adam.mu["head"]["last_layer"]["kernel"]), m, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(adam.nu["head"]["last_layer"]["kernel"]), v, rtol=1e-5)

    # The whole trajectory, frozen and other parameters, equals PyTorch-style AdamW in NumPy.
    ref, ref_state = np_reference_adamw(params, grads, sched["lr"], sched["wd"], b1=b1, b2=b2,
                                        frozen=("last_layer",), freeze_steps=freeze)
    assert ref_state["head/last_layer/kernel"]["step"] == len(grads) - freeze
    for step in range(len(grads)):
        for k in ref[step]:
            np.testing.assert_allclose(got[step][k], ref[step][k], rtol=1e-5, atol=1e-6, err_msg=f"{k} step {step}")


def test_freeze_patterns_that_match_nothing_are_an_error():
    tx, _ = make_optimizer(_cfg(freeze_patterns=("last_layr",), freeze_steps=2), TOTAL, BATCH, method="dino")
    with pytest.raises(UserInputError, match="match no parameter"):
        tx.init(_tree(0))


def test_without_freezing_the_chain_is_optax_adamw():
    cfg = _cfg()
    tx, sched = make_optimizer(cfg, TOTAL, BATCH, method="dino")
    # The chain make_optimizer built before (same state tree: its checkpoints still load).
    ref = optax.chain(optax.adamw(sched["lr"], b1=cfg.b1, b2=cfg.b2, weight_decay=sched["wd"], mask=decay_mask))
    params, grads = _tree(0), _grads(5)
    assert jax.tree_util.tree_structure(tx.init(params)) == jax.tree_util.tree_structure(ref.init(params))
    a, _ = _run(tx, params, grads)
    b, _ = _run(ref, params, grads)
    for x, y in zip(a, b):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    # ... and both equal PyTorch-style AdamW (decay on kernels and the CLS token, not biases / norms).
    np_ref, _ = np_reference_adamw(params, grads, sched["lr"], sched["wd"], b1=cfg.b1, b2=cfg.b2)
    for k in np_ref[-1]:
        np.testing.assert_allclose(a[-1][k], np_ref[-1][k], rtol=1e-5, atol=1e-6, err_msg=k)


# ---------------------------------------------------------------------------------------------
# 7. Weight-decay groups
# ---------------------------------------------------------------------------------------------


def _reference_decayed(path: str, shape: tuple) -> bool:
    """DINO get_params_groups / timm add_weight_decay, written out: not (bias or 1-d)."""
    return not (path.split("/")[-1] == "bias" or len(shape) == 1)


def _real_params(method: str):
    from configs import dino_mnist5k, mae_mnist5k
    from ssl_ad.methods import build_method

    c = (dino_mnist5k if method == "dino" else mae_mnist5k).get_config()
    c.model.variant = ""  # the sizes below instead of the config's "mu/7" / "mu/4"
    c.model.width, c.model.depth, c.model.num_heads = 32, 1, 2
    if method == "dino":
        c.dino.out_dim, c.dino.hidden_dim, c.dino.bottleneck_dim = 16, 16, 8
        c.dino.norm_last_layer = False  # the weight-normalised layer's learnable scale (1-d) too
        g, loc = c.data.global_size, c.data.local_size
        batch = {"global": jnp.zeros((2, 2, g, g, 3)), "local": jnp.zeros((2, c.data.num_local, loc, loc, 3))}
    else:
        c.mae.decoder_width, c.mae.decoder_heads = 16, 2
        batch = {"image": jnp.zeros((2, c.model.image_size, c.model.image_size, 3))}
    params, _ = jax.eval_shape(build_method(c).init, jax.random.key(0), batch)
    return params


@pytest.mark.parametrize("method", ["dino", "mae"])
def test_decay_mask_over_a_real_parameter_tree(method):
    params = _real_params(method)
    leaves = {"/".join(str(k.key) for k in p): tuple(v.shape) for p, v in jax.tree_util.tree_leaves_with_path(params)}
    assert all(len(s) >= 1 for s in leaves.values())  # no 0-d parameters (where DINO and timm would differ)
    mask = {"/".join(str(k.key) for k in p): bool(v)
            for p, v in jax.tree_util.tree_leaves_with_path(decay_mask(params))}
    assert mask.keys() == leaves.keys()
    for path, shape in leaves.items():
        assert mask[path] == _reference_decayed(path, shape), path
    tokens = [p for p in leaves if any(t in p for t in TOKEN_AND_POSEMB_NAMES)]
    # (whether the CLS position is a parameter of its own is the model's business)
    expected_tokens = {"dino": {"cls_token", "pos_embed"}, "mae": {"cls_token", "mask_token"}}
    assert expected_tokens[method] <= {p.split("/")[-1] for p in tokens}
    assert all(mask[p] for p in tokens)  # the reference decays them
    assert not any(mask[p] for p in leaves if "norm" in p.split("/")[-2])  # LayerNorm scale and bias
    if method == "dino":
        assert mask["head/last_layer/kernel"] and not mask["head/last_layer/scale"]
    # ssl_ad's former rule, kept under optim.weight_decay_exclude:
    old = {"/".join(str(k.key) for k in p): bool(v)
           for p, v in jax.tree_util.tree_leaves_with_path(decay_mask(params, TOKEN_AND_POSEMB_NAMES))}
    for path, shape in leaves.items():
        assert old[path] == (len(shape) > 1 and path not in tokens), path


def test_weight_decay_exclude_reaches_the_chain():
    cfg = _cfg(weight_decay_exclude=TOKEN_AND_POSEMB_NAMES)
    tx, sched = make_optimizer(cfg, TOTAL, BATCH, method="mae")
    params, grads = _tree(0), _grads(3)
    got, _ = _run(tx, params, grads)
    ref, _ = np_reference_adamw(params, grads, sched["lr"], sched["wd"], b1=cfg.b1, b2=cfg.b2,
                                no_decay_extra=TOKEN_AND_POSEMB_NAMES)
    decayed, _ = np_reference_adamw(params, grads, sched["lr"], sched["wd"], b1=cfg.b1, b2=cfg.b2)
    for k in ref[-1]:
        np.testing.assert_allclose(got[-1][k], ref[-1][k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert not np.allclose(ref[-1]["backbone/cls_token"], decayed[-1]["backbone/cls_token"], rtol=0, atol=1e-7)


def test_schedules_are_the_configured_ones():
    cfg = _cfg()
    _, sched = make_optimizer(cfg, TOTAL, BATCH, method="dino")
    for s in (0, 1, 7, TOTAL):
        assert float(sched["lr"](s)) == float(lr_schedule(cfg, TOTAL, BATCH)(s))
        assert float(sched["wd"](s)) == float(wd_schedule(cfg, TOTAL)(s))
