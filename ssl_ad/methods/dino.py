"""DINO (Caron et al., 2021): self-distillation with no labels.

A student ViT + projection head is trained to match, on every crop, the
sharpened and centred output distribution of a teacher (same architecture, an
EMA of the student) computed on the two global crops. Follows the PyTorch
original (facebookresearch/dino): ``DINOHead`` with an L2-normalised
bottleneck and a weight-normalised last layer, ``DINOLoss`` over all
(teacher global view, student view) pairs of different views, the centre as
an EMA of the teacher's batch-mean output, a linear teacher-temperature
warm-up and a cosine teacher-momentum schedule to 1.0.

Recipe options from DINO's successors, each behind a ``dino.*`` key and OFF by default (then
the computation is DINO's, bit for bit):

* KoLeo regulariser (``koleo_loss_weight``; DINOv2 0.1): :func:`koleo_loss`;
* Sinkhorn-Knopp teacher targets instead of the EMA centre (``centering='sinkhorn_knopp'``,
  ``sinkhorn_iterations``; DINOv2, SwAV): :func:`sinkhorn_knopp`;
* iBOT masked-patch self-distillation (``ibot_loss_weight``; iBOT lambda2 = 1.0):
  :func:`random_patch_masks`, :func:`ibot_patch_loss`, a ``mask_token`` in the student ViT and a
  patch centre ``center2``.

Batches come from the ``multicrop`` recipe: ``{'global': (B, 2, G, G, 3),
'local': (B, n, L, L, 3)}`` ('local' absent when there are no local crops).
Crops are kept sample-major (batch axis first) through the backbone so the
batch axis stays the sharded one; they are moved to crop-major only for the
loss.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import optax
from flax import linen as nn

from ssl_ad.models.vit import ViT, pool_tokens, reference_trunc_normal, vit_from_config
from ssl_ad.schedules import cosine_schedule

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
    t = _stack_views(teacher_logits_global).astype(jnp.float32)
    return dino_loss_from_probs(student_logits_list, teacher_probs(t, center, teacher_temp), student_temp)


def dino_loss_from_probs(student_logits_list, teacher_probs_global, student_temp) -> jax.Array:
    """:func:`dino_loss` with the teacher's targets given as probabilities.

    Args:
      student_logits_list: V views of (B, K) student logits (globals first), a list or a (V, B, K) array.
      teacher_probs_global: (2, B, K) teacher target distributions (centred softmax or Sinkhorn-Knopp).
      student_temp: the student temperature.

    Returns the scalar cross-entropy averaged over the batch and the (iq, v != iq) view pairs.
    """
    s = _stack_views(student_logits_list).astype(jnp.float32)
    p = jax.lax.stop_gradient(_stack_views(teacher_probs_global))
    n_teacher, n_student = p.shape[0], s.shape[0]
    log_q = jax.nn.log_softmax(s / student_temp, axis=-1)
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


CENTERINGS = ("centering", "sinkhorn_knopp")
IBOT_MASK_SHAPES = ("rand",)
_MASK_RNG_TAG = 0x1B07  # fold_in tag: the iBOT masks' key, apart from the drop-path keys


def koleo_loss(x: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Kozachenko-Leonenko entropy regulariser (Sablayrolles et al., 2019, "Spreading vectors for
    similarity search"), as DINOv2's ``KoLeoLoss`` (facebookresearch/dinov2 ``dinov2/loss/koleo_loss.py``).

    Args:
      x: (B, D) features of one crop per image (any float dtype; computed in float32).
      eps: DINOv2's 1e-8, used three times as there: ``F.normalize(eps=eps)`` (x / max(||x||, eps)),
        ``nn.PairwiseDistance(eps=eps)`` (||x_i - x_nn(i) + eps||) and log(d + eps).

    Returns the scalar -mean_i log(d_i + eps), d_i the Euclidean distance of the L2-normalised x_i to
    its nearest other sample (found by the largest inner product, the diagonal set to -1). The
    neighbour index carries no gradient; the distance does, through both x_i and its neighbour.
    Inside ``jit`` the batch axis is the global batch (sharded over devices), so the neighbours are
    searched over the whole batch, as DINOv2 does per GPU only.
    """
    x = x.astype(jnp.float32)
    x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), eps)
    dots = jnp.matmul(x, x.T, precision=jax.lax.Precision.HIGHEST)
    n = x.shape[0]
    dots = jnp.where(jnp.eye(n, dtype=bool), -1.0, dots)
    neighbour = jnp.argmax(dots, axis=1)
    d = jnp.linalg.norm(x - x[neighbour] + eps, axis=-1)
    return -jnp.mean(jnp.log(d + eps))


def sinkhorn_knopp(
    teacher_logits: jax.Array, teacher_temp, n_iterations: int = 3, weights: jax.Array | None = None
) -> jax.Array:
    """Sinkhorn-Knopp teacher targets (SwAV; DINOv2 ``DINOLoss.sinkhorn_knopp_teacher`` and
    ``iBOTPatchLoss.sinkhorn_knopp_teacher``, facebookresearch/dinov2 ``dinov2/loss/``).

    Args:
      teacher_logits: (M, K) teacher logits, M samples over the whole (global) batch.
      teacher_temp: the teacher temperature (may be traced).
      n_iterations: alternations of the prototype and the sample normalisation (DINOv2: 3).
      weights: optional (M,) 0/1 weights; samples of weight 0 are left out (their rows come back
        zero) and B counts the others, as DINOv2's patch version runs on the masked patches only.

    Returns (M, K) float32 assignments, without gradient: Q = exp(t / T) (K x B), normalised to
    total 1, then n_iterations times: each prototype row to 1/K, each sample column to 1/B; times B,
    so each sample's row sums to 1 (and each prototype's total tends to B/K). exp is taken after
    subtracting the largest logit, which cancels in the first normalisation (no overflow).
    """
    t = teacher_logits.astype(jnp.float32) / teacher_temp
    k = t.shape[-1]
    if weights is None:
        q = jnp.exp(t - t.max())
        b = float(t.shape[0])
    else:
        keep = (weights > 0)[:, None]
        q = jnp.where(keep, jnp.exp(t - jnp.where(keep, t, -jnp.inf).max()), 0.0)
        b = jnp.sum(weights > 0).astype(jnp.float32)
    safe = lambda s: jnp.where(s > 0, s, 1.0)  # noqa: E731  (a left-out sample, an underflown prototype)
    q = q / q.sum()
    for _ in range(int(n_iterations)):
        q = q / safe(q.sum(axis=0, keepdims=True))  # each prototype (a column here, a row of Q) ...
        q = q / k  # ... totals 1/K
        q = q / safe(q.sum(axis=1, keepdims=True))  # each sample ...
        q = q / b  # ... totals 1/B
    return jax.lax.stop_gradient(q * b)


def random_patch_masks(rng: jax.Array, shape: tuple[int, ...], num_patches: int, num_masked: int) -> jax.Array:
    """iBOT's ``pred_shape='rand'`` masks (bytedance/ibot ``loader.py`` ``ImageFolderMask``): exactly
    ``num_masked`` of ``num_patches`` patches, uniformly at random, independently per crop.

    Args:
      rng: a key; one key per crop is split from it (per sample, drawn inside the jitted step).
      shape: the leading shape, e.g. (B, 2) for the two global crops of B images.
      num_patches, num_masked: N and int(ratio * N) (iBOT: ``int(pred_ratio * H * W)``).

    Returns a bool array ``shape + (num_patches,)``, True = masked.
    """
    n = int(math.prod(shape))
    keys = jax.random.split(rng, n)
    ranks = jax.vmap(lambda key: jax.random.permutation(key, num_patches))(keys)
    return (ranks < num_masked).reshape(tuple(shape) + (num_patches,))


def ibot_patch_loss(student_patch_logits, teacher_patch_probs, masks, student_temp) -> jax.Array:
    """iBOT's masked-patch term (bytedance/ibot ``main_ibot.py`` ``iBOTLoss.forward``, the ``v == q``
    pairs; Zhou et al., 2022), before its weight lambda2.

    Args:
      student_patch_logits: (V, B, N, K) student head outputs of the patch tokens of the masked crops.
      teacher_patch_probs: (V, B, N, K) teacher targets of the same (unmasked) crops.
      masks: (V, B, N) bool, True = masked in the student's input.
      student_temp: the student temperature.

    Returns, per view, the cross-entropy -sum_k p_t log softmax(s / T_s) summed over the masked
    patches of each image and divided by their count (at least 1), averaged over images; then
    averaged over the V views.
    """
    s = jnp.asarray(student_patch_logits).astype(jnp.float32)
    p = jax.lax.stop_gradient(jnp.asarray(teacher_patch_probs).astype(jnp.float32))
    log_q = jax.nn.log_softmax(s / student_temp, axis=-1)
    ce = -jnp.sum(p * log_q, axis=-1)  # (V, B, N)
    m = jnp.asarray(masks).astype(jnp.float32)
    per_image = jnp.sum(ce * m, axis=-1) / jnp.maximum(jnp.sum(m, axis=-1), 1.0)
    return per_image.mean(axis=-1).mean()


class DINO:
    """DINO as the training loop sees it.

    params = {'backbone', 'head'} (the student); extra = {'teacher': same tree, 'center': (out_dim,)}.
    The backbone is built with ``method='dino'``: under ``model.init='reference'`` it is initialised
    by DINO's rule (``ssl_ad.models.vit.initializers('dino')``); the head follows DINO's
    ``DINOHead`` unless ``model.init='xavier_legacy'``.

    ``dino.pooling`` ('cls' | 'mean' | 'cls+mean', see ``pool_tokens``) is what the head sees; the
    evaluation's ``pooling`` key takes the same names.

    Options (config keys of ``dino_block``; a key a config lacks means off):

    * ``koleo_loss_weight`` w > 0: adds w * sum over the 2 global crops of :func:`koleo_loss` of the
      student's pooled backbone features of that crop (DINOv2 ``ssl_meta_arch.py``: the backbone's
      CLS token of each global crop, before the head; here what ``pooling`` gives the head).
      Metric ``koleo_loss``: the unweighted KoLeo, averaged over the 2 crops.
    * ``centering='sinkhorn_knopp'``: the teacher targets are :func:`sinkhorn_knopp` of the teacher
      logits of both global crops (all 2B together) at the teacher temperature, ``sinkhorn_iterations``
      iterations; no centre is subtracted, and, as in DINOv2, the centres are then not updated
      (they stay in ``extra``, frozen). The ``teacher_*`` entropy metrics describe these targets.
    * ``ibot_loss_weight`` w > 0 (iBOT, bytedance/ibot ``main_ibot.py``): the student's global crops
      get ``ibot_mask_ratio`` of their patches replaced by a learned ``mask_token`` (uniform random
      masks, iBOT's ``pred_shape='rand'``, drawn per crop inside the jitted loss from the step rng;
      the local crops and the teacher are unmasked); the CLS DINO loss uses the masked student crops,
      as in iBOT. The head is shared between the pooled features and the patch tokens (iBOT's ViT-S
      recipe ``--shared_head true``; the teacher's ``--shared_head_teacher`` default True), so the
      pooling must give features of the patch tokens' width (not 'cls+mean'). Adds w *
      :func:`ibot_patch_loss` with targets softmax((t_patch - center2) / T_patch) (or Sinkhorn-Knopp
      over the masked patches); T_patch warms up from ``ibot_warmup_teacher_temp`` to
      ``ibot_teacher_temp`` over ``warmup_teacher_temp_steps``; center2 (K,) is the EMA
      (``center_momentum``) of the teacher's patch logits averaged over all patches of each global
      crop, then over crops (``iBOTLoss.update_center``). Metric ``ibot_loss`` (unweighted);
      params get ``backbone/mask_token``, extra gets ``center2`` (the teacher's backbone carries an
      unused, EMA-updated copy of the mask token; :meth:`encoder_params` leaves it out).

    With any option on, the metric ``dino_loss`` is the CLS term alone and ``loss`` the total
    dino_loss + w_koleo * 2 * koleo_loss + w_ibot * ibot_loss.
    """

    def __init__(self, config: Any):
        d = config.dino
        self.koleo_weight = float(d.get("koleo_loss_weight", 0.0))
        self.centering = str(d.get("centering", "centering"))
        if self.centering not in CENTERINGS:
            raise ValueError(f"dino.centering must be one of {CENTERINGS}, got {self.centering!r}")
        self.sinkhorn_iterations = int(d.get("sinkhorn_iterations", 3))
        self.ibot_weight = float(d.get("ibot_loss_weight", 0.0))
        self.ibot = self.ibot_weight > 0
        self.ibot_mask_ratio = float(d.get("ibot_mask_ratio", 0.3))
        self.ibot_mask_shape = str(d.get("ibot_mask_shape", "rand"))
        if self.ibot and self.ibot_mask_shape not in IBOT_MASK_SHAPES:
            raise ValueError(f"dino.ibot_mask_shape must be one of {IBOT_MASK_SHAPES}, got {self.ibot_mask_shape!r}")
        mask_token = {"use_mask_token": True} if self.ibot else {}
        self.student: ViT = vit_from_config(config.model, method="dino", **mask_token)
        self.teacher: ViT = vit_from_config(config.model, method="dino", drop_path_rate=0.0, **mask_token)
        self.pooling = str(d.get("pooling", "cls"))
        if self.pooling not in ("cls", "mean", "cls+mean"):
            raise ValueError(f"dino.pooling must be 'cls', 'mean' or 'cls+mean', got {self.pooling!r}")
        if self.ibot and self.pooling == "cls+mean":
            raise ValueError("dino.ibot_loss_weight > 0 shares the head with the patch tokens, so dino.pooling "
                             "must give features of the patch width: 'cls' or 'mean', not 'cls+mean'")
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
        self.ibot_teacher_temp = teacher_temp_schedule(
            float(d.get("ibot_warmup_teacher_temp", 0.04)), float(d.get("ibot_teacher_temp", 0.07)),
            int(d.warmup_teacher_temp_steps),
        )
        self.momentum = cosine_schedule(float(d.momentum_teacher), 1.0, int(config.total_steps))

    @property
    def options_on(self) -> bool:
        """Whether any option beyond DINO changes the loss."""
        return self.koleo_weight > 0 or self.ibot or self.centering != "centering"

    # -- forward ---------------------------------------------------------------
    def _pooled(self, model: ViT, backbone, crops: jax.Array, train: bool, rng: jax.Array | None) -> jax.Array:
        """(B, V, S, S, 3) crops -> (B, V, D) pooled backbone features (one ViT call per size)."""
        b, v = crops.shape[:2]
        rngs = {"dropout": rng} if rng is not None else None
        tokens = model.apply({"params": backbone}, crops.reshape((b * v,) + crops.shape[2:]), train=train, rngs=rngs)
        return pool_tokens(tokens, self.pooling, model.use_cls).reshape(b, v, -1)

    def _pooled_and_patches(self, model: ViT, backbone, crops: jax.Array, train: bool, rng: jax.Array | None,
                            mask: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
        """(B, V, S, S, 3) crops [, (B, V, N) bool mask] -> (B, V, D) pooled features and (B, V, N, D)
        patch tokens (one ViT call)."""
        b, v = crops.shape[:2]
        rngs = {"dropout": rng} if rng is not None else None
        kwargs = {} if mask is None else {"mask": mask.reshape(b * v, -1)}
        tokens = model.apply(
            {"params": backbone}, crops.reshape((b * v,) + crops.shape[2:]), train=train, rngs=rngs, **kwargs
        )
        pooled = pool_tokens(tokens, self.pooling, model.use_cls).reshape(b, v, -1)
        patches = tokens[:, 1:] if model.use_cls else tokens
        return pooled, patches.reshape(b, v, -1, tokens.shape[-1])

    def num_masked(self, global_size: int) -> tuple[int, int]:
        """(N, n_masked) patches of a global crop of side ``global_size``: n_masked = int(ratio * N)."""
        n = (int(global_size) // self.student.patch_size) ** 2
        n_masked = int(self.ibot_mask_ratio * n)
        if n_masked < 1:
            raise ValueError(f"dino.ibot_mask_ratio={self.ibot_mask_ratio} masks no patch of the {n} of a global crop")
        return n, n_masked

    def ibot_masks(self, batch: dict[str, jax.Array], rng: jax.Array) -> jax.Array:
        """(B, 2, N) bool masks of the student's global crops, from ``rng`` (one key per crop)."""
        b, v, size = batch["global"].shape[:3]
        n, n_masked = self.num_masked(size)
        return random_patch_masks(jax.random.fold_in(rng, _MASK_RNG_TAG), (b, v), n, n_masked)

    def student_forward(self, params, batch: dict[str, jax.Array], rng: jax.Array,
                        masks: jax.Array | None = None) -> dict[str, jax.Array]:
        """The student on all crops (drop path on).

        Returns {'logits': (V, B, K) on the 2 global crops then the local crops, 'global_features':
        (B, 2, D) pooled backbone features of the global crops} and, with ``masks`` (B, 2, N) (the
        global crops' patches replaced by the mask token), 'patch_logits': (2, B, N, K) head outputs
        of the global crops' patch tokens.
        """
        g_rng, l_rng = jax.random.split(rng)
        patch_logits = None
        if masks is None:
            feats = [self._pooled(self.student, params["backbone"], batch["global"], True, g_rng)]
        else:
            pooled, patches = self._pooled_and_patches(self.student, params["backbone"], batch["global"], True,
                                                       g_rng, masks)
            feats = [pooled]
            patch_logits = jnp.swapaxes(self.head.apply({"params": params["head"]}, patches), 0, 1)
        if "local" in batch and batch["local"].shape[1]:
            feats.append(self._pooled(self.student, params["backbone"], batch["local"], True, l_rng))
        logits = self.head.apply({"params": params["head"]}, jnp.concatenate(feats, axis=1))
        out = {"logits": jnp.swapaxes(logits, 0, 1), "global_features": feats[0]}
        if patch_logits is not None:
            out["patch_logits"] = patch_logits
        return out

    def student_logits(self, params, batch: dict[str, jax.Array], rng: jax.Array) -> jax.Array:
        """(V, B, K) logits of the student on the 2 global crops then the local crops (drop path on)."""
        return self.student_forward(params, batch, rng)["logits"]

    def teacher_logits(self, teacher, batch: dict[str, jax.Array]) -> jax.Array:
        """(2, B, K) logits of the teacher on the global crops only (no drop path, no gradient)."""
        teacher = jax.lax.stop_gradient(teacher)
        feats = self._pooled(self.teacher, teacher["backbone"], batch["global"], False, None)
        return jax.lax.stop_gradient(jnp.swapaxes(self.head.apply({"params": teacher["head"]}, feats), 0, 1))

    def teacher_logits_and_patches(self, teacher, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
        """(2, B, K) logits and (2, B, N, K) patch-token logits of the teacher on the unmasked global
        crops (no drop path, no gradient; the head shared between both, iBOT's ``shared_head_teacher``)."""
        teacher = jax.lax.stop_gradient(teacher)
        feats, patches = self._pooled_and_patches(self.teacher, teacher["backbone"], batch["global"], False, None)
        logits = jnp.swapaxes(self.head.apply({"params": teacher["head"]}, feats), 0, 1)
        patch_logits = jnp.swapaxes(self.head.apply({"params": teacher["head"]}, patches), 0, 1)
        return jax.lax.stop_gradient(logits), jax.lax.stop_gradient(patch_logits)

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
        extra = {"teacher": teacher, "center": jnp.zeros((self.out_dim,), jnp.float32)}
        if self.ibot:
            extra["center2"] = jnp.zeros((self.out_dim,), jnp.float32)
        return params, extra

    def _teacher_targets(self, t: jax.Array, center: jax.Array, temp, weights: jax.Array | None = None) -> jax.Array:
        """(..., K) teacher logits -> targets: centred softmax, or Sinkhorn-Knopp over all leading axes."""
        if self.centering == "sinkhorn_knopp":
            flat_w = None if weights is None else weights.reshape(-1)
            return sinkhorn_knopp(t.reshape(-1, t.shape[-1]), temp, self.sinkhorn_iterations, flat_w).reshape(t.shape)
        return teacher_probs(t, center, temp)

    def loss(self, params, extra, batch, rng, step):
        temp = self.teacher_temp(step)
        if not self.options_on:  # DINO as published
            s = self.student_logits(params, batch, rng)
            t = self.teacher_logits(extra["teacher"], batch)
            loss = dino_loss(s, t, extra["center"], self.student_temp, temp)
            stats = distribution_stats(teacher_probs(t, extra["center"], temp))
            # Only the batch mean of the teacher's logits feeds the centre update (mean over the
            # global batch: see update_center).
            batch_mean = t.reshape(-1, t.shape[-1]).mean(axis=0)
            aux = {"metrics": {"loss": loss, **stats}, "teacher_batch_mean": batch_mean}
            return loss, aux

        masks = self.ibot_masks(batch, rng) if self.ibot else None
        s = self.student_forward(params, batch, rng, masks)
        if self.ibot:
            t, t_patch = self.teacher_logits_and_patches(extra["teacher"], batch)
        else:
            t = self.teacher_logits(extra["teacher"], batch)
        p = self._teacher_targets(t.astype(jnp.float32), extra["center"], temp)
        cls_loss = dino_loss_from_probs(s["logits"], p, self.student_temp)
        loss = cls_loss
        metrics = {"dino_loss": cls_loss, **distribution_stats(p)}
        aux = {"teacher_batch_mean": t.reshape(-1, t.shape[-1]).mean(axis=0)}
        if self.koleo_weight > 0:
            g = s["global_features"]  # (B, 2, D): per crop, never between the crops of one image
            per_crop = [koleo_loss(g[:, i]) for i in range(g.shape[1])]
            loss = loss + self.koleo_weight * sum(per_crop)
            metrics["koleo_loss"] = sum(per_crop) / len(per_crop)
        if self.ibot:
            masks_vb = jnp.swapaxes(masks, 0, 1)  # (2, B, N), as the logits
            p_patch = self._teacher_targets(t_patch.astype(jnp.float32), extra["center2"],
                                            self.ibot_teacher_temp(step), masks_vb)
            patch_loss = ibot_patch_loss(s["patch_logits"], p_patch, masks_vb, self.student_temp)
            loss = loss + self.ibot_weight * patch_loss
            metrics["ibot_loss"] = patch_loss
            # iBOTLoss.update_center: mean over each crop's patches, then over crops.
            aux["teacher_patch_batch_mean"] = t_patch.mean(axis=2).reshape(-1, t_patch.shape[-1]).mean(axis=0)
        aux["metrics"] = {"loss": loss, **metrics}
        return loss, aux

    def update_extra(self, extra, params, aux, step):
        m = self.momentum(step)
        teacher = optax.incremental_update(new_tensors=params, old_tensors=extra["teacher"], step_size=1.0 - m)
        if self.centering == "sinkhorn_knopp":  # DINOv2 updates no centre under Sinkhorn-Knopp
            center = extra["center"]
        else:
            center = update_center(extra["center"], aux["teacher_batch_mean"][None, None], self.center_momentum)
        out = {"teacher": teacher, "center": center}
        if self.ibot:
            if self.centering == "sinkhorn_knopp":
                out["center2"] = extra["center2"]
            else:
                out["center2"] = update_center(
                    extra["center2"], aux["teacher_patch_batch_mean"][None, None], self.center_momentum
                )
        return out

    def encoder_params(self, params, extra, which: str = "default"):
        """The backbone of a plain ViT (a ``mask_token`` of iBOT training left out)."""
        if which in ("default", "teacher"):
            backbone = extra["teacher"]["backbone"]
        elif which == "student":
            backbone = params["backbone"]
        else:
            raise ValueError(f"DINO encoders are 'teacher' (default) and 'student'; got which={which!r}")
        if "mask_token" in backbone:
            backbone = {k: v for k, v in backbone.items() if k != "mask_token"}
        return backbone

    def schedules(self) -> dict[str, Any]:
        out = {"teacher_temp": self.teacher_temp, "momentum": self.momentum}
        if self.ibot:
            out["ibot_teacher_temp"] = self.ibot_teacher_temp
        return out
