"""Fault injection for tests, around the training loop's method and jitted step (kept out of the
production code): a NaN loss from a chosen step on, and a pause after every step so that a test
can kill or preempt a run of a tiny model (whose steps take milliseconds) at a step it has seen.

In-process: ``install(monkeypatch.setattr, nan_from_step=4)``. In a ``train.py`` subprocess: run
``tests/train_with_hooks.py`` with the same flags as train.py and the environment variables below.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from ssl_ad.train import loop

STEP_DELAY_ENV = "SSL_AD_TEST_STEP_DELAY_S"  # seconds to sleep after every step
NAN_FROM_STEP_ENV = "SSL_AD_TEST_NAN_FROM_STEP"  # the loss is NaN in this step and every later one


class NaNFromStep:
    """A method whose loss is NaN in step ``first_bad_step`` (the update from step N-1 to N) and later."""

    def __init__(self, method: Any, first_bad_step: int):
        self._method, self._first_bad_step = method, int(first_bad_step)

    def __getattr__(self, name: str) -> Any:  # everything else is the wrapped method's
        return getattr(self._method, name)

    def loss(self, params, extra, batch, rng, step):
        loss, aux = self._method.loss(params, extra, batch, rng, step)
        return jnp.where(step + 1 >= self._first_bad_step, jnp.nan, loss), aux


def _slow(step_fn: Callable, delay_s: float) -> Callable:
    def step(state, batch):
        out = step_fn(state, batch)
        jax.block_until_ready(out[1])
        time.sleep(delay_s)
        return out

    return step


def install(setattr_fn: Callable[[Any, str, Any], None] = setattr, nan_from_step: int = -1, step_delay_s: float = 0.0):
    """Wraps the loop's ``build_method`` / ``jit_train_step`` (``setattr_fn``: ``monkeypatch.setattr``
    in pytest, so the patch is undone after the test)."""
    if nan_from_step >= 0:
        build = loop.build_method
        setattr_fn(loop, "build_method", lambda config: NaNFromStep(build(config), nan_from_step))
    if step_delay_s > 0:
        jit_step = loop.jit_train_step
        setattr_fn(loop, "jit_train_step", lambda *a, **k: _slow(jit_step(*a, **k), step_delay_s))


def install_from_env() -> None:
    """:func:`install` with the values of ``NAN_FROM_STEP_ENV`` and ``STEP_DELAY_ENV`` (unset: no hook)."""
    install(nan_from_step=int(os.environ.get(NAN_FROM_STEP_ENV, "") or -1),
            step_delay_s=float(os.environ.get(STEP_DELAY_ENV, "") or 0.0))
