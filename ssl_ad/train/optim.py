"""AdamW with warmup + cosine learning rate, cosine weight decay, clipping and early freezing,
built the way the reference code builds it (see :func:`make_optimizer`).

References (PyTorch originals):
  * DINO, facebookresearch/dino: ``main_dino.py`` ``train_one_epoch`` (lr and wd set from the
    global iteration each step), ``utils.py`` ``clip_gradients`` (per-tensor clipping),
    ``cancel_gradients_last_layer`` (``p.grad = None`` for the last layer during the first
    epoch(s)), ``get_params_groups`` (no weight decay for biases and 1-d parameters).
  * MAE, facebookresearch/mae: ``main_pretrain.py`` (``optim_factory.add_weight_decay`` of timm
    with an empty skip list: the same no-decay rule; AdamW betas (0.9, 0.95)), ``util/misc.py``
    ``NativeScalerWithGradNormCount`` (``clip_grad_norm_``, a global-norm clip, only when
    ``clip_grad`` is given: the pretraining script never gives it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from ssl_ad.errors import UserInputError
from ssl_ad.models.layouts import stacked_by_layer
from ssl_ad.schedules import Schedule, lr_schedule, wd_schedule

CLIP_MODES = ("reference", "per_tensor", "global")
# optim.clip_mode='reference' resolves to the mode of the method's reference code.
REFERENCE_CLIP_MODE = {"dino": "per_tensor", "mae": "global"}
# ssl_ad's former weight-decay exemptions (optim.weight_decay_exclude reproduces them).
TOKEN_AND_POSEMB_NAMES = ("pos_embed", "cls_token", "cls_pos", "mask_token")
# DINO's utils.clip_gradients: clip_coef = clip / (norm + 1e-6).
PER_TENSOR_EPS = 1e-6


def _path_str(path) -> str:
    return "/".join(str(getattr(k, "key", getattr(k, "name", k))) for k in path)


def decay_mask(params: Any, exclude: tuple[str, ...] = ()) -> Any:
    """True where weight decay applies.

    The reference rule (DINO ``utils.get_params_groups``; timm ``add_weight_decay`` /
    ``param_groups_weight_decay`` as MAE's ``main_pretrain.py`` calls it, with no skip list):
    no decay for a parameter named ``bias`` or with at most one dimension (biases, LayerNorm
    scales, the weight-normalised last layer's scale); every other parameter is decayed,
    including the position embedding, the CLS token and MAE's mask token. ``exclude`` also
    exempts every parameter whose path contains one of its strings (ssl_ad's former rule is
    ``exclude=TOKEN_AND_POSEMB_NAMES``). Parameters of scanned blocks (``model.scan_blocks``) count
    their dimensions without the leading layer axis, as the unrolled layout's per-block tensors.
    """
    exclude = tuple(exclude)

    def keep(path, leaf):
        name = _path_str(path)
        if name.split("/")[-1] == "bias" or jnp.ndim(leaf) - int(stacked_by_layer(name)) <= 1:
            return False
        return not any(t in name for t in exclude)

    return jax.tree_util.tree_map_with_path(keep, params)


def clip_per_tensor(max_norm: float) -> optax.GradientTransformation:
    """DINO's ``utils.clip_gradients``: each gradient tensor g with norm ||g||_2 is multiplied by
    ``max_norm / (||g|| + 1e-6)`` when that factor is below 1, independently of the others.
    A scanned block's (depth, ...) gradient is clipped per layer, as the unrolled layout's tensors."""
    max_norm = float(max_norm)

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params

        def clip(path, g):
            axes = tuple(range(1, g.ndim)) if stacked_by_layer(_path_str(path)) else None
            norm = jnp.sqrt(jnp.sum(jnp.square(g.astype(jnp.float32)), axis=axes, keepdims=axes is not None))
            coef = max_norm / (norm + PER_TENSOR_EPS)
            return jnp.where(coef < 1.0, g * coef.astype(g.dtype), g)

        return jax.tree_util.tree_map_with_path(clip, updates), state

    return optax.GradientTransformation(init_fn, update_fn)


def _clip_mode_name(optim_cfg: Any) -> str:
    """``optim.clip_mode`` as given, checked against :data:`CLIP_MODES`."""
    mode = str(optim_cfg.get("clip_mode", "reference"))
    if mode not in CLIP_MODES:
        raise UserInputError(f"optim.clip_mode must be one of {CLIP_MODES}, not {mode!r}")
    return mode


def resolve_clip_mode(optim_cfg: Any, method: str = "") -> str:
    """'per_tensor' or 'global' ('reference' picks the method's: DINO per tensor, MAE global)."""
    mode = _clip_mode_name(optim_cfg)
    if mode != "reference":
        return mode
    if method not in REFERENCE_CLIP_MODE:
        raise UserInputError(
            f"optim.clip_mode='reference' needs the method ({sorted(REFERENCE_CLIP_MODE)}), got {method!r}: "
            "pass make_optimizer(..., method=config.method) or set optim.clip_mode to 'per_tensor' or 'global'"
        )
    return REFERENCE_CLIP_MODE[method]


class HoldState(NamedTuple):
    """State of :func:`hold_until`: the global step and the wrapped transformation's state."""

    count: jax.Array
    inner_state: Any


def hold_until(inner: optax.GradientTransformation, num_steps: int) -> optax.GradientTransformation:
    """``inner`` as if it received no gradient for the first ``num_steps`` steps.

    While the global step is below ``num_steps`` the update is zero and ``inner``'s state
    (Adam's moments and its bias-correction count) stays exactly as initialised; afterwards
    ``inner`` runs normally, so its first real step has count 1. This is what PyTorch's AdamW
    does to a parameter whose ``grad`` is None (DINO's ``cancel_gradients_last_layer``).
    """
    num_steps = int(num_steps)

    def init_fn(params):
        return HoldState(count=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

    def update_fn(updates, state, params=None):
        held = state.count < num_steps
        new_updates, new_inner = inner.update(updates, state.inner_state, params)
        new_updates = jax.tree_util.tree_map(lambda u: jnp.where(held, jnp.zeros_like(u), u), new_updates)
        new_inner = jax.tree_util.tree_map(lambda old, new: jnp.where(held, old, new), state.inner_state, new_inner)
        return new_updates, HoldState(count=optax.safe_increment(state.count), inner_state=new_inner)

    return optax.GradientTransformation(init_fn, update_fn)


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


def _freeze_labels(patterns: tuple[str, ...]) -> Callable[[Any], Any]:
    def labels(tree):
        out = jax.tree_util.tree_map_with_path(
            lambda path, _: "frozen" if any(p in _path_str(path) for p in patterns) else "rest", tree
        )
        if "frozen" not in jax.tree_util.tree_leaves(out):
            raise UserInputError(f"optim.freeze_patterns {patterns} match no parameter path")
        return out

    return labels


def make_optimizer(
    optim_cfg: Any, total_steps: int, batch_size: int, method: str = ""
) -> tuple[optax.GradientTransformation, dict[str, Schedule]]:
    """Returns the optax chain and its schedules ({'lr', 'wd'}) for logging.

    The chain follows the reference code of ``method`` ('dino' or 'mae'):

    1. clipping, if ``optim.clip_norm`` > 0: ``optim.clip_mode='reference'`` clips each
       gradient tensor separately for DINO (``utils.clip_gradients``) and the global norm for
       MAE (``clip_grad_norm_`` in ``util/misc.py``); 'per_tensor' and 'global' force one.
    2. Adam moments (``scale_by_adam``). Parameters matching ``optim.freeze_patterns`` get their
       own Adam state, held unchanged (moments and count) for the first ``optim.freeze_steps``
       steps, as PyTorch's AdamW skips a parameter whose gradient DINO set to None.
    3. decoupled weight decay on the wd schedule of the global step, masked by
       :func:`decay_mask` (with ``optim.weight_decay_exclude``).
    4. the learning-rate schedule of the global step (DINO sets every group's lr and wd from
       the global iteration, frozen or not).
    5. during the freeze, a gate zeroing the frozen parameters' updates (so no decay either).

    Without frozen parameters 2-4 are exactly ``optax.adamw(lr, b1, b2, weight_decay=wd,
    mask=...)`` (same state tree). ``method`` is only needed for ``clip_mode='reference'``
    with clipping on.
    """
    lr = lr_schedule(optim_cfg, total_steps, batch_size)
    wd = wd_schedule(optim_cfg, total_steps)
    exclude = tuple(optim_cfg.get("weight_decay_exclude", ()))
    _clip_mode_name(optim_cfg)  # a misspelt mode is an error even with clipping off
    parts = []
    if optim_cfg.clip_norm:
        mode = resolve_clip_mode(optim_cfg, method)
        clip = float(optim_cfg.clip_norm)
        parts.append(clip_per_tensor(clip) if mode == "per_tensor" else optax.clip_by_global_norm(clip))

    adam = optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2)
    freeze_steps = int(optim_cfg.freeze_steps or 0)
    patterns = tuple(optim_cfg.freeze_patterns or ())
    freezing = freeze_steps > 0 and bool(patterns)
    if freezing:
        frozen_adam = hold_until(optax.scale_by_adam(b1=optim_cfg.b1, b2=optim_cfg.b2), freeze_steps)
        adam = optax.multi_transform({"frozen": frozen_adam, "rest": adam}, _freeze_labels(patterns))
    # Nested like optax.adamw's own chain, so the state tree is the same as before.
    parts.append(
        optax.chain(adam, optax.add_decayed_weights(wd, lambda p: decay_mask(p, exclude)), optax.scale_by_learning_rate(lr))
    )
    if freezing:
        parts.append(freeze_until(freeze_steps, patterns))
    return optax.chain(*parts), {"lr": lr, "wd": wd}
