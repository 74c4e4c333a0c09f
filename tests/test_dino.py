"""DINO: loss against NumPy, centre/EMA/schedules by hand, gradient flow, last-layer freezing,
a tiny training through the real loop (loss falls, no collapse) and bit-identical resume."""

import math
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

jax.config.update("jax_disable_most_optimizations", True)

from ssl_ad.methods import build_method  # noqa: E402
from ssl_ad.methods.dino import DINO, DINOHead, dino_loss, update_center  # noqa: E402
from ssl_ad.train.loop import train_and_evaluate  # noqa: E402
from ssl_ad.train.metrics_log import read_metrics  # noqa: E402
from ssl_ad.train.optim import make_optimizer  # noqa: E402
from ssl_ad.train.state import create_train_state  # noqa: E402
from ssl_ad.train.step import make_train_step  # noqa: E402
from tests.conftest import apply_overrides  # noqa: E402


def tiny_dino_config(data_dir: str = "", **overrides):
    """configs/dino_mnist5k.py shrunk to compile and run in seconds."""
    from configs import dino_mnist5k

    c = dino_mnist5k.get_config()
    c.data.data_dir = data_dir
    c.total_steps = 40
    c.batch_size = 16
    c.log_every = 5
    c.checkpoint_every = 20
    c.model.variant = ""  # the sizes below instead of the config's "mu/7"
    c.model.width, c.model.depth, c.model.num_heads = 32, 2, 2
    c.model.patch_size = 7
    # At width 32 DINO's own init (Linear N(0, 0.02^2)) gives nearly identical CLS features for
    # every image (mean cosine 0.96 vs 0.74), and 40 steps end in uniform collapse; the loop's
    # behaviour is tested with the xavier rule (tests/test_init_reference.py tests DINO's init).
    c.model.init = "xavier_legacy"
    c.data.num_local = 2
    c.data.local_size = 14
    c.dino.out_dim = 256
    c.dino.hidden_dim = 64
    c.dino.bottleneck_dim = 32
    c.optim.warmup_steps = 5
    c.optim.freeze_steps = 5
    c.dino.momentum_teacher = 0.996
    return apply_overrides(c, overrides)


def _random_batch(c, batch=4, seed=0):
    rng = np.random.default_rng(seed)
    g, l = c.data.global_size, c.data.local_size
    return {
        "global": jnp.asarray(rng.normal(size=(batch, 2, g, g, 3)), jnp.float32),
        "local": jnp.asarray(rng.normal(size=(batch, c.data.num_local, l, l, 3)), jnp.float32),
    }


def _np_log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_dino_loss_matches_numpy_pair_loop():
    rng = np.random.default_rng(0)
    batch, k, ncrops = 5, 17, 5  # 2 global + 3 local
    student = [rng.normal(size=(batch, k)).astype(np.float32) for _ in range(ncrops)]
    teacher = [rng.normal(size=(batch, k)).astype(np.float32) for _ in range(2)]
    center = rng.normal(size=(k,)).astype(np.float32) * 0.1
    s_temp, t_temp = 0.1, 0.05

    total, terms = 0.0, 0
    for iq in range(2):
        q = np.exp(_np_log_softmax((teacher[iq].astype(np.float64) - center) / t_temp))
        for v in range(ncrops):
            if v == iq:
                continue
            total += np.mean(np.sum(-q * _np_log_softmax(student[v].astype(np.float64) / s_temp), axis=-1))
            terms += 1
    expected = total / terms
    assert terms == 8
    got = dino_loss(student, teacher, center, s_temp, t_temp)
    np.testing.assert_allclose(float(got), expected, rtol=1e-5)
    # The stacked (V, B, K) form gives the same value.
    got_stacked = dino_loss(np.stack(student), np.stack(teacher), center, s_temp, t_temp)
    np.testing.assert_allclose(float(got_stacked), expected, rtol=1e-5)


def test_head_shapes_weight_norm_and_last_layer_path():
    x = jax.random.normal(jax.random.key(0), (3, 24))
    head = DINOHead(out_dim=50, hidden_dim=16, bottleneck_dim=8, num_layers=3, norm_last_layer=True)
    params = head.init(jax.random.key(1), x)["params"]
    assert set(params) == {"mlp0", "mlp1", "mlp2", "last_layer"}
    assert set(params["last_layer"]) == {"kernel"}  # no bias, no learned g
    out = head.apply({"params": params}, x)
    assert out.shape == (3, 50)
    # L2-normalised bottleneck times unit-norm columns: every logit is a cosine.
    assert float(jnp.abs(out).max()) <= 1.0 + 1e-5
    # Scaling v does not change the output (weight normalisation).
    scaled = jax.tree_util.tree_map(lambda a: a, params)
    scaled["last_layer"] = {"kernel": params["last_layer"]["kernel"] * 7.0}
    np.testing.assert_allclose(head.apply({"params": scaled}, x), out, rtol=1e-5, atol=1e-6)
    free = DINOHead(out_dim=50, hidden_dim=16, bottleneck_dim=8, num_layers=2, norm_last_layer=False)
    p2 = free.init(jax.random.key(1), x)["params"]
    assert set(p2["last_layer"]) == {"kernel", "scale"} and set(p2) == {"mlp0", "mlp1", "last_layer"}


def test_center_update_by_hand():
    rng = np.random.default_rng(1)
    teacher = rng.normal(size=(2, 6, 9)).astype(np.float32)
    center = rng.normal(size=(9,)).astype(np.float32)
    expected = 0.9 * center + 0.1 * teacher.reshape(12, 9).mean(0)
    np.testing.assert_allclose(update_center(center, teacher, 0.9), expected, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(update_center(center, list(teacher), 0.9), expected, rtol=1e-6, atol=1e-7)


def test_schedules_hit_their_endpoints():
    c = tiny_dino_config(total_steps=100)
    c.dino.warmup_teacher_temp, c.dino.teacher_temp, c.dino.warmup_teacher_temp_steps = 0.04, 0.07, 30
    method = DINO(c)
    sched = method.schedules()
    assert set(sched) == {"teacher_temp", "momentum"}
    mom, temp = sched["momentum"], sched["teacher_temp"]
    np.testing.assert_allclose(float(mom(0)), 0.996, rtol=1e-7)
    np.testing.assert_allclose(float(mom(100)), 1.0, rtol=1e-6)
    assert 0.996 < float(mom(50)) < 1.0 and float(mom(50)) < float(mom(80))
    np.testing.assert_allclose(float(temp(0)), 0.04, rtol=1e-6)
    np.testing.assert_allclose(float(temp(15)), 0.055, rtol=1e-5)
    for s in (30, 31, 99, 1000):
        np.testing.assert_allclose(float(temp(s)), 0.07, rtol=1e-6)
    _, opt_sched = make_optimizer(c.optim, c.total_steps, c.batch_size, method=c.method)
    np.testing.assert_allclose(float(opt_sched["wd"](0)), 0.04, rtol=1e-6)
    np.testing.assert_allclose(float(opt_sched["wd"](100)), 0.4, rtol=1e-6)


@pytest.fixture(scope="module")
def tiny_setup():
    c = tiny_dino_config()
    method = build_method(c)
    assert isinstance(method, DINO)
    batch = _random_batch(c)
    tx, _ = make_optimizer(c.optim, c.total_steps, c.batch_size, method=c.method)
    state = create_train_state(method, tx, jax.random.key(0), batch)
    step_fn = jax.jit(make_train_step(method, tx, c.seed))
    return c, method, batch, state, step_fn


def _l2(tree):
    return [float(jnp.linalg.norm(x)) for x in jax.tree_util.tree_leaves(tree)]


def test_gradients_reach_the_student_only(tiny_setup):
    _, method, batch, state, _ = tiny_setup
    assert set(state.params) == {"backbone", "head"} and set(state.extra) == {"teacher", "center"}
    rng, step = jax.random.key(3), jnp.asarray(0)
    grads = jax.jit(jax.grad(lambda p: method.loss(p, state.extra, batch, rng, step)[0]))(state.params)
    norms = _l2(grads)
    assert all(n > 0 for n in norms), norms
    extra_grads = jax.jit(jax.grad(lambda e: method.loss(state.params, e, batch, rng, step)[0]))(state.extra)
    assert all(n == 0.0 for n in _l2(extra_grads))


def test_teacher_moves_only_by_ema_and_last_layer_freezes(tiny_setup):
    c, method, batch, state, step_fn = tiny_setup
    last = lambda s: np.asarray(s.params["head"]["last_layer"]["kernel"])  # noqa: E731
    s, lasts = state, [last(state)]
    for i in range(c.optim.freeze_steps + 1):
        old_teacher, old_center = jax.device_get((s.extra["teacher"], s.extra["center"]))
        s, metrics = step_fn(s, batch)
        lasts.append(last(s))
        if i == 1:  # (step 0 has lr 0: the warm-up starts at 0)
            m = float(method.momentum(1))
            assert 0.996 <= m < 0.9961
            expected = optax.incremental_update(jax.device_get(s.params), old_teacher, 1.0 - m)
            for a, b in zip(jax.tree_util.tree_leaves(expected), jax.tree_util.tree_leaves(s.extra["teacher"])):
                np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-8)
            # The centre: EMA (0.9) of the old teacher's mean logits over both global crops.
            t = np.asarray(method.teacher_logits(old_teacher, batch))
            expected_center = 0.9 * old_center + 0.1 * t.reshape(-1, t.shape[-1]).mean(0)
            np.testing.assert_allclose(s.extra["center"], expected_center, rtol=1e-5, atol=1e-6)
            # The student moved, and the teacher moved by ~0.4% of that.
            moved = lambda t: np.abs(np.asarray(t["backbone"]["patch_embed"]["kernel"]) - np.asarray(  # noqa: E731
                state.params["backbone"]["patch_embed"]["kernel"])).max()
            assert moved(s.params) > 0 and 0 < moved(s.extra["teacher"]) < 0.05 * moved(s.params)
            assert {"loss", "teacher_entropy", "kl_mean_teacher", "teacher_mean_entropy"} <= set(metrics)
    for i in range(1, c.optim.freeze_steps + 1):
        np.testing.assert_array_equal(lasts[i], lasts[0])  # frozen for freeze_steps steps
    assert not np.array_equal(lasts[-1], lasts[0])  # then it moves


@pytest.fixture(scope="module")
def dino_runs(tmp_path_factory, data_dir):
    """A 40-step run in a/ (checkpoints at 20 and 40) and a resume in b/ from a's step-20 checkpoint."""
    root = tmp_path_factory.mktemp("dino_runs")
    c = tiny_dino_config(data_dir)
    straight = train_and_evaluate(c, str(root / "a"))
    os.makedirs(root / "b" / "checkpoints")
    shutil.copytree(root / "a" / "checkpoints" / "20", root / "b" / "checkpoints" / "20")
    resumed = train_and_evaluate(c, str(root / "b"))
    return c, root, straight, resumed


def test_tiny_training_lowers_loss_without_collapse(dino_runs):
    c, root, _, _ = dino_runs
    rows = read_metrics(str(root / "a" / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(5, 45, 5))
    logged = {"loss", "teacher_entropy", "kl_mean_teacher", "teacher_mean_entropy", "teacher_temp", "momentum", "lr", "wd"}
    assert logged <= set(rows[0])
    early = np.mean([r["loss"] for r in rows[:2]])
    late = np.mean([r["loss"] for r in rows[-2:]])
    keys = ("step", "loss", "teacher_entropy", "teacher_mean_entropy")
    summary = [tuple(round(r[k], 3) for k in keys) for r in rows]
    assert late < early - 0.2, f"loss did not fall: (step, loss, H(p_t), H(mean p_t)) = {summary}"
    # Not collapsed to uniform: per-sample teacher distributions stay clearly sharper than uniform.
    # Not collapsed to one dimension: the batch-mean teacher distribution keeps a high entropy.
    log_k = math.log(c.dino.out_dim)
    for r in rows[-3:]:
        assert r["teacher_entropy"] < log_k - 0.3, f"uniform collapse? log K = {log_k:.3f}; {summary}"
        assert r["teacher_mean_entropy"] > 0.5 * log_k, f"one-dimension collapse? log K = {log_k:.3f}; {summary}"


def test_resume_is_bit_identical(dino_runs):
    _, root, straight, resumed = dino_runs
    assert int(straight.step) == int(resumed.step) == 40
    a = jax.device_get((straight.params, straight.extra, straight.opt_state))
    b = jax.device_get((resumed.params, resumed.extra, resumed.opt_state))
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(x, y)  # teacher, centre, student, optimiser: exact on CPU
    assert read_metrics(str(root / "b" / "metrics.jsonl"))[0]["step"] == 25


@pytest.mark.parametrize("name", ["dino_mnist5k", "dino_cifar10", "dino_vits16_224"])
def test_shipped_configs_build_and_trace(name):
    """Each DINO config builds its method and traces init + loss on its crop shapes (no compute)."""
    import importlib

    c = importlib.import_module(f"configs.{name}").get_config()
    assert c.method == "dino" and c.data.augment == "multicrop"
    assert c.data.global_size == c.model.image_size
    assert c.optim.freeze_patterns == ("last_layer",) and c.optim.freeze_steps > 0
    method = build_method(c)
    g, l, n = c.data.global_size, c.data.local_size, c.data.num_local
    batch = {
        "global": jax.ShapeDtypeStruct((2, 2, g, g, 3), jnp.float32),
        "local": jax.ShapeDtypeStruct((2, n, l, l, 3), jnp.float32),
    }
    params, extra = jax.eval_shape(method.init, jax.random.key(0), batch)
    assert extra["center"].shape == (c.dino.out_dim,)
    assert params["head"]["last_layer"]["kernel"].shape == (c.dino.bottleneck_dim, c.dino.out_dim)
    loss, aux = jax.eval_shape(method.loss, params, extra, batch, jax.random.key(1), jnp.asarray(0))
    assert loss.shape == () and aux["teacher_batch_mean"].shape == (c.dino.out_dim,)
