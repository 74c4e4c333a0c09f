"""DINO recipe options (ssl_ad.methods.dino): KoLeo, Sinkhorn-Knopp centring, iBOT masked-patch
self-distillation, 'cls+mean' pooling.

Each formula is checked against a NumPy (float64) transcription of the reference code:
facebookresearch/dinov2 ``dinov2/loss/koleo_loss.py`` (KoLeoLoss), ``dinov2/loss/dino_clstoken_loss.py``
and ``ibot_patch_loss.py`` (sinkhorn_knopp_teacher), bytedance/ibot ``main_ibot.py`` (iBOTLoss).
With every option off the method is today's DINO bit for bit; each option trains a few steps
through the real loop with a finite loss and its own metric.
"""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_disable_most_optimizations", True)

from ssl_ad.config_check import validate_train_config  # noqa: E402
from ssl_ad.methods import build_method  # noqa: E402
from ssl_ad.methods.dino import (  # noqa: E402
    DINO,
    dino_loss,
    ibot_patch_loss,
    koleo_loss,
    random_patch_masks,
    sinkhorn_knopp,
    teacher_probs,
)
from ssl_ad.models.vit import ViT  # noqa: E402
from ssl_ad.train.loop import train_and_evaluate  # noqa: E402
from ssl_ad.train.metrics_log import read_metrics  # noqa: E402
from ssl_ad.train.optim import make_optimizer  # noqa: E402
from ssl_ad.train.state import create_train_state  # noqa: E402
from ssl_ad.train.step import make_train_step  # noqa: E402
from tests.conftest import apply_overrides  # noqa: E402
from tests.test_dino import _random_batch, tiny_dino_config  # noqa: E402

NEW_KEYS = ("koleo_loss_weight", "centering", "sinkhorn_iterations", "ibot_loss_weight", "ibot_mask_ratio",
            "ibot_mask_shape", "ibot_teacher_temp", "ibot_warmup_teacher_temp")
KOLEO = {"dino.koleo_loss_weight": 0.1}
SINKHORN = {"dino.centering": "sinkhorn_knopp"}
IBOT = {"dino.ibot_loss_weight": 1.0}


def _tiny(data_dir: str = "", **overrides):
    c = tiny_dino_config(data_dir)
    if "variant" in c.model:  # explicit sizes (tiny_dino_config sets width/depth/heads by hand)
        c.model.variant = ""
    c.dino.koleo_loss_weight = 0.0  # the demo config turns KoLeo on; these tests start from the code's defaults
    return apply_overrides(c, overrides)


# --- NumPy transcriptions of the reference code ---------------------------------------------------

def np_koleo(x, eps=1e-8):
    """KoLeoLoss.forward: F.normalize(eps), NN by max inner product (diagonal -1), PairwiseDistance(eps)."""
    x = np.asarray(x, np.float64)
    x = x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)
    dots = x @ x.T
    np.fill_diagonal(dots, -1.0)
    nn_idx = dots.argmax(axis=1)
    d = np.linalg.norm(x - x[nn_idx] + eps, axis=-1)
    return -np.log(d + eps).mean()


def np_sinkhorn(teacher_output, teacher_temp, n_iterations=3):
    """DINOLoss.sinkhorn_knopp_teacher (one process: world_size 1)."""
    q = np.exp(np.asarray(teacher_output, np.float64) / teacher_temp).T  # K x B
    b, k = q.shape[1], q.shape[0]
    q /= q.sum()
    for _ in range(n_iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= k
        q /= q.sum(axis=0, keepdims=True)
        q /= b
    q *= b
    return q.T


def np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def np_ibot_patch(student_patch, teacher_patch, center2, temp2, masks, student_temp):
    """iBOTLoss.forward, the patch part (pairs v == q), before lambda2."""
    student_patch_c = [np.asarray(s, np.float64) / student_temp for s in student_patch]
    teacher_patch_c = [np.exp(np_log_softmax((np.asarray(t, np.float64) - center2) / temp2)) for t in teacher_patch]
    total, n_terms = 0.0, 0
    for q in range(len(teacher_patch_c)):
        loss2 = np.sum(-teacher_patch_c[q] * np_log_softmax(student_patch_c[q]), axis=-1)
        mask = masks[q].reshape(masks[q].shape[0], -1)
        loss2 = np.sum(loss2 * mask, axis=-1) / np.maximum(mask.sum(axis=-1), 1.0)
        total += loss2.mean()
        n_terms += 1
    return total / n_terms


# --- the formulas -------------------------------------------------------------------------------

def test_koleo_matches_numpy():
    rng = np.random.default_rng(0)
    for b, d in ((7, 5), (32, 24)):
        x = rng.normal(size=(b, d)).astype(np.float32)
        np.testing.assert_allclose(float(koleo_loss(x)), np_koleo(x), rtol=1e-5)
    # Gradient flows (through x_i and its neighbour), finite.
    g = jax.grad(koleo_loss)(jnp.asarray(x))
    assert np.isfinite(np.asarray(g)).all() and float(jnp.abs(g).max()) > 0


def test_sinkhorn_matches_numpy_and_is_balanced():
    rng = np.random.default_rng(1)
    m, k, temp = 24, 10, 0.05
    t = np.tanh(rng.normal(size=(m, k))).astype(np.float32)  # cosine-like logits
    for iters in (1, 3):
        got = np.asarray(sinkhorn_knopp(t, temp, iters))
        np.testing.assert_allclose(got, np_sinkhorn(t, temp, iters), rtol=1e-5, atol=1e-7)
    # Per-sample distributions: every row sums to 1.
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)
    # Balanced prototypes: their totals approach B/K (3 iterations: closer than the softmax's; 200: equal).
    soft = np.exp(np_log_softmax(t.astype(np.float64) / temp))
    spread = lambda p: np.abs(p.sum(axis=0) / (m / k) - 1.0).max()  # noqa: E731
    assert spread(got) < 0.7 * spread(soft), (spread(got), spread(soft))
    many = np.asarray(sinkhorn_knopp(t, temp, 200))
    np.testing.assert_allclose(many.sum(axis=0), m / k, rtol=1e-3)
    np.testing.assert_allclose(many.sum(axis=1), 1.0, rtol=1e-5)
    # Weights: the 0-weight samples are left out (iBOTPatchLoss.sinkhorn_knopp_teacher on the
    # masked patches, B = their count); their rows come back zero.
    w = (rng.random(m) < 0.5).astype(np.float32)
    w[0] = 1.0
    got_w = np.asarray(sinkhorn_knopp(t, temp, 3, jnp.asarray(w)))
    np.testing.assert_allclose(got_w[w > 0], np_sinkhorn(t[w > 0], temp, 3), rtol=1e-5, atol=1e-7)
    assert (got_w[w == 0] == 0).all()


def test_ibot_patch_loss_matches_numpy():
    rng = np.random.default_rng(2)
    v, b, n, k = 2, 3, 9, 11
    s = rng.normal(size=(v, b, n, k)).astype(np.float32)
    t = rng.normal(size=(v, b, n, k)).astype(np.float32)
    center2 = (0.1 * rng.normal(size=(k,))).astype(np.float32)
    masks = rng.random((v, b, n)) < 0.3
    masks[1, 2] = False  # an image without masked patches: count clamped to 1, contributes 0
    temp2, s_temp = 0.07, 0.1
    expected = np_ibot_patch(s, t, center2, temp2, masks.astype(np.float64), s_temp)
    got = ibot_patch_loss(s, teacher_probs(t, center2, temp2), masks, s_temp)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)


def test_random_patch_masks():
    key = jax.random.key(0)
    m = np.asarray(random_patch_masks(key, (5, 2), 16, 4))
    assert m.shape == (5, 2, 16) and m.dtype == bool
    assert (m.sum(-1) == 4).all()  # iBOT 'rand': exactly int(ratio * N) per crop
    assert len({tuple(r) for r in m.reshape(10, 16)}) > 1  # independent per crop
    np.testing.assert_array_equal(m, random_patch_masks(key, (5, 2), 16, 4))
    assert not np.array_equal(m, random_patch_masks(jax.random.key(1), (5, 2), 16, 4))


# --- the ViT mask token ---------------------------------------------------------------------------

def test_vit_mask_token_is_optional_and_replaces_patches():
    kw = dict(image_size=16, patch_size=4, width=16, depth=1, num_heads=2, init_style="dino")
    x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
    plain, masked = ViT(**kw), ViT(**kw, use_mask_token=True)
    p0 = plain.init(jax.random.key(1), x)["params"]
    p1 = masked.init(jax.random.key(1), x)["params"]
    assert "mask_token" not in p0 and set(p1) == set(p0) | {"mask_token"}
    # The other parameters are initialised identically; the token is iBOT's zero init.
    for a, b in zip(jax.tree_util.tree_leaves(p0), jax.tree_util.tree_leaves({k: p1[k] for k in p0})):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(p1["mask_token"], np.zeros((1, 1, 16)))
    out = plain.apply({"params": p0}, x)
    np.testing.assert_array_equal(masked.apply({"params": p1}, x), out)
    none = jnp.zeros((2, 16), bool)
    np.testing.assert_array_equal(masked.apply({"params": p1}, x, mask=none), out)
    # A fully masked image no longer depends on its pixels (token + position only).
    p1 = dict(p1, mask_token=jnp.full((1, 1, 16), 0.3))
    full = jnp.ones((2, 16), bool)
    y = masked.apply({"params": p1}, x, mask=full)
    np.testing.assert_allclose(y[0], y[1], rtol=1e-6, atol=1e-6)
    # A partial mask changes only what attention mixes in; the token is at the masked places.
    part = jnp.zeros((2, 16), bool).at[:, 3].set(True)
    assert not np.allclose(masked.apply({"params": p1}, x, mask=part), out)
    with pytest.raises(ValueError, match="use_mask_token"):
        plain.apply({"params": p0}, x, mask=part)
    with pytest.raises(ValueError, match="mask must be"):
        masked.apply({"params": p1}, x, mask=part[:, :8])


# --- the method -----------------------------------------------------------------------------------

def _init(c, seed=0):
    method = build_method(c)
    assert isinstance(method, DINO)
    batch = _random_batch(c)
    tx, _ = make_optimizer(c.optim, c.total_steps, c.batch_size, method=c.method)
    state = create_train_state(method, tx, jax.random.key(seed), batch)
    return method, batch, tx, state


def test_defaults_are_off_and_legacy_configs_mean_off():
    c = _tiny()
    assert c.dino.koleo_loss_weight == 0.0 and c.dino.ibot_loss_weight == 0.0 and c.dino.centering == "centering"
    validate_train_config(c)
    legacy = _tiny()
    with legacy.dino.unlocked():
        for key in NEW_KEYS:
            del legacy.dino[key]
    m_new, batch, _, s_new = _init(c)
    m_old, _, _, s_old = _init(legacy)
    assert not m_new.options_on and not m_old.options_on
    assert set(s_new.params) == {"backbone", "head"} and set(s_new.extra) == {"teacher", "center"}
    assert "mask_token" not in s_new.params["backbone"]
    assert set(m_new.schedules()) == {"teacher_temp", "momentum"}
    for a, b in zip(jax.tree_util.tree_leaves((s_new.params, s_new.extra)),
                    jax.tree_util.tree_leaves((s_old.params, s_old.extra))):
        np.testing.assert_array_equal(a, b)
    rng, step = jax.random.key(3), jnp.asarray(0)
    fn = lambda m: jax.jit(jax.value_and_grad(lambda p: m.loss(p, s_new.extra, batch, rng, step), has_aux=True))  # noqa: E731
    (l_new, aux_new), g_new = fn(m_new)(s_new.params)
    (l_old, aux_old), g_old = fn(m_old)(s_new.params)
    assert set(aux_new["metrics"]) == {"loss", "teacher_entropy", "teacher_mean_entropy", "kl_mean_teacher"}
    for a, b in zip(jax.tree_util.tree_leaves((l_new, aux_new, g_new)), jax.tree_util.tree_leaves((l_old, aux_old, g_old))):
        np.testing.assert_array_equal(a, b)
    # Today's loss, from the pre-existing pieces (student/teacher logits, dino_loss).
    s = m_new.student_logits(s_new.params, batch, rng)
    t = m_new.teacher_logits(s_new.extra["teacher"], batch)
    expected = dino_loss(s, t, s_new.extra["center"], m_new.student_temp, m_new.teacher_temp(step))
    np.testing.assert_allclose(float(l_new), float(expected), rtol=1e-6)
    # The options' code path computes the same DINO term (KoLeo only adds to it).
    m_k = build_method(_tiny(**KOLEO))
    _, aux_k = jax.jit(lambda p: m_k.loss(p, s_new.extra, batch, rng, step))(s_new.params)
    np.testing.assert_allclose(float(aux_k["metrics"]["dino_loss"]), float(l_new), rtol=1e-6)


def test_loss_terms_assemble_as_documented():
    """loss = dino + w_k * sum_crops KoLeo(pooled global features) + w_i * iBOT, with each piece from
    the method's own forward; Sinkhorn-Knopp targets against NumPy."""
    c = _tiny(**{**KOLEO, **IBOT, **SINKHORN, "dino.koleo_loss_weight": 0.3, "dino.ibot_loss_weight": 0.7})
    method, batch, _, state = _init(c)
    assert "mask_token" in state.params["backbone"] and set(state.extra) == {"teacher", "center", "center2"}
    assert set(method.schedules()) == {"teacher_temp", "momentum", "ibot_teacher_temp"}
    rng, step = jax.random.key(5), jnp.asarray(0)
    loss, aux = jax.jit(lambda p: method.loss(p, state.extra, batch, rng, step))(state.params)
    mt = aux["metrics"]
    assert {"loss", "dino_loss", "koleo_loss", "ibot_loss"} <= set(mt)
    masks = method.ibot_masks(batch, rng)
    n, n_masked = method.num_masked(c.data.global_size)
    assert masks.shape == (4, 2, n) and (np.asarray(masks).sum(-1) == n_masked).all()
    fwd = method.student_forward(state.params, batch, rng, masks)
    t, t_patch = method.teacher_logits_and_patches(state.extra["teacher"], batch)
    temp, temp2 = float(method.teacher_temp(step)), float(method.ibot_teacher_temp(step))
    # CLS term with NumPy Sinkhorn-Knopp targets over both global crops together.
    p = np_sinkhorn(np.asarray(t).reshape(-1, t.shape[-1]), temp, 3).reshape(t.shape)
    s = np.asarray(fwd["logits"], np.float64)
    ce = [[np.mean(np.sum(-p[iq] * np_log_softmax(s[v] / 0.1), -1)) for v in range(s.shape[0]) if v != iq]
          for iq in range(2)]
    np.testing.assert_allclose(float(mt["dino_loss"]), np.mean(ce), rtol=1e-5)
    g = np.asarray(fwd["global_features"])
    koleo = [np_koleo(g[:, i]) for i in range(2)]
    np.testing.assert_allclose(float(mt["koleo_loss"]), np.mean(koleo), rtol=1e-5)
    # Patch term: Sinkhorn-Knopp over the masked patches only (B = their number, as DINOv2).
    mv = np.swapaxes(np.asarray(masks), 0, 1)
    tp = np.asarray(t_patch).reshape(-1, t_patch.shape[-1])
    pp = np.zeros_like(tp, np.float64)
    pp[mv.reshape(-1)] = np_sinkhorn(tp[mv.reshape(-1)], temp2, 3)
    lq = np_log_softmax(np.asarray(fwd["patch_logits"], np.float64) / 0.1)
    ce_p = np.sum(-pp.reshape(lq.shape) * lq, -1)
    expected_ibot = np.mean([np.mean(np.sum(ce_p[v] * mv[v], -1) / mv[v].sum(-1)) for v in range(2)])
    np.testing.assert_allclose(float(mt["ibot_loss"]), expected_ibot, rtol=1e-5)
    np.testing.assert_allclose(float(loss), np.mean(ce) + 0.3 * sum(koleo) + 0.7 * expected_ibot, rtol=1e-5)


def test_ibot_centering_and_update_extra():
    """Centre mode: the patch loss uses center2 and the patch temperature; center2 is the EMA of the
    teacher's per-crop patch means; Sinkhorn-Knopp mode freezes both centres (DINOv2)."""
    c = _tiny(**IBOT)
    method, batch, tx, state = _init(c)
    extra = dict(state.extra, center2=jnp.asarray(np.random.default_rng(3).normal(size=(c.dino.out_dim,)) * 0.1,
                                                  jnp.float32))
    rng, step = jax.random.key(7), jnp.asarray(0)
    _, aux = jax.jit(lambda p: method.loss(p, extra, batch, rng, step))(state.params)
    masks = np.swapaxes(np.asarray(method.ibot_masks(batch, rng)), 0, 1)
    fwd = method.student_forward(state.params, batch, rng, jnp.asarray(np.swapaxes(masks, 0, 1)))
    _, t_patch = method.teacher_logits_and_patches(extra["teacher"], batch)
    expected = np_ibot_patch(np.asarray(fwd["patch_logits"]), np.asarray(t_patch), np.asarray(extra["center2"]),
                             float(method.ibot_teacher_temp(step)), masks.astype(np.float64), 0.1)
    np.testing.assert_allclose(float(aux["metrics"]["ibot_loss"]), expected, rtol=1e-5)
    step_fn = jax.jit(make_train_step(method, tx, c.seed))
    new, _ = step_fn(state, batch)
    _, t_patch = method.teacher_logits_and_patches(state.extra["teacher"], batch)
    patch_mean = np.asarray(t_patch).mean(axis=2).reshape(-1, c.dino.out_dim).mean(0)
    np.testing.assert_allclose(new.extra["center2"], 0.1 * patch_mean, rtol=1e-5, atol=1e-7)  # from zeros
    assert float(jnp.abs(new.extra["center"]).max()) > 0
    # The masks come from the step's rng: another step, other masks.
    k0, k1 = (jax.random.fold_in(jax.random.key(c.seed), s) for s in (0, 1))
    assert not np.array_equal(method.ibot_masks(batch, k0), method.ibot_masks(batch, k1))
    # The encoder handed to evaluation is a plain ViT's tree.
    enc = method.encoder_params(new.params, new.extra)
    assert "mask_token" not in enc and set(enc) == set(new.params["backbone"]) - {"mask_token"}
    sk = _tiny(**IBOT, **SINKHORN)
    m_sk, batch, tx, s_sk = _init(sk)
    new, _ = jax.jit(make_train_step(m_sk, tx, sk.seed))(s_sk, batch)
    np.testing.assert_array_equal(new.extra["center"], s_sk.extra["center"])
    np.testing.assert_array_equal(new.extra["center2"], s_sk.extra["center2"])


def test_invalid_option_values_are_refused():
    with pytest.raises(ValueError, match="cls\\+mean"):
        DINO(_tiny(**IBOT, **{"dino.pooling": "cls+mean"}))
    with pytest.raises(ValueError, match="centering"):
        DINO(_tiny(**{"dino.centering": "sk"}))
    from ssl_ad.errors import UserInputError

    for bad in ({"dino.centering": "sk"}, {"dino.koleo_loss_weight": -1.0}, {"dino.ibot_mask_ratio": 1.0},
                {"dino.ibot_mask_shape": "block"}, {"dino.sinkhorn_iterations": 0}):
        with pytest.raises(UserInputError, match=list(bad)[0]):
            validate_train_config(_tiny(**bad))
    validate_train_config(_tiny(**{"dino.pooling": "cls+mean"}))


# --- tiny trainings through the loop ---------------------------------------------------------------

@pytest.mark.parametrize(
    "options, metric",
    [(KOLEO, "koleo_loss"), (SINKHORN, "dino_loss"), (IBOT, "ibot_loss"), ({"dino.pooling": "cls+mean"}, "loss")],
    ids=["koleo", "sinkhorn_knopp", "ibot", "cls+mean"],
)
def test_tiny_training_with_each_option(tmp_path, data_dir, options, metric):
    c = _tiny(data_dir, total_steps=4, log_every=2, checkpoint_every=4, **options)
    state = train_and_evaluate(c, str(tmp_path / "run"))
    rows = read_metrics(str(tmp_path / "run" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [2, 4]
    for r in rows:
        assert np.isfinite(r["loss"]) and np.isfinite(r[metric]), r
    if options is IBOT:
        assert "ibot_teacher_temp" in rows[0] and "mask_token" in state.params["backbone"]
    if "dino.pooling" in options:
        assert state.params["head"]["mlp0"]["kernel"].shape[0] == 2 * c.model.width


def test_resume_of_a_run_saved_before_the_keys(tmp_path, data_dir):
    """A checkpoint whose config lacks the new keys resumes with today's defaults (= off)."""
    old = _tiny(data_dir, total_steps=4, log_every=2, checkpoint_every=2)
    with old.dino.unlocked():
        for key in NEW_KEYS:
            del old.dino[key]
    straight = train_and_evaluate(old, str(tmp_path / "a"))
    os.makedirs(tmp_path / "b" / "checkpoints")
    shutil.copytree(tmp_path / "a" / "checkpoints" / "2", tmp_path / "b" / "checkpoints" / "2")
    shutil.copy(tmp_path / "a" / "config.json", tmp_path / "b" / "config.json")
    resumed = train_and_evaluate(_tiny(data_dir, total_steps=4, log_every=2, checkpoint_every=2), str(tmp_path / "b"))
    assert int(resumed.step) == 4
    for a, b in zip(jax.tree_util.tree_leaves(jax.device_get((straight.params, straight.extra))),
                    jax.tree_util.tree_leaves(jax.device_get((resumed.params, resumed.extra)))):
        np.testing.assert_array_equal(a, b)  # the same run: the missing keys meant "off"
