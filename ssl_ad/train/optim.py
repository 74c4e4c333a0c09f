"""AdamW with warmup + cosine learning rate, cosine weight decay, clipping and early freezing."""

from __future__ import annotations

from typing import Any, Callable

import jax
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


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(params: Any) -> Any:
    """True where weight decay applies: matrices and kernels, not biases, norms, tokens or position embeddings."""
    def keep(path, leaf):
        name = _path_str(path)
        return leaf.ndim > 1 and not any(t in name for t in ("pos_embed", "cls_token", "cls_pos", "mask_token"))

    return jax.tree_util.tree_map_with_path(keep, params)


def freeze_until(num_steps: int, patterns: tuple[str, ...]) -> optax.GradientTransformation:
    """Zeroes the updates of parameters whose path contains one of ``patterns`` for the first ``num_steps``.

    Placed last in the chain, so frozen parameters are not moved by weight decay either
    (as DINO's ``cancel_gradients_last_layer`` does by dropping their gradients).
    """
    def init_fn(params):
        del params
        return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

    def update_fn(updates, state, params=None):
        del params
        frozen = state.count < num_steps

        def gate(path, u):
            if any(p in _path_str(path) for p in patterns):
                return jnp.where(frozen, jnp.zeros_like(u), u)
            return u

        return jax.tree_util.tree_map_with_path(gate, updates), optax.ScaleByScheduleState(count=state.count + 1)

    return optax.GradientTransformation(init_fn, update_fn)


def make_optimizer(optim_cfg: Any, total_steps: int, batch_size: int) -> tuple[optax.GradientTransformation, dict[str, Schedule]]:
    """Returns the optax chain and its schedules ({'lr', 'wd'}) for logging."""
    lr = lr_schedule(optim_cfg, total_steps, batch_size)
    wd = wd_schedule(optim_cfg, total_steps)
    parts = []
    if optim_cfg.clip_norm:
        parts.append(optax.clip_by_global_norm(float(optim_cfg.clip_norm)))
    parts.append(optax.adamw(lr, b1=optim_cfg.b1, b2=optim_cfg.b2, weight_decay=wd, mask=decay_mask))
    if optim_cfg.freeze_steps and optim_cfg.freeze_patterns:
        parts.append(freeze_until(int(optim_cfg.freeze_steps), tuple(optim_cfg.freeze_patterns)))
    return optax.chain(*parts), {"lr": lr, "wd": wd}
