"""DINO (Caron et al., 2021): self-distillation with no labels.

A student ViT + projection head is trained to match, on every crop, the
sharpened and centred output distribution of a teacher (same architecture, an
EMA of the student) computed on the two global crops. Follows the PyTorch
original (facebookresearch/dino): ``DINOHead`` with an L2-normalised
bottleneck and a weight-normalised last layer, ``DINOLoss`` over all
(teacher global view, student view) pairs of different views, the centre as
an EMA of the teacher's batch-mean output, a linear teacher-temperature
warm-up and a cosine teacher-momentum schedule to 1.0.

Batches come from the ``multicrop`` recipe: ``{'global': (B, 2, G, G, 3),
'local': (B, n, L, L, 3)}`` ('local' absent when there are no local crops).
Crops are kept sample-major (batch axis first) through the backbone so the
batch axis stays the sharded one; they are moved to crop-major only for the
loss.
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from ssl_ad.models.vit import ViT, pool_tokens, reference_trunc_normal, vit_from_config
from ssl_ad.train.optim import cosine_schedule

# DINOHead._init_weights (facebookresearch/dino vision_transformer.py): trunc_normal_(std=.02) with
# absolute bounds +-2, i.e. N(0, 0.02^2); bias 0.
_TRUNC = reference_trunc_normal(0.02)
# ssl_ad's older head init (init_style='xavier_legacy'): flax's truncated_normal(0.02), std 0.0176.
_TRUNC_LEGACY = nn.initializers.truncated_normal(0.02)
# PyTorch's nn.Linear default (kaiming_uniform, a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
_TORCH_LINEAR = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


class WeightNormDense(nn.Module):
    """Bias-free Dense with weight normalisation: kernel = g * v / ||v|| per output column.

    With ``learn_scale=False`` (DINO's ``norm_last_layer=True``) g is fixed at 1 and has no
    parameter, so every output is the cosine between the input and a column direction.
    """

    features: int
    learn_scale: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        v = self.param("kernel", _TORCH_LINEAR, (x.shape[-1], self.features))
        w = v / jnp.maximum(jnp.linalg.norm(v, axis=0, keepdims=True), 1e-12)
        if self.learn_scale:
            w = w * self.param("scale", nn.initializers.ones, (self.features,))
        return jnp.dot(x, w.astype(x.dtype))


class DINOHead(nn.Module):
    """MLP (``num_layers`` Dense, GELU) -> L2-normalised bottleneck -> weight-normalised last layer.

    The last layer's parameters live under ``last_layer`` so ``optim.freeze_patterns=('last_layer',)``
    freezes them (DINO freezes it during the first epoch). Initialised as DINO's ``DINOHead``
    (``vision_transformer.py``): MLP Linear trunc_normal(std=.02) (N(0, 0.02^2)), bias 0; the
    last layer ``weight_norm(nn.Linear(bias=False))`` keeps PyTorch's Linear default for v
    (U(+-1/sqrt(bottleneck_dim))) and g = 1. ``init_style='xavier_legacy'`` keeps ssl_ad's older
    MLP init (flax truncated_normal(0.02), std 0.0176). The MLP runs in ``dtype``; the
    normalisation and the last layer run in float32 (logits are cosines divided by temperatures
    as small as 0.04, so bfloat16 rounding would be amplified 25x).
    """

    out_dim: int
    hidden_dim: int = 2048
    bottleneck_dim: int = 256
    num_layers: int = 3
    norm_last_layer: bool = True
    dtype: Any = jnp.float32
    init_style: str = "dino"  # 'dino' or 'xavier_legacy'

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        n = max(int(self.num_layers), 1)
        kernel_init = _TRUNC_LEGACY if self.init_style == "xavier_legacy" else _TRUNC
        dense = lambda f, name: nn.Dense(f, dtype=self.dtype, kernel_init=kernel_init, name=name)  # noqa: E731
        x = x.astype(self.dtype)
        for i in range(n - 1):
            x = nn.gelu(dense(self.hidden_dim, f"mlp{i}")(x), approximate=False)
        x = dense(self.bottleneck_dim, f"mlp{n - 1}")(x).astype(jnp.float32)
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)  # F.normalize
        return WeightNormDense(self.out_dim, learn_scale=not self.norm_last_layer, name="last_layer")(x)


def _stack_views(logits: Sequence[jax.Array] | jax.Array) -> jax.Array:
    """A list of (B, K) per-view logits, or an already stacked (V, B, K) array -> (V, B, K)."""
    if isinstance(logits, (list, tuple)):
        return jnp.stack([jnp.asarray(x) for x in logits])
    return jnp.asarray(logits)


def teacher_probs(teacher_logits: jax.Array, center: jax.Array, teacher_temp) -> jax.Array:
    """softmax((t - center) / teacher_temp), without gradient."""
    return jax.lax.stop_gradient(jax.nn.softmax((teacher_logits - center) / teacher_temp, axis=-1))


def dino_loss(student_logits_list, teacher_logits_global, center, student_temp, teacher_temp) -> jax.Array:
    """DINOLoss of the PyTorch original.

    Args:
      student_logits_list: V views of (B, K) student logits (globals first), a list or a (V, B, K) array.
      teacher_logits_global: the 2 global views of (B, K) teacher logits, a list or a (2, B, K) array.
      center: (K,) centre subtracted from the teacher logits.
      student_temp, teacher_temp: temperatures (teacher_temp may be a traced scalar).

    Returns the cross-entropy -sum_k p_t log p_s, averaged over the batch and then over all
    (teacher view iq, student view v) pairs with v != iq.
    """
    s = _stack_views(student_logits_list).astype(jnp.float32)
    t = _stack_views(teacher_logits_global).astype(jnp.float32)
    n_teacher, n_student = t.shape[0], s.shape[0]
    log_q = jax.nn.log_softmax(s / student_temp, axis=-1)
    p = teacher_probs(t, center, teacher_temp)
    # ce[iq, v] = mean_b sum_k -p[iq, b, k] log_q[v, b, k]; HIGHEST keeps the f32 sum exact on TPU/GPU.
    ce = -jnp.einsum("qbk,vbk->qv", p, log_q, precision=jax.lax.Precision.HIGHEST) / s.shape[1]
    mask = 1.0 - jnp.eye(n_teacher, n_student, dtype=ce.dtype)  # drop the same-view pairs
    return (ce * mask).sum() / mask.sum()


def update_center(center: jax.Array, teacher_logits_global, momentum: float) -> jax.Array:
    """center <- m * center + (1 - m) * mean of the teacher's logits over all global crops of the batch.

    Inside ``jit`` the batch is a global array sharded over every device (and host), so this
    mean is already the mean over the whole global batch: it plays the role of DINO's
    ``dist.all_reduce`` with no explicit collective.
    """
    t = _stack_views(teacher_logits_global)
    batch_center = t.reshape(-1, t.shape[-1]).mean(axis=0)
    return center * momentum + batch_center * (1.0 - momentum)


def teacher_temp_schedule(warmup_temp: float, temp: float, warmup_steps: int):
    """Linear from ``warmup_temp`` at step 0 to ``temp`` at ``warmup_steps``, then constant."""
    if warmup_steps <= 0 or warmup_temp == temp:
        return optax.constant_schedule(float(temp))
    return optax.linear_schedule(float(warmup_temp), float(temp), int(warmup_steps))


def distribution_stats(p: jax.Array) -> dict[str, jax.Array]:
    """Collapse signals of (..., K) probabilities.

    teacher_entropy: mean per-sample entropy (-> log K under collapse to the uniform distribution);
    teacher_mean_entropy: entropy of the batch-mean distribution (-> 0 when one dimension dominates);
    kl_mean_teacher: KL(mean p || uniform) = log K - H(mean p) (-> log K when one dimension dominates).
    """
    k = p.shape[-1]
    flat = p.reshape(-1, k)
    per_sample = jax.scipy.special.entr(flat).sum(-1).mean()
    mean_entropy = jax.scipy.special.entr(flat.mean(0)).sum()
    return {
        "teacher_entropy": per_sample,
        "teacher_mean_entropy": mean_entropy,
        "kl_mean_teacher": jnp.log(float(k)) - mean_entropy,
    }


class DINO:
    """DINO as the training loop sees it.

    params = {'backbone', 'head'} (the student); extra = {'teacher': same tree, 'center': (out_dim,)}.
    The backbone is built with ``method='dino'``: under ``model.init='reference'`` it is initialised
    by DINO's rule (``ssl_ad.models.vit.initializers('dino')``); the head follows DINO's
    ``DINOHead`` unless ``model.init='xavier_legacy'``.
    """

    def __init__(self, config: Any):
        self.student: ViT = vit_from_config(config.model, method="dino")
        self.teacher: ViT = vit_from_config(config.model, method="dino", drop_path_rate=0.0)
        d = config.dino
        self.pooling = str(d.get("pooling", "cls"))
        if self.pooling not in ("cls", "mean"):
            raise ValueError(f"dino.pooling must be 'cls' or 'mean', got {self.pooling!r}")
        self.head = DINOHead(
            out_dim=int(d.out_dim),
            hidden_dim=int(d.hidden_dim),
            bottleneck_dim=int(d.bottleneck_dim),
            num_layers=int(d.num_layers),
            norm_last_layer=bool(d.norm_last_layer),
            dtype=self.student.dtype,
            init_style="xavier_legacy" if self.student.init_style == "xavier_legacy" else "dino",
        )
        self.out_dim = int(d.out_dim)
        self.student_temp = float(d.student_temp)
        self.center_momentum = float(d.center_momentum)
        self.teacher_temp = teacher_temp_schedule(
            float(d.warmup_teacher_temp), float(d.teacher_temp), int(d.warmup_teacher_temp_steps)
        )
        self.momentum = cosine_schedule(float(d.momentum_teacher), 1.0, int(config.total_steps))

    # -- forward ---------------------------------------------------------------
    def _pooled(self, model: ViT, backbone, crops: jax.Array, train: bool, rng: jax.Array | None) -> jax.Array:
        """(B, V, S, S, 3) crops -> (B, V, D) pooled backbone features (one ViT call per size)."""
        b, v = crops.shape[:2]
        rngs = {"dropout": rng} if rng is not None else None
        tokens = model.apply({"params": backbone}, crops.reshape((b * v,) + crops.shape[2:]), train=train, rngs=rngs)
        return pool_tokens(tokens, self.pooling, model.use_cls).reshape(b, v, -1)

    def student_logits(self, params, batch: dict[str, jax.Array], rng: jax.Array) -> jax.Array:
        """(V, B, K) logits of the student on the 2 global crops then the local crops (drop path on)."""
        g_rng, l_rng = jax.random.split(rng)
        feats = [self._pooled(self.student, params["backbone"], batch["global"], True, g_rng)]
        if "local" in batch and batch["local"].shape[1]:
            feats.append(self._pooled(self.student, params["backbone"], batch["local"], True, l_rng))
        logits = self.head.apply({"params": params["head"]}, jnp.concatenate(feats, axis=1))
        return jnp.swapaxes(logits, 0, 1)

    def teacher_logits(self, teacher, batch: dict[str, jax.Array]) -> jax.Array:
        """(2, B, K) logits of the teacher on the global crops only (no drop path, no gradient)."""
        teacher = jax.lax.stop_gradient(teacher)
        feats = self._pooled(self.teacher, teacher["backbone"], batch["global"], False, None)
        return jax.lax.stop_gradient(jnp.swapaxes(self.head.apply({"params": teacher["head"]}, feats), 0, 1))

    # -- the Method interface -------------------------------------------------
    def init(self, rng: jax.Array, batch: dict[str, jax.Array]):
        images = jnp.asarray(batch["global"][:1, 0])
        b_rng, h_rng = jax.random.split(rng)
        backbone = self.student.init(b_rng, images)["params"]
        feats = pool_tokens(self.student.apply({"params": backbone}, images), self.pooling, self.student.use_cls)
        head = self.head.init(h_rng, feats)["params"]
        params = {"backbone": backbone, "head": head}
        # A real copy: the teacher must not share buffers with the (donated) student params.
        teacher = jax.tree_util.tree_map(lambda x: jnp.array(x, copy=True), params)
        return params, {"teacher": teacher, "center": jnp.zeros((self.out_dim,), jnp.float32)}

    def loss(self, params, extra, batch, rng, step):
        temp = self.teacher_temp(step)
        s = self.student_logits(params, batch, rng)
        t = self.teacher_logits(extra["teacher"], batch)
        loss = dino_loss(s, t, extra["center"], self.student_temp, temp)
        stats = distribution_stats(teacher_probs(t, extra["center"], temp))
        # Only the batch mean of the teacher's logits feeds the centre update (mean over the
        # global batch: see update_center).
        batch_mean = t.reshape(-1, t.shape[-1]).mean(axis=0)
        aux = {"metrics": {"loss": loss, **stats}, "teacher_batch_mean": batch_mean}
        return loss, aux

    def update_extra(self, extra, params, aux, step):
        m = self.momentum(step)
        teacher = optax.incremental_update(new_tensors=params, old_tensors=extra["teacher"], step_size=1.0 - m)
        center = update_center(extra["center"], aux["teacher_batch_mean"][None, None], self.center_momentum)
        return {"teacher": teacher, "center": center}

    def encoder_params(self, params, extra, which: str = "default"):
        if which in ("default", "teacher"):
            return extra["teacher"]["backbone"]
        if which == "student":
            return params["backbone"]
        raise ValueError(f"DINO encoders are 'teacher' (default) and 'student'; got which={which!r}")

    def schedules(self) -> dict[str, Any]:
        return {"teacher_temp": self.teacher_temp, "momentum": self.momentum}
