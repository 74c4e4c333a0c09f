"""The train state: everything a resumed run needs, as one pytree."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import struct

from ssl_ad.methods.base import Method


class TrainState(struct.PyTreeNode):
    """step, trainable params, optimiser state, the method's extra state (e.g. DINO teacher + centre).

    ``bad_step`` is the first step whose loss or gradient norm was not finite (-1 if none), counted
    as everywhere (metrics.jsonl, checkpoints): step N is the update from step N-1 to N;
    the loop checks it before every save so a diverged state is never written.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    extra: Any
    bad_step: jax.Array
    bad_loss: jax.Array
    bad_grad_norm: jax.Array


def create_train_state(method: Method, tx: optax.GradientTransformation, rng: jax.Array, batch: dict) -> TrainState:
    params, extra = method.init(rng, batch)
    return TrainState(
        step=jnp.zeros([], jnp.int32),
        params=params,
        opt_state=tx.init(params),
        extra=extra,
        bad_step=jnp.full([], -1, jnp.int32),
        bad_loss=jnp.zeros([], jnp.float32),
        bad_grad_norm=jnp.zeros([], jnp.float32),
    )
