"""Turning a checkpoint (or a random ViT, or raw pixels) into feature vectors.

The embedding pass is one jitted function over batches sharded across every
device; the last batch is padded to a fixed shape so it compiles once.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ssl_ad import sharding
from ssl_ad.progress import progress
from ssl_ad.checkpointing import Checkpointer
from ssl_ad.config_defaults import fill_legacy_model_keys
from ssl_ad.errors import UserInputError
from ssl_ad.methods import build_method, can_reconstruct
from ssl_ad.models.layouts import to_layout
from ssl_ad.models.vit import ViT, pool_tokens, vit_from_config

log = logging.getLogger(__name__)


@dataclasses.dataclass
class LoadedCheckpoint:
    """A trained run: its training config, step, the method object and raw params/extra."""

    workdir: str
    name: str
    step: int
    config: ml_collections.ConfigDict
    method: Any
    params: Any
    extra: Any

    def encoder(self) -> ViT:
        return vit_from_config(self.config.model, method=self.config.get("method"), drop_path_rate=0.0)

    def encoder_params(self, which: str) -> Any:
        return self.method.encoder_params(self.params, self.extra, which)

    @property
    def can_reconstruct(self) -> bool:
        """An MAE run with its decoder (converted encoder-only MAE weights have none)."""
        return can_reconstruct(self.method, self.params)


def load_checkpoint(workdir: str, step: int = -1) -> LoadedCheckpoint:
    """Restores params and extra state of a training run (latest step unless ``step`` >= 0).

    The ViT parameters are put into the block layout of the saved config's ``model.scan_blocks``
    (``ssl_ad.models.layouts.to_layout``), so params stored in the other layout still load.

    Raises:
      UserInputError: no checkpoint, no such step, or ViT parameters that fit neither layout.
    """
    ckpt_dir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckpt_dir):
        raise UserInputError(f"no checkpoint in {workdir}: {ckpt_dir} does not exist (train first, or fix the path)")
    ckpt = Checkpointer(ckpt_dir, read_only=True)
    steps = ckpt.all_steps()  # complete checkpoints only
    if not steps:
        raise UserInputError(f"no complete checkpoint in {ckpt_dir}")
    chosen = max(steps) if step < 0 else step
    if chosen not in steps:
        raise UserInputError(f"checkpoint step {step} not in {ckpt_dir}; it has {sorted(steps)}")
    meta = ckpt.meta(chosen)
    # A config saved before model.init / posemb_interpolation / cls_pos existed means the legacy
    # values (e.g. MAE checkpoints of then hold a learned cls_pos): rebuild that model.
    config = fill_legacy_model_keys(ml_collections.ConfigDict(meta["config"]))
    state = ckpt.restore_as_saved(chosen)
    ckpt.close()
    try:
        scanned = bool(config.model.get("scan_blocks", False))
        params, extra = to_layout(state["params"], scanned), to_layout(state.get("extra", {}), scanned)
    except ValueError as e:
        raise UserInputError(f"checkpoint {ckpt_dir}/{chosen}: cannot put its ViT blocks into the layout of "
                             f"model.scan_blocks={scanned}: {e}") from e
    name = os.path.basename(os.path.normpath(workdir))
    return LoadedCheckpoint(workdir, name, chosen, config, build_method(config), params, extra)


def _pad_to(x: np.ndarray, multiple: int) -> np.ndarray:
    extra = (-x.shape[0]) % multiple
    if not extra:
        return x
    return np.concatenate([x, np.zeros((extra,) + x.shape[1:], x.dtype)], axis=0)


def batched_apply(
    fn: Callable[[Any, jax.Array], jax.Array], params: Any, inputs: np.ndarray, batch_size: int, desc: str
) -> np.ndarray:
    """Applies jitted ``fn(params, batch)`` over ``inputs`` in device-sharded batches; returns NumPy.

    The jitted function is cached per ``fn`` (and mesh), so calling again with the same ``fn``
    object (e.g. the training loop's AD monitor every few hundred steps) compiles once.
    """
    mesh = sharding.data_mesh()
    batch_size = max(batch_size // jax.device_count(), 1) * jax.device_count()
    params = sharding.replicate(params, mesh)
    jitted = _jitted(fn, mesh)
    outputs = []
    n = inputs.shape[0]
    for start in progress(range(0, n, batch_size), desc=desc, leave=False, disable=n <= batch_size):
        chunk = inputs[start:start + batch_size]
        padded = _pad_to(chunk, batch_size)
        batch = jax.device_put(padded, sharding.batch_sharding(mesh))
        outputs.append(np.asarray(jitted(params, batch))[: chunk.shape[0]])
    return np.concatenate(outputs, axis=0)


@functools.lru_cache(maxsize=32)
def _jitted(fn: Callable, mesh: Any) -> Callable:
    return jax.jit(fn, out_shardings=sharding.replicated(mesh))


@functools.lru_cache(maxsize=32)
def _pooled_fn(model: ViT, pooling: str, l2_normalize: bool) -> Callable[[Any, jax.Array], jax.Array]:
    """One function object per (model, pooling, l2) (Flax modules hash by their fields), so that
    :func:`batched_apply`'s jit cache hits on repeated calls."""

    def fn(p, x):
        feats = pool_tokens(model.apply({"params": p}, x), pooling, model.use_cls).astype(jnp.float32)
        if l2_normalize:
            feats = feats / jnp.maximum(jnp.linalg.norm(feats, axis=-1, keepdims=True), 1e-12)
        return feats

    return fn


@functools.lru_cache(maxsize=32)
def _tokens_fn(model: ViT) -> Callable[[Any, jax.Array], jax.Array]:
    def fn(p, x):
        tokens = model.apply({"params": p}, x)
        return (tokens[:, 1:] if model.use_cls else tokens).astype(jnp.float32)

    return fn


def embed_images(
    model: ViT, params: Any, images: np.ndarray, pooling: str, batch_size: int = 256, l2_normalize: bool = False
) -> np.ndarray:
    """(N, S, S, 3) normalised images -> (N, D) pooled features."""
    return batched_apply(_pooled_fn(model, pooling, bool(l2_normalize)), params, images, batch_size, f"embed {pooling}")


def embed_patch_tokens(model: ViT, params: Any, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    """(N, S, S, 3) normalised images -> (N, P, D) float32 patch tokens (CLS dropped), row-major grid."""
    return batched_apply(_tokens_fn(model), params, images, batch_size, "patch tokens")


def reconstruction_error_maps(
    method: Any, params: Any, images: np.ndarray, num_masks: int, seed: int, batch_size: int = 256
) -> np.ndarray:
    """(N, grid, grid) MAE reconstruction error averaged over ``num_masks`` random masks.

    The masks depend on the batch position only through a fixed key per batch, so the
    maps are reproducible for a given seed and batch size.
    """
    key = jax.random.key(seed)

    def fn(p, x):
        return method.reconstruction_error(p, x, key, num_masks)

    return batched_apply(fn, params, images, batch_size, "mae recon")


def random_init_params(model: ViT, seed: int) -> Any:
    """Parameters of a freshly initialised ViT: the 'before SSL' baseline."""
    dummy = jnp.zeros((1, model.image_size, model.image_size, 3), jnp.float32)
    return model.init(jax.random.key(seed), dummy)["params"]


def pixel_features(images: np.ndarray) -> np.ndarray:
    """Raw-pixel baseline: uint8 images at native size, scaled to [0, 1] and flattened."""
    return images.reshape(images.shape[0], -1).astype(np.float32) / 255.0


def check_features_finite(features: np.ndarray, what: str) -> None:
    if not np.all(np.isfinite(features)):
        raise UserInputError(f"features of {what} contain NaN/Inf: the checkpoint is likely diverged")


__all__ = [
    "LoadedCheckpoint",
    "load_checkpoint",
    "batched_apply",
    "embed_images",
    "embed_patch_tokens",
    "reconstruction_error_maps",
    "random_init_params",
    "pixel_features",
    "check_features_finite",
]
