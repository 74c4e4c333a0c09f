"""Step-indexed schedules shared by the optimizer and the methods (learning rate, weight decay,
DINO's teacher momentum and temperature), as optax schedules: ``schedule(step) -> value``.

References: DINO, facebookresearch/dino ``utils.py`` ``cosine_scheduler`` (warmup then half-cosine;
weight decay and teacher momentum follow a cosine from their start to their end value); MAE,
facebookresearch/mae ``util/lr_sched.py`` ``adjust_learning_rate`` (linear warmup, half-cosine to
``min_lr``); the linear scaling rule lr = base_lr * batch / 256 of both ``main_*.py``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import optax

Schedule = Callable[[Any], Any]


def scaled_lr(optim_cfg: Any, batch_size: int) -> float:
    """The linear scaling rule: lr = base_lr * global_batch / 256."""
    return float(optim_cfg.base_lr) * batch_size / 256.0


def lr_schedule(optim_cfg: Any, total_steps: int, batch_size: int) -> Schedule:
    peak = scaled_lr(optim_cfg, batch_size)
    warmup = int(min(optim_cfg.warmup_steps, max(total_steps - 1, 0)))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=peak,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=float(optim_cfg.min_lr),
    )


def cosine_schedule(start: float, end: float, total_steps: int) -> Schedule:
    """Half-cosine from ``start`` at step 0 to ``end`` at ``total_steps``, then constant.

    optax's cosine decay reaches ``alpha * init``; alpha > 1 gives DINO's rising weight decay
    and momentum. A zero start has no ratio, so it gets the same curve written out.
    """
    if start == end:
        return optax.constant_schedule(start)
    steps = max(int(total_steps), 1)
    if start != 0.0:
        return optax.cosine_decay_schedule(start, steps, alpha=end / start)
    return lambda step: end * 0.5 * (1 - jnp.cos(jnp.pi * jnp.minimum(step / steps, 1.0)))


def wd_schedule(optim_cfg: Any, total_steps: int) -> Schedule:
    return cosine_schedule(float(optim_cfg.weight_decay), float(optim_cfg.weight_decay_end), total_steps)
