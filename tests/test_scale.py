"""Scale: sharded train steps equal the 1-device step, per-host data shards, sharded checkpoints,
mixed precision and rematerialisation.

The device-dependent checks run in one subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (4 CPU devices sharing the cores).
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from ssl_ad.data.pipeline import batch_positions, example_indices, train_batches
from ssl_ad.data.sources import ImageSplit
from ssl_ad.methods import build_method
from ssl_ad.train.optim import make_optimizer
from ssl_ad.train.state import create_train_state
from ssl_ad.train.step import make_train_step
from tests.conftest import REPO

# A sharded step sums the per-device gradient shards in another order than one device does:
# float32 reduction-order noise (loss and gradient norm agree to ~1e-7 relative). Adam's
# g / sqrt(v) then normalises away the gradient's scale, so a parameter whose gradient is ~0 can
# move by a different fraction of the learning rate: after 3 steps at lr 1e-4 the parameters
# must agree to 1e-5 absolute (10 % of one step) + 1e-4 relative.
SHARDED_ATOL, SHARDED_RTOL = 1e-5, 1e-4


def tiny_config(method: str, **overrides):
    """configs/{mae,dino}_mnist5k.py shrunk to compile in seconds (no data set needed: fake images)."""
    if method == "mae":
        from tests.conftest import tiny_mae_config

        c = tiny_mae_config("")
    else:
        from configs import dino_mnist5k

        c = dino_mnist5k.get_config()
        c.batch_size = 16
        c.model.variant = ""  # the sizes below instead of the config's "mu/7"
        c.model.width, c.model.depth, c.model.num_heads = 32, 2, 2
        for key, value in _TINY_DINO.items():
            node = c
            *parents, leaf = key.split(".")
            for p in parents:
                node = node[p]
            if leaf in node:
                node[leaf] = value
    c.total_steps = 20
    c.optim.warmup_steps = 1  # step 0 has lr 0: make the later steps move the parameters ...
    c.optim.base_lr = 1e-4 * 256 / c.batch_size  # ... by about lr = 1e-4 each (Adam)
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


# Small DINO head sizes (keys that the DINO config lacks are skipped).
_TINY_DINO = {
    "model.patch_size": 7,
    "data.num_local": 2,
    "data.local_size": 14,
    "dino.out_dim": 256,
    "dino.hidden_dim": 64,
    "dino.bottleneck_dim": 32,
    "dino.warmup_teacher_temp_steps": 10,
    "optim.freeze_steps": 1,  # the last layer moves from step 1 on
}


def fake_split(n: int = 64, side: int = 28, seed: int = 0) -> ImageSplit:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, side, side, 1), dtype=np.uint8)
    return ImageSplit("fake", "train", images, np.arange(n) % 10, [str(i) for i in range(10)])


def init_state(method, tx, seed: int, batch: dict):
    """create_train_state, jitted (eager init of even a tiny ViT dispatches op by op: ~4x slower)."""
    return jax.jit(lambda key, b: create_train_state(method, tx, key, b))(jax.random.key(seed), batch)


@functools.lru_cache(maxsize=None)
def pipeline_batches(method: str, n: int = 3) -> tuple[dict, ...]:
    """The first ``n`` batches of the tiny config's real pipeline over random fake digits."""
    it = train_batches(tiny_config(method), fake_split(), 0)
    return tuple(next(it) for _ in range(n))


# --------------------------------------------------------------------------------------------
# Sharded steps and sharded checkpoints (one 4-device subprocess)
# --------------------------------------------------------------------------------------------

_SUBPROCESS = r"""
import json, os, sys, tempfile
sys.path.insert(0, {repo!r})
import jax, numpy as np
jax.config.update('jax_disable_most_optimizations', True)
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from ssl_ad.methods import build_method
from ssl_ad import sharding
from ssl_ad.checkpointing import Checkpointer
from ssl_ad.train.optim import make_optimizer
from ssl_ad.train.step import make_train_step
from tests.test_scale import init_state, tiny_config, pipeline_batches

out = {{'devices': jax.device_count()}}
STEPS = 3
TRAINED = {{}}  # method name -> (method, tx, host state after STEPS steps)

def sharded_vs_one(method_name):
    c = tiny_config(method_name)
    method = build_method(c)
    tx, _ = make_optimizer(c.optim, c.total_steps, c.batch_size, method=c.method)
    batches = pipeline_batches(method_name, STEPS)
    state0 = jax.device_get(init_state(method, tx, c.seed, batches[0]))
    res = {{}}
    for name, devs in (('four', jax.devices()), ('one', jax.devices()[:1])):
        mesh = Mesh(np.asarray(devs), ('data',))
        state = sharding.replicate(state0, mesh)
        step = jax.jit(make_train_step(method, tx, c.seed), donate_argnums=(0,))
        losses, gnorms, shard_rows = [], [], None
        for b in batches:
            gb = sharding.shard_batch(b, mesh)
            shard_rows = sorted({{s.data.shape[0] for k in gb for s in gb[k].addressable_shards}})
            state, m = step(state, gb)
            losses.append(float(m['loss']))
            gnorms.append(float(m['grad_norm']))
        n_dev = len(jax.tree_util.tree_leaves(state.params)[0].sharding.device_set)
        res[name] = (jax.device_get(state), losses, shard_rows, n_dev, gnorms)
    a, b = res['four'][0], res['one'][0]
    TRAINED[method_name] = (method, tx, b)
    pa = jax.tree_util.tree_leaves((a.params, a.extra)); pb = jax.tree_util.tree_leaves((b.params, b.extra))
    d0 = jax.tree_util.tree_leaves(state0.params)
    return {{
        'max_abs_diff': max(float(np.max(np.abs(x - y))) for x, y in zip(pa, pb)),
        'max_rel_diff': max(float(np.max(np.abs(x - y) / (np.abs(y) + 1e-6))) for x, y in zip(pa, pb)),
        'params_moved': max(float(np.max(np.abs(x - y))) for x, y in zip(jax.tree_util.tree_leaves(a.params), d0)),
        'losses_four': res['four'][1], 'losses_one': res['one'][1],
        'grad_norms_four': res['four'][4], 'grad_norms_one': res['one'][4],
        'shard_rows_four': res['four'][2], 'shard_rows_one': res['one'][2],
        'param_devices_four': res['four'][3], 'param_devices_one': res['one'][3],
        'leaves': [len(pa), len(pb)],
        'ok': all(np.allclose(x, y, atol={atol}, rtol={rtol}) for x, y in zip(pa, pb)),
    }}

out['mae'] = sharded_vs_one('mae')
out['dino'] = sharded_vs_one('dino')

# Checkpoint round trip with the state on a 2-device mesh: replicated (the loop's placement) and
# split along 'data' (every leaf whose first dimension is even).
# The state is the trained MAE state (3 steps: non-trivial Adam moments).
method, tx, trained = TRAINED['mae']
mesh2 = Mesh(np.asarray(jax.devices()[:2]), ('data',))
state = sharding.replicate(trained, mesh2)

def split_even(x):
    spec = P('data') if getattr(x, 'ndim', 0) and x.shape[0] % 2 == 0 else P()
    return jax.device_put(x, NamedSharding(mesh2, spec))

ckpt_out = {{}}
for placement, place in (('replicated', lambda s: s), ('split', lambda s: jax.tree_util.tree_map(split_even, s))):
    saved = place(state)
    host = jax.device_get(saved)
    with tempfile.TemporaryDirectory() as d:
        ck = Checkpointer(os.path.join(d, 'checkpoints'))
        ck.save(2, saved, {{'step': 2}})
        ck.wait()
        fresh = place(sharding.replicate(init_state(method, tx, 1, pipeline_batches('mae')[0]), mesh2))
        restored = ck.restore(2, fresh)
        ck.close()
    sl, rl = jax.tree_util.tree_leaves(saved), jax.tree_util.tree_leaves(restored)
    ckpt_out[placement] = {{
        'bit_exact': all(
            np.array_equal(x, y) and x.dtype == y.dtype
            for x, y in zip(jax.tree_util.tree_leaves(host), jax.tree_util.tree_leaves(jax.device_get(restored)))
        ),
        'same_shardings': all(x.sharding.is_equivalent_to(y.sharding, x.ndim) for x, y in zip(sl, rl)),
        'sharded_leaves': sum(1 for x in sl if not x.sharding.is_fully_replicated),
        'devices': sorted({{d.id for x in sl for d in x.sharding.device_set}}),
        'leaves': len(sl),
    }}
out['checkpoint'] = ckpt_out
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def four_devices():
    code = _SUBPROCESS.format(repo=REPO, atol=SHARDED_ATOL, rtol=SHARDED_RTOL)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["devices"] == 4
    return info


def _check_sharded(r):
    assert r["shard_rows_four"] == [4] and r["shard_rows_one"] == [16]  # batch 16 split 4 ways, or whole
    assert r["param_devices_four"] == 4 and r["param_devices_one"] == 1  # params replicated on the mesh
    assert r["params_moved"] > 1e-4, r  # 2 steps at lr 1e-4 did move the parameters
    np.testing.assert_allclose(r["losses_four"], r["losses_one"], rtol=1e-5)
    np.testing.assert_allclose(r["grad_norms_four"], r["grad_norms_one"], rtol=1e-5)
    assert r["ok"], f"4-device vs 1-device params differ beyond atol={SHARDED_ATOL}, rtol={SHARDED_RTOL}: {r}"


def test_sharded_mae_step_matches_one_device(four_devices):
    """3 MAE steps with the batch split over 4 devices == over 1 device (atol 1e-5, rtol 1e-4)."""
    _check_sharded(four_devices["mae"])


def test_sharded_dino_step_matches_one_device(four_devices):
    """3 DINO steps (student, teacher EMA and centre) over 4 devices == over 1 device."""
    if "dino" not in four_devices:
        pytest.skip("ssl_ad/methods/dino.py or configs/dino_mnist5k.py does not exist yet")
    _check_sharded(four_devices["dino"])


@pytest.mark.parametrize("placement", ["replicated", "split"])
def test_checkpoint_of_state_on_two_devices_round_trips_bit_exactly(four_devices, placement):
    r = four_devices["checkpoint"][placement]
    assert r["devices"] == [0, 1]
    assert r["bit_exact"] and r["same_shardings"], r
    if placement == "split":
        assert r["sharded_leaves"] > 0
    else:
        assert r["sharded_leaves"] == 0


# --------------------------------------------------------------------------------------------
# Per-host data shards
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("process_count", [2, 4])
def test_host_shards_are_disjoint_and_complete(process_count):
    """Each host's batches (the real pipeline) are its contiguous slice of the 1-process batches."""
    n, batch, steps, _seed = 24, 8, 6, 5  # 48 positions = 2 epochs; steps 2 and 5 end an epoch
    # Constant images whose value is the example index survive crop, resize and flip unchanged.
    images = np.broadcast_to(np.arange(n, dtype=np.uint8)[:, None, None, None] * 10, (n, 12, 12, 1)).copy()
    split = ImageSplit("ids", "train", images, np.zeros(n, np.int64), ["x"])
    c = tiny_config("mae", batch_size=batch, total_steps=steps)
    c.model.image_size, c.model.patch_size = 8, 4
    c.data.mean, c.data.std = (0.0,) * 3, (1.0,) * 3
    whole = list(train_batches(c, split, 0))
    hosts = [
        list(train_batches(c, split, 0, process_index=p, process_count=process_count)) for p in range(process_count)
    ]
    local = batch // process_count
    ids_seen = []
    for s in range(steps):
        parts = [hosts[p][s]["image"] for p in range(process_count)]
        assert all(x.shape[0] == local for x in parts)
        np.testing.assert_array_equal(np.concatenate(parts), whole[s]["image"])
        ids = [np.rint(x[:, 0, 0, 0] * 255 / 10).astype(int) for x in parts]
        expect = [
            example_indices(batch_positions(tf.constant(s, tf.int64), batch, local, p), n, seed=c.seed).numpy()
            for p in range(process_count)
        ]
        for got, want in zip(ids, expect):
            np.testing.assert_array_equal(got, want)
        ids_seen.extend(np.concatenate(ids))
        step = tf.constant(s, tf.int64)
        positions = [set(batch_positions(step, batch, local, p).numpy()) for p in range(process_count)]
        assert sum(len(p) for p in positions) == len(set().union(*positions)) == batch  # disjoint
        assert set().union(*positions) == set(range(s * batch, (s + 1) * batch))  # complete
    assert sorted(ids_seen[:n]) == list(range(n)) and sorted(ids_seen[n:]) == list(range(n))  # each epoch once


# --------------------------------------------------------------------------------------------
# Mixed precision and rematerialisation (1 device, in process)
# --------------------------------------------------------------------------------------------


def _dtypes(tree) -> set[str]:
    return {str(x.dtype) for x in jax.tree_util.tree_leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def _dot_dtypes(jaxpr) -> set[tuple[str, ...]]:
    """Input dtypes of every matmul/conv in a (nested) jaxpr."""
    found = set()

    def walk(j):
        for e in j.eqns:
            if e.primitive.name in ("dot_general", "conv_general_dilated"):
                found.add(tuple(str(v.aval.dtype) for v in e.invars))
            for p in e.params.values():
                for sub in p if isinstance(p, (list, tuple)) else [p]:
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jaxpr.jaxpr)
    return found


@pytest.mark.parametrize("method_name", ["mae", "dino"])
def test_bfloat16_computes_in_bf16_and_keeps_float32_params(method_name):
    c = tiny_config(method_name)
    c.model.dtype = "bfloat16"
    method = build_method(c)
    tx, _ = make_optimizer(c.optim, c.total_steps, c.batch_size, method=c.method)
    batch = pipeline_batches(method_name)[0]
    state = init_state(method, tx, 0, batch)
    assert _dtypes((state.params, state.opt_state, state.extra)) == {"float32"}
    step = make_train_step(method, tx, c.seed)
    dots = _dot_dtypes(jax.make_jaxpr(step)(state, batch))
    assert ("bfloat16", "bfloat16") in dots  # the matmuls do run in bf16
    jitted = jax.jit(step, donate_argnums=(0,))
    for _ in range(3):
        state, metrics = jitted(state, batch)
    assert _dtypes((state.params, state.opt_state, state.extra)) == {"float32"}
    assert metrics["loss"].dtype == jnp.float32 and np.isfinite(float(metrics["loss"]))
    assert np.isfinite(float(metrics["grad_norm"]))


@pytest.mark.parametrize("method_name", ["mae", "dino"])
def test_remat_gives_the_same_loss_and_gradients(method_name):
    """model.remat only recomputes activations in the backward pass: same loss and grads (1e-5)."""
    out = {}
    for remat in (False, True):
        c = tiny_config(method_name)
        c.model.remat = remat
        c.model.drop_path_rate = 0.2  # stochastic depth must draw the same masks when recomputed
        method = build_method(c)
        tx, _ = make_optimizer(c.optim, c.total_steps, c.batch_size, method=c.method)
        batch = pipeline_batches(method_name)[0]
        state = init_state(method, tx, 0, batch)

        @jax.jit
        def loss_and_grads(params, extra, batch):
            fn = lambda p: method.loss(p, extra, batch, jax.random.key(1), jnp.asarray(3))[0]  # noqa: E731
            return jax.value_and_grad(fn)(params)

        out[remat] = jax.device_get(loss_and_grads(state.params, state.extra, batch))
        prims = str(loss_and_grads.trace(state.params, state.extra, batch).jaxpr)
        assert ("checkpoint" in prims or "remat" in prims) == remat  # remat is really on (or off)
    np.testing.assert_allclose(out[True][0], out[False][0], rtol=1e-5, atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(out[True][1]), jax.tree_util.tree_leaves(out[False][1])):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
