"""Shared fixtures: one prepared mnist5k per test session, short compiles, tiny configs."""

import os

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


def tiny_mae_config(data_dir: str, **overrides):
    """configs/mae_mnist5k.py shrunk to compile and run in seconds."""
    from configs import mae_mnist5k

    c = mae_mnist5k.get_config()
    c.model.variant = ""  # the sizes below instead of the config's "mu/4"
    c.data.data_dir = data_dir
    c.total_steps = 20
    c.batch_size = 16
    c.log_every = 5
    c.checkpoint_every = 10
    c.model.width = 32
    c.model.depth = 2
    c.model.num_heads = 2
    c.mae.decoder_width = 32
    c.mae.decoder_heads = 2
    c.optim.warmup_steps = 5
    return apply_overrides(c, overrides)


def apply_overrides(c, overrides: dict):
    """Sets dotted keys ('model.width': 32) on a ConfigDict, as --config.KEY=VALUE would."""
    for key, value in overrides.items():
        node = c
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        node[leaf] = value
    return c
