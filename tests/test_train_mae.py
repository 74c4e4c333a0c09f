"""A whole tiny MAE training through the real entry, resume, and multi-device equivalence."""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np

from ssl_ad.train.loop import train_and_evaluate
from ssl_ad.train.metrics_log import read_metrics
from tests.conftest import REPO, tiny_mae_config


def _leaves(state):
    return jax.tree_util.tree_leaves(jax.device_get((state.params, state.opt_state, state.extra)))


def test_tiny_training_lowers_loss_and_writes_outputs(tmp_path, data_dir):
    c = tiny_mae_config(data_dir, total_steps=40, log_every=5, checkpoint_every=20)
    train_and_evaluate(c, str(tmp_path))
    rows = read_metrics(str(tmp_path / "metrics.jsonl"))
    assert [r["step"] for r in rows] == list(range(5, 45, 5))
    assert rows[-1]["loss"] < 0.8 * rows[0]["loss"], rows
    assert {"loss", "lr", "wd", "images_per_s", "seconds_per_step", "grad_norm"} <= set(rows[0])
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["20", "40"]
    assert json.loads((tmp_path / "config.json").read_text())["model"]["width"] == 32
    assert (tmp_path / "reconstructions.png").stat().st_size > 1000


def test_resume_is_bit_identical_and_complete_run_is_a_noop(tmp_path, data_dir):
    c = tiny_mae_config(data_dir, total_steps=20, checkpoint_every=10)
    straight = train_and_evaluate(c, str(tmp_path / "a"))
    # A run that stopped after step 10: only that checkpoint exists.
    os.makedirs(tmp_path / "b" / "checkpoints")
    shutil.copytree(tmp_path / "a" / "checkpoints" / "10", tmp_path / "b" / "checkpoints" / "10")
    resumed = train_and_evaluate(c, str(tmp_path / "b"))
    assert int(resumed.step) == int(straight.step) == 20
    for x, y in zip(_leaves(straight), _leaves(resumed)):
        np.testing.assert_array_equal(x, y)
    rows = read_metrics(str(tmp_path / "b" / "metrics.jsonl"))
    assert rows[0]["step"] == 15  # logging continued from the resumed step
    # Training is complete: running again changes nothing.
    before = sorted(os.listdir(tmp_path / "a" / "checkpoints"))
    again = train_and_evaluate(c, str(tmp_path / "a"))
    assert int(again.step) == 20 and sorted(os.listdir(tmp_path / "a" / "checkpoints")) == before


_SHARDED = r"""
import os, sys, json
sys.path.insert(0, {repo!r})
import jax, numpy as np
jax.config.update('jax_disable_most_optimizations', True)
from tests.conftest import tiny_mae_config
from ssl_ad.train.loop import train_and_evaluate
c = tiny_mae_config({data_dir!r}, total_steps=6, checkpoint_every=6, log_every=3)
s = train_and_evaluate(c, {workdir!r})
leaves = jax.tree_util.tree_leaves(jax.device_get(s.params))
print(json.dumps({{'devices': jax.device_count(), 'sum': [float(np.abs(l).sum()) for l in leaves]}}))
np.savez({out!r}, *leaves)
"""


def _run_with_devices(n, tmp_path, data_dir, name):
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}", JAX_PLATFORMS="cpu")
    out = str(tmp_path / f"{name}.npz")
    code = _SHARDED.format(repo=REPO, data_dir=data_dir, workdir=str(tmp_path / name), out=out)
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=REPO, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["devices"] == n
    with np.load(out) as f:
        return [f[k] for k in sorted(f.files, key=lambda s: int(s.split("_")[1]))]


def test_two_device_sharded_training_matches_one_device(tmp_path, data_dir):
    """Same data, same keys: a batch split over 2 devices gives the 1-device parameters
    up to float32 reduction-order differences (tolerance 1e-5 absolute after 6 Adam steps)."""
    one = _run_with_devices(1, tmp_path, data_dir, "one")
    two = _run_with_devices(2, tmp_path, data_dir, "two")
    assert len(one) == len(two)
    for a, b in zip(one, two):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
