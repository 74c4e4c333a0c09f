"""The jitted train step, built from any method: the same code for MAE and DINO."""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from ssl_ad.train.state import TrainState


def make_train_step(
    method: Any, tx: optax.GradientTransformation, seed: int, inject_nan_at_step: int = -1
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """Returns ``step(state, batch) -> (state, metrics)``; the rng is fold_in(key(seed), step)."""

    def train_step(state: TrainState, batch: dict) -> tuple[TrainState, dict]:
        rng = jax.random.fold_in(jax.random.key(seed), state.step)

        def loss_fn(params):
            loss, aux = method.loss(params, state.extra, batch, rng, state.step)
            if inject_nan_at_step >= 0:
                # NaN from step inject_nan_at_step on: the update that completes that step and later ones.
                loss = jnp.where(state.step + 1 >= inject_nan_at_step, jnp.nan, loss)
            return loss, aux

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
