"""Masked autoencoder (He et al., 2022): masking, decoder, loss and reconstruction-error maps.

Masking follows the PyTorch original: per-sample uniform noise, argsort, keep
the first ``round(N * (1 - ratio))`` patches, ``ids_restore`` to unshuffle.
The loss is the MSE on masked patches only, optionally against per-patch
normalised pixels (``norm_pix_loss``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from ssl_ad.models.vit import Block, ViT, sincos_2d_posemb, vit_from_config


def patchify(images: jax.Array, patch: int) -> jax.Array:
    """(B, H, W, C) -> (B, N, patch*patch*C), patches in row-major order."""
    b, h, w, c = images.shape
    gh, gw = h // patch, w // patch
    x = images.reshape(b, gh, patch, gw, patch, c).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, gh * gw, patch * patch * c)


def unpatchify(patches: jax.Array, patch: int, channels: int = 3) -> jax.Array:
    """Inverse of :func:`patchify` for square images."""
    b, n, _ = patches.shape
    g = int(round(n**0.5))
    x = patches.reshape(b, g, g, patch, patch, channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(b, g * patch, g * patch, channels)


def num_visible(num_patches: int, mask_ratio: float) -> int:
    """Patches the encoder sees: round(N * (1 - ratio)), at least one."""
    return max(1, int(round(num_patches * (1.0 - mask_ratio))))


def inverse_permutation(perm: jax.Array) -> jax.Array:
    """(B, N) int permutations of 0..N-1 per row -> their inverses: ``inv[b, perm[b, j]] = j``.

    One scatter instead of the reference's second ``argsort`` (``ids_restore =
    argsort(ids_shuffle)``): the same integers, without a sort.
    """
    rows = jnp.arange(perm.shape[0])[:, None]
    cols = jnp.broadcast_to(jnp.arange(perm.shape[1], dtype=perm.dtype), perm.shape)
    return jnp.zeros_like(perm).at[rows, perm].set(cols, unique_indices=True)


@jax.custom_vjp
def permute_tokens(x: jax.Array, perm: jax.Array, inverse: jax.Array) -> jax.Array:
    """``out[b, j] = x[b, perm[b, j]]`` for (B, N, D) tokens and (B, N) per-row permutations.

    ``jnp.take_along_axis(x, perm[..., None], axis=1)`` with the gradient taken as a gather by the
    ``inverse`` permutation instead of a scatter-add into zeros: the same values (every input
    token receives exactly one output's cotangent), without the zero-filled buffer and the
    serial scatter of XLA:CPU. ``inverse`` must be :func:`inverse_permutation` of ``perm``.
    """
    return jnp.take_along_axis(x, perm[..., None], axis=1)


def _permute_tokens_fwd(x, perm, inverse):
    return permute_tokens(x, perm, inverse), (perm, inverse)


def _permute_tokens_bwd(res, g):
    perm, inverse = res
    return jnp.take_along_axis(g, inverse[..., None], axis=1), None, None


permute_tokens.defvjp(_permute_tokens_fwd, _permute_tokens_bwd)


def random_masking(rng: jax.Array, batch: int, num_patches: int, mask_ratio: float):
    """Per-sample random masking by noise + argsort (models_mae.py ``random_masking``).

    The same noise, sort and outputs as the reference; ``ids_restore`` is computed as the inverse
    permutation of ``ids_shuffle`` (:func:`inverse_permutation`, equal to its argsort) and the
    mask as ``ids_restore >= n_keep`` (equal to gathering [0]*n_keep + [1]*(N - n_keep) by it).

    Returns:
      keep_idx: (B, n_keep) indices of visible patches.
      mask: (B, N) float32, 1 where masked, 0 where visible, in the original order.
      ids_restore: (B, N) positions that unshuffle [visible, masked] back to patch order.
    """
    n_keep = num_visible(num_patches, mask_ratio)
    noise = jax.random.uniform(rng, (batch, num_patches))
    ids_shuffle = jnp.argsort(noise, axis=1)
    ids_restore = inverse_permutation(ids_shuffle)
    keep_idx = ids_shuffle[:, :n_keep]
    mask = (ids_restore >= n_keep).astype(jnp.float32)
    return keep_idx, mask, ids_restore


def patch_targets(images: jax.Array, patch: int, norm_pix_loss: bool) -> jax.Array:
    """Per-patch regression targets; normalised per patch (mean 0, var 1) when norm_pix_loss."""
    target = patchify(images, patch)
    if norm_pix_loss:
        mean = target.mean(axis=-1, keepdims=True)
        var = target.var(axis=-1, keepdims=True, ddof=1)
        target = (target - mean) / jnp.sqrt(var + 1e-6)
    return target


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean over masked patches of the per-patch mean squared error."""
    per_patch = ((pred - target) ** 2).mean(axis=-1)
    return (per_patch * mask).sum() / jnp.maximum(mask.sum(), 1.0)


class MAEDecoder(nn.Module):
    """Light transformer decoder: mask tokens + fixed sincos position embeddings + pixel head.

    Initialised as facebookresearch/mae ``models_mae.py`` ``initialize_weights``/``_init_weights``:
    Linear (``embed``, blocks, ``pred``) xavier_uniform with zero bias, LayerNorm 1/0,
    ``mask_token`` normal(0.02); ``decoder_pos_embed`` is the fixed sine-cosine table whose CLS
    row is zero (``get_2d_sincos_pos_embed(..., cls_token=True)``), so the CLS token gets no
    position added. (ssl_ad's older single rule gave the decoder exactly these values too.)
    """

    num_patches: int
    patch_size: int
    width: int = 128
    depth: int = 2
    num_heads: int = 4
    mlp_ratio: float = 4.0
    channels: int = 3
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, tokens: jax.Array, ids_restore: jax.Array, has_cls: bool) -> jax.Array:
        x = nn.Dense(self.width, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(), name="embed")(tokens)
        cls, vis = (x[:, :1], x[:, 1:]) if has_cls else (None, x)
        b, n_vis, _ = vis.shape
        mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.width))
        full = jnp.concatenate(
            [vis, jnp.broadcast_to(mask_token, (b, self.num_patches - n_vis, self.width)).astype(vis.dtype)], axis=1
        )
        full = permute_tokens(full, ids_restore, inverse_permutation(ids_restore))  # the unshuffle
        grid = int(round(self.num_patches**0.5))
        full = full + jnp.asarray(sincos_2d_posemb(grid, self.width))[None].astype(full.dtype)
        if cls is not None:
            full = jnp.concatenate([cls, full], axis=1)
        for i in range(self.depth):
            full = Block(self.num_heads, self.mlp_ratio, dtype=self.dtype, init_style="mae", name=f"block{i}")(full)
        full = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")(full)
        pred = nn.Dense(
            self.patch_size**2 * self.channels, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(), name="pred"
        )(full)
        pred = pred[:, 1:] if cls is not None else pred
        return pred.astype(jnp.float32)


class MAE:
    """MAE as the training loop sees it: params = {'encoder', 'decoder'}, no extra state.

    The encoder is built with ``method='mae'``: under ``model.init='reference'`` it is initialised
    by MAE's rule (``ssl_ad.models.vit.initializers('mae')``), and ``model.cls_pos='reference'``
    with MAE's ``posemb='sincos'`` gives the CLS token MAE's fixed zero position (no ``cls_pos``).
    """

    def __init__(self, config: Any):
        self.encoder: ViT = vit_from_config(config.model, method="mae")
        mae = config.mae
        self.mask_ratio = float(mae.mask_ratio)
        self.norm_pix_loss = bool(mae.norm_pix_loss)
        self.decoder = MAEDecoder(
            num_patches=self.encoder.num_patches,
            patch_size=self.encoder.patch_size,
            width=mae.decoder_width,
            depth=mae.decoder_depth,
            num_heads=mae.decoder_heads,
            dtype=self.encoder.dtype,
        )

    # -- the Method interface -------------------------------------------------
    def init(self, rng: jax.Array, batch: dict[str, jax.Array]):
        images = batch["image"][:1]
        enc_rng, dec_rng, mask_rng = jax.random.split(rng, 3)
        enc = self.encoder.init(enc_rng, images)["params"]
        keep_idx, _, ids_restore = random_masking(mask_rng, 1, self.encoder.num_patches, self.mask_ratio)
        tokens = self.encoder.apply({"params": enc}, images, keep_idx=keep_idx)
        dec = self.decoder.init(dec_rng, tokens, ids_restore, self.encoder.use_cls)["params"]
        return {"encoder": enc, "decoder": dec}, {}

    def forward(self, params, images: jax.Array, rng: jax.Array, train: bool = False):
        """Encodes visible patches, decodes all; returns (pred patches, mask)."""
        mask_rng, drop_rng = jax.random.split(rng)
        keep_idx, mask, ids_restore = random_masking(
            mask_rng, images.shape[0], self.encoder.num_patches, self.mask_ratio
        )
        tokens = self.encoder.apply(
            {"params": params["encoder"]}, images, train=train, keep_idx=keep_idx, rngs={"dropout": drop_rng}
        )
        pred = self.decoder.apply({"params": params["decoder"]}, tokens, ids_restore, self.encoder.use_cls)
        return pred, mask

    def loss(self, params, extra, batch, rng, step):
        del extra, step
        images = batch["image"]
        pred, mask = self.forward(params, images, rng, train=True)
        target = patch_targets(images, self.encoder.patch_size, self.norm_pix_loss)
        loss = masked_mse(pred, target, mask)
        return loss, {"metrics": {"loss": loss}}

    def update_extra(self, extra, params, aux, step):
        del params, aux, step
        return extra

    def encoder_params(self, params, extra, which: str = "default"):
        del extra
        if which not in ("default", "student"):
            raise ValueError(f"MAE has a single encoder; got which={which!r}")
        return params["encoder"]

    def schedules(self) -> dict[str, Any]:
        return {}

    # -- reconstruction, for figures and anomaly scoring ------------------------
    def reconstruct(self, params, images: jax.Array, rng: jax.Array) -> dict[str, jax.Array]:
        """One random mask: masked input, reconstruction (visible patches pasted back) and error map.

        With norm_pix_loss the prediction is de-normalised with each patch's true mean/std, as the
        MAE authors do for visualisation. ``error`` is per-patch MSE (B, grid, grid) in the
        training target space, defined on masked patches (0 on visible ones).
        """
        p = self.encoder.patch_size
        pred, mask = self.forward(params, images, rng)
        target = patch_targets(images, p, self.norm_pix_loss)
        error = ((pred - target) ** 2).mean(-1) * mask
        pixels = patchify(images, p)
        if self.norm_pix_loss:
            mean = pixels.mean(-1, keepdims=True)
            std = jnp.sqrt(pixels.var(-1, keepdims=True, ddof=1) + 1e-6)
            pred = pred * std + mean
        m = mask[..., None]
        grid = self.encoder.grid
        return {
            "masked": unpatchify(pixels * (1 - m), p),
            "reconstruction": unpatchify(pred * m + pixels * (1 - m), p),
            "original": images,
            "error": error.reshape(-1, grid, grid),
            "mask": mask.reshape(-1, grid, grid),
        }

    def reconstruction_error(self, params, images: jax.Array, rng: jax.Array, num_masks: int) -> jax.Array:
        """Per-patch error (B, grid, grid) averaged over ``num_masks`` random masks, each patch
        over the masks that hid it (a patch never hidden gets the image's mean error)."""
        def one(key):
            pred, mask = self.forward(params, images, key)
            target = patch_targets(images, self.encoder.patch_size, self.norm_pix_loss)
            return ((pred - target) ** 2).mean(-1) * mask, mask

        errs, masks = jax.lax.map(one, jax.random.split(rng, num_masks))
        total, count = errs.sum(0), masks.sum(0)
        per_patch = total / jnp.maximum(count, 1.0)
        image_mean = total.sum(-1, keepdims=True) / jnp.maximum(count.sum(-1, keepdims=True), 1.0)
        per_patch = jnp.where(count > 0, per_patch, image_mean)
        grid = self.encoder.grid
        return per_patch.reshape(-1, grid, grid)

