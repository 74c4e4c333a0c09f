"""The jitted train step, built from any method: the same code for MAE and DINO."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import optax

from ssl_ad.methods.base import Method
from ssl_ad.train.state import TrainState


def make_train_step(
    method: Method, tx: optax.GradientTransformation, seed: int
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Returns ``step(state, batch) -> (state, metrics)``; the rng is fold_in(key(seed), step).

    A non-finite loss or gradient norm does not stop the step: the first such step is recorded in
    ``state.bad_step`` / ``bad_loss`` / ``bad_grad_norm`` for the loop to report.
    """

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(jax.random.key(seed), state.step)

        def loss_fn(params):
            return method.loss(params, state.extra, batch, rng, state.step)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        extra = method.update_extra(state.extra, params, aux, state.step)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        first_bad = (state.bad_step < 0) & ~finite
        new_state = state.replace(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            extra=extra,
            bad_step=jnp.where(first_bad, state.step + 1, state.bad_step),  # completed-step count, as logged
            bad_loss=jnp.where(first_bad, loss, state.bad_loss),
            bad_grad_norm=jnp.where(first_bad, grad_norm, state.bad_grad_norm),
        )
        metrics = dict(aux["metrics"], grad_norm=grad_norm)
        return new_state, metrics

    return train_step


def jit_train_step(method: Method, tx: optax.GradientTransformation, seed: int) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """:func:`make_train_step`, jitted with the state donated (its buffers are reused in place)."""
    return jax.jit(make_train_step(method, tx, seed), donate_argnums=(0,))
