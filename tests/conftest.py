"""Shared fixtures: one prepared mnist5k per test session, short compiles, tiny configs."""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_disable_most_optimizations", True)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """A tfds data dir with mnist5k prepared (offline, ~5 s, once per session)."""
    import ml_collections

    from ssl_ad.data.sources import load_split

    d = str(tmp_path_factory.mktemp("tfds"))
    load_split(ml_collections.ConfigDict({"name": "mnist5k", "data_dir": d}), "test")
    return d


# The demo configs (configs/<method>_mnist5k.py) shrunk to compile and run in seconds: model, decoder
# or head and crop sizes only. Each test adds its own schedule (steps, logging, checkpoints).
TINY_SIZES = {
    "mae": {
        "batch_size": 16, "model.variant": "", "model.width": 32, "model.depth": 2, "model.num_heads": 2,
        "mae.decoder_width": 32, "mae.decoder_heads": 2,
    },
    "dino": {
        "batch_size": 16, "model.variant": "", "model.width": 32, "model.depth": 2, "model.num_heads": 2,
        "model.patch_size": 7, "data.num_local": 2, "data.local_size": 14,
        "dino.out_dim": 256, "dino.hidden_dim": 64, "dino.bottleneck_dim": 32,
    },
}


def tiny_config(method: str, data_dir: str, **overrides):
    """configs/<method>_mnist5k.py with TINY_SIZES[method], the prepared data dir and ``overrides``."""
    from importlib import import_module

    c = import_module(f"configs.{method}_mnist5k").get_config()
    c.data.data_dir = data_dir
    return apply_overrides(c, {**TINY_SIZES[method], **overrides})


def tiny_train_argv(method: str, data_dir: str, workdir, overrides: dict, script: str = "train.py") -> list:
    """The train.py command line (``script`` may be tests/train_with_hooks.py) of ``tiny_config``."""
    flags = [f"--config.{k}={v}" for k, v in {**TINY_SIZES[method], **overrides}.items()]
    return [sys.executable, script, f"--config=configs/{method}_mnist5k.py", f"--workdir={workdir}",
            f"--config.data.data_dir={data_dir}", *flags]


def tiny_mae_config(data_dir: str, **overrides):
    """configs/mae_mnist5k.py shrunk to compile and run in seconds: 20 steps, logs every 5, checkpoints every 10."""
    schedule = {"total_steps": 20, "log_every": 5, "checkpoint_every": 10, "optim.warmup_steps": 5}
    return tiny_config("mae", data_dir, **{**schedule, **overrides})


def apply_overrides(c, overrides: dict):
    """Sets dotted keys ('model.width': 32) on a ConfigDict, as --config.KEY=VALUE would."""
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c


def logged_steps(workdir) -> list[int]:
    """Steps in ``workdir``/metrics.jsonl so far, read while the run may still be writing it."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    steps = []
    with open(path) as f:
        for line in f:
            try:
                steps.append(json.loads(line)["step"])
            except ValueError:  # a line being written
                pass
    return steps
