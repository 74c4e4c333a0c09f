"""Vision Transformer (pre-LN, as in DeiT/DINO/MAE) in Flax linen.

The model knows nothing about self-supervision or data: it maps images to
tokens. Callers that need a subset of patch tokens (MAE's visible patches)
pass their indices as ``keep_idx``; callers that feed crops of another size
(DINO's local crops) get position embeddings interpolated on the fly.

Three choices follow the PyTorch reference of the method that trains the model
(the method passes its name to :func:`vit_from_config`; this module never
imports a method):

* ``init_style`` (config ``model.init``): 'dino' (facebookresearch/dino
  ``vision_transformer.py``: ``VisionTransformer.__init__``/``_init_weights``),
  'mae' (facebookresearch/mae ``models_mae.py``: ``initialize_weights``/
  ``_init_weights``) or 'xavier_legacy' (ssl_ad's single rule before they were
  split, kept bit for bit). See :func:`initializers`.
* ``posemb_interpolation``: 'torch_bicubic' (DINO's ``interpolate_pos_encoding``,
  see :func:`torch_bicubic_matrix`) or 'antialiased' (``jax.image.resize``, the old rule).
* ``cls_pos``: 'learned' (DINO: the CLS row of its learned ``pos_embed``) or 'zero'
  (MAE: ``get_2d_sincos_pos_embed(..., cls_token=True)`` puts a fixed zero row first).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

# Usual sizes by name (model.variant, e.g. 'S/16'): PRESETS is the one table, (width, depth, heads),
# kept with decode_variant/apply_variant in the JAX-free ssl_ad.models.variants (configs are
# checked before JAX is loaded) and re-exported here.
from ssl_ad.models.variants import MLP_RATIO, PRESETS, apply_variant, decode_variant  # noqa: F401

INIT_STYLES = ("dino", "mae", "xavier_legacy")
POSEMB_INTERPOLATIONS = ("torch_bicubic", "antialiased")
CLS_POS_MODES = ("learned", "zero")

# The old rule's embedding init: flax's truncated_normal(0.02) truncates at +-2 *standard
# deviations*, so its std is 0.02 * 0.880 = 0.0176 (kept for init_style='xavier_legacy').
_INIT = nn.initializers.truncated_normal(0.02)
Initializer = Callable[..., jax.Array]


def reference_trunc_normal(std: float = 0.02, a: float = -2.0, b: float = 2.0) -> Initializer:
    """timm/DINO ``trunc_normal_(t, std=std)`` (dino ``utils.trunc_normal_``, defaults a=-2, b=2).

    The bounds are ABSOLUTE values, i.e. +-100 std for std=0.02, so the result is N(0, std^2)
    (std exactly 0.02, unlike ``nn.initializers.truncated_normal(0.02)`` whose bounds are +-2 std).
    Sampled as ``clip(std * normal, a, b)``: identical in distribution, without the inverse-CDF
    sampler's rare ``erfinv(-1) = -inf`` that lands exactly on a bound.
    """

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        return jnp.clip(std * jax.random.normal(key, shape, jnp.float32), a, b).astype(dtype)

    return init


def _conv_fan_in(shape: tuple[int, ...]) -> int:
    """fan_in of a flax conv kernel (p, p, C, D) as PyTorch counts it for (D, C, p, p): C * p * p."""
    return int(np.prod(shape[:-1]))


def torch_conv_default_kernel() -> Initializer:
    """PyTorch ``nn.Conv2d`` default weight init, ``kaiming_uniform_(a=sqrt(5))``: U(+-1/sqrt(C*p*p))."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        bound = 1.0 / math.sqrt(_conv_fan_in(shape))
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


def torch_conv_default_bias(fan_in: int) -> Initializer:
    """PyTorch ``nn.Conv2d`` default bias init: U(+-1/sqrt(fan_in)), fan_in = C * p * p of the kernel."""

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        bound = 1.0 / math.sqrt(fan_in)
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


def xavier_uniform_flattened_conv() -> Initializer:
    """MAE's patch embedding: ``xavier_uniform_(w.view([D, -1]))``, i.e. fan_in = C*p*p, fan_out = D.

    (flax's ``xavier_uniform`` on a (p, p, C, D) conv kernel multiplies both fans by the
    receptive field p*p: fan_out = p*p*D, a smaller bound.)
    """

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Any = jnp.float32) -> jax.Array:
        bound = math.sqrt(6.0 / (_conv_fan_in(shape) + shape[-1]))
        return jax.random.uniform(key, shape, jnp.float32, -bound, bound).astype(dtype)

    return init


def initializers(style: str, patch_fan_in: int = 1) -> dict[str, Initializer]:
    """Initialisers of one style: 'dense' (every Linear kernel; biases are always 0 and LayerNorm
    1/0 in all three styles), 'patch_kernel', 'patch_bias' and 'embed' (cls_token, learned
    pos_embed and learned cls_pos).

    * 'dino': facebookresearch/dino ``vision_transformer.py``. ``_init_weights``: Linear
      ``trunc_normal_(std=.02)``, bias 0; ``__init__``: ``trunc_normal_(pos_embed / cls_token,
      std=.02)``; ``PatchEmbed.proj`` is an ``nn.Conv2d`` left at PyTorch's default
      (weight and bias U(+-1/sqrt(C*p*p))).
    * 'mae': facebookresearch/mae ``models_mae.py``. ``_init_weights``: Linear
      ``xavier_uniform_`` (qkv as one (3D, D) matrix), bias 0; ``initialize_weights``:
      ``xavier_uniform_`` on the flattened (D, C*p*p) patch kernel, the conv bias at PyTorch's
      default, ``normal_(cls_token, std=.02)`` (the same for ``mask_token``), fixed sine-cosine
      positions (a learned pos_embed / cls_pos, not in MAE, also get normal(0.02)).
    * 'xavier_legacy': ssl_ad's rule before the split: xavier_uniform Linear and (receptive-field
      fans) patch kernel, zero patch bias, flax ``truncated_normal(0.02)`` (std 0.0176) embeddings.
    """
    if style == "dino":
        return {
            "dense": reference_trunc_normal(0.02),
            "patch_kernel": torch_conv_default_kernel(),
            "patch_bias": torch_conv_default_bias(patch_fan_in),
            "embed": reference_trunc_normal(0.02),
        }
    if style == "mae":
        return {
            "dense": nn.initializers.xavier_uniform(),
            "patch_kernel": xavier_uniform_flattened_conv(),
            "patch_bias": torch_conv_default_bias(patch_fan_in),
            "embed": nn.initializers.normal(0.02),
        }
    if style == "xavier_legacy":
        return {
            "dense": nn.initializers.xavier_uniform(),
            "patch_kernel": nn.initializers.xavier_uniform(),
            "patch_bias": nn.initializers.zeros,
            "embed": _INIT,
        }
    raise ValueError(f"init style must be one of {INIT_STYLES} (or 'reference' in a config), got {style!r}")


def resolve_init_style(init: str, method: str | None, posemb: str) -> str:
    """``model.init`` -> a style: 'reference' means the training method's own rule ('dino' or 'mae');
    without a method (e.g. a random-init baseline) the positional embedding says which reference the
    model follows ('sincos' is MAE's, 'learned' DINO's)."""
    if init == "reference":
        if method in ("dino", "mae"):
            return method
        return "mae" if posemb == "sincos" else "dino"
    if init not in INIT_STYLES:
        raise ValueError(f"model.init must be 'reference' or one of {INIT_STYLES}, got {init!r}")
    return init


def resolve_cls_pos(cls_pos: str, posemb: str) -> str:
    """``model.cls_pos`` -> 'learned' | 'zero'; 'reference': learned with learned positions (DINO),
    zero with the fixed sine-cosine table (MAE)."""
    if cls_pos == "reference":
        return "learned" if posemb == "learned" else "zero"
    if cls_pos not in CLS_POS_MODES:
        raise ValueError(f"model.cls_pos must be 'reference' or one of {CLS_POS_MODES}, got {cls_pos!r}")
    return cls_pos


def sincos_2d_posemb(grid: int, width: int) -> np.ndarray:
    """Fixed 2-D sine-cosine position embedding, shape (grid*grid, width) (MAE's choice).

    The patch rows of MAE's ``get_2d_sincos_pos_embed(width, grid, cls_token=True)``
    (``util/pos_embed.py``), whose extra first row (the CLS position) is zero.
    """
    if width % 4:
        raise ValueError(f"width must be divisible by 4 for sincos embeddings, got {width}")
    y, x = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width // 4))
    out_y = np.einsum("m,d->md", y.reshape(-1), omega)
    out_x = np.einsum("m,d->md", x.reshape(-1), omega)
    return np.concatenate([np.sin(out_x), np.cos(out_x), np.sin(out_y), np.cos(out_y)], axis=1).astype(np.float32)


def _cubic_weights(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    """PyTorch's ``get_cubic_upsample_coefficients`` (Keys kernel, A=-0.75): (..., 4) weights of the
    source samples at floor(x) - 1 .. floor(x) + 2 for the fractional part t."""

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    return np.stack([far(t + 1), near(t), near(1 - t), far(2 - t)], axis=-1)


def torch_bicubic_matrix(in_size: int, out_size: int, scale: float | None = None) -> np.ndarray:
    """(out_size, in_size) matrix of 1-D ``F.interpolate(mode='bicubic', align_corners=False)``
    without antialiasing.

    Output sample i reads the input at x = (i + 0.5) / scale - 0.5 (``scale`` = the
    ``scale_factor`` passed to F.interpolate, used as given for the coordinate mapping; default
    out_size / in_size), weights from the cubic convolution kernel with A = -0.75, and source
    indices clamped to [0, in_size - 1] at the border (PyTorch's ``upsample_bicubic2d``).
    Separable: the 2-D resize is this matrix applied along both axes.
    """
    scale = out_size / in_size if scale is None else float(scale)
    x = (np.arange(out_size, dtype=np.float64) + 0.5) / scale - 0.5
    x0 = np.floor(x)
    w = _cubic_weights(x - x0)
    idx = np.clip(x0[:, None].astype(np.int64) + np.arange(-1, 3)[None], 0, in_size - 1)
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.repeat(np.arange(out_size), 4), idx.reshape(-1)), w.reshape(-1))
    return m.astype(np.float32)


def resize_posemb(posemb: jax.Array, new_grid: int, method: str = "antialiased") -> jax.Array:
    """Resizes a (1, g*g, D) patch position embedding to (1, new_grid**2, D).

    method:
      'torch_bicubic': DINO's ``VisionTransformer.interpolate_pos_encoding``
        (facebookresearch/dino ``vision_transformer.py``): ``F.interpolate(mode='bicubic',
        scale_factor=((new_grid + 0.1) / g,) * 2)``, no antialiasing, as two static
        :func:`torch_bicubic_matrix` products (exact, built with NumPy at trace time).
      'antialiased': ``jax.image.resize(method='bicubic')`` (Keys A=-0.5, antialiased when
        shrinking, == ``F.interpolate(mode='bicubic', antialias=True)`` as timm's
        ``resample_abs_pos_embed`` uses it); ssl_ad's rule before 'torch_bicubic'.
    """
    n, dim = posemb.shape[1], posemb.shape[2]
    grid = int(round(n**0.5))
    if grid * grid != n:
        raise ValueError(f"position embedding of {n} tokens is not a square grid")
    if grid == new_grid:
        return posemb
    emb = posemb.reshape(1, grid, grid, dim)
    if method == "torch_bicubic":
        # DINO adds 0.1 to the target grid "to avoid floating point error"; the output size is
        # floor(g * (new_grid + 0.1) / g) = new_grid, the coordinate mapping uses the scale itself.
        m = jnp.asarray(torch_bicubic_matrix(grid, new_grid, (new_grid + 0.1) / grid))
        emb = jnp.einsum("ai,bj,zijd->zabd", m, m, emb.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)
        emb = emb.astype(posemb.dtype)
    elif method == "antialiased":
        emb = jax.image.resize(emb, (1, new_grid, new_grid, dim), method="bicubic")
    else:
        raise ValueError(f"posemb_interpolation must be one of {POSEMB_INTERPOLATIONS}, got {method!r}")
    return emb.reshape(1, new_grid * new_grid, dim)


def drop_path_rates(rate: float, depth: int) -> np.ndarray:
    """(depth,) float64 stochastic-depth rates of the blocks: linear from 0 to ``rate`` (DINO's and
    MAE's ``torch.linspace(0, drop_path_rate, depth)``). The one rule of both block layouts (the
    scanned one passes them as float32)."""
    return np.linspace(0.0, float(rate), int(depth)) if depth else np.zeros((0,))


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample.

    ``rate`` (a Python float) may be replaced per call by ``rate=`` (a traced scalar: the scanned
    blocks' per-layer rate); a static rate of 0 draws no random numbers.
    """

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool, rate: jax.Array | float | None = None) -> jax.Array:
        if rate is None:
            rate = self.rate
        if deterministic or (isinstance(rate, (int, float)) and rate == 0.0):
            return x
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        if isinstance(rate, (int, float)):
            keep = 1.0 - rate
            mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
            return x * mask.astype(x.dtype) / keep
        keep = 1.0 - jnp.asarray(rate, jnp.float32)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return x * mask.astype(x.dtype) / keep.astype(x.dtype)


class MlpBlock(nn.Module):
    hidden: int
    dtype: Any = jnp.float32
    init_style: str = "xavier_legacy"  # see initializers(); only the 'dense' rule is used here

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        dense_init = initializers(self.init_style)["dense"]
        x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=dense_init, name="fc1")(x)
        x = nn.gelu(x, approximate=False)
        return nn.Dense(dim, dtype=self.dtype, kernel_init=dense_init, name="fc2")(x)


class Attention(nn.Module):
    """Multi-head self-attention through ``jax.nn.dot_product_attention`` (fused where the backend has it)."""

    num_heads: int
    dtype: Any = jnp.float32
    init_style: str = "xavier_legacy"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, dim = x.shape
        if dim % self.num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {self.num_heads}")
        head = dim // self.num_heads
        dense_init = initializers(self.init_style)["dense"]
        # One (D, 3D) kernel, as the references' single qkv nn.Linear(D, 3D) (xavier fans D and 3D).
        qkv = nn.Dense(3 * dim, dtype=self.dtype, kernel_init=dense_init, name="qkv")(x)
        q, k, v = jnp.split(qkv.reshape(b, n, 3, self.num_heads, head), 3, axis=2)
        out = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])
        out = out.reshape(b, n, dim)
        return nn.Dense(dim, dtype=self.dtype, kernel_init=dense_init, name="proj")(out)


class Block(nn.Module):
    num_heads: int
    mlp_ratio: float
    drop_path: float = 0.0
    dtype: Any = jnp.float32
    init_style: str = "xavier_legacy"  # 'dino' | 'mae' | 'xavier_legacy' (see initializers)

    @nn.compact
    def __call__(
        self, x: jax.Array, deterministic: bool = True, drop_path_rate: jax.Array | float | None = None
    ) -> jax.Array:
        """(B, N, D) -> (B, N, D). ``drop_path_rate`` (optional, may be traced) replaces the field
        ``drop_path`` for this call: the scanned stack passes each layer's rate this way."""
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
        y = Attention(self.num_heads, dtype=self.dtype, init_style=self.init_style, name="attn")(y)
        x = x + DropPath(self.drop_path, name="drop_path1")(y, deterministic, drop_path_rate)
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm2")(x)
        y = MlpBlock(int(x.shape[-1] * self.mlp_ratio), dtype=self.dtype, init_style=self.init_style, name="mlp")(y)
        return x + DropPath(self.drop_path, name="drop_path2")(y, deterministic, drop_path_rate)


def scanned_blocks(block: Block, x: jax.Array, depth: int, deterministic: bool, rates: np.ndarray | None,
                   remat: bool) -> jax.Array:
    """Applies ``depth`` copies of ``block`` as one ``nn.scan`` loop (compiled once, not unrolled).

    The recipe of big_vision's ``models/vit.py`` (``Encoder`` with ``scan=True``): ``nn.scan`` with
    ``variable_axes={'params': 0}`` (every parameter of ``block`` gets a leading layer axis: a
    (D, 3D) qkv kernel is stored (depth, D, 3D)) and ``split_rngs={'params': True, 'dropout': True}``
    (each layer initialises and drops with its own key), ``nn.remat`` inside the scan when ``remat``.

    Args:
      block: the Block (its ``drop_path`` field unused) whose parameters are stacked.
      x: (B, N, D) tokens.
      depth: number of layers.
      deterministic: no stochastic depth (evaluation).
      rates: (depth,) per-layer stochastic-depth rates (:func:`drop_path_rates`), scanned over
        with the layers; None = no stochastic depth (no dropout key is drawn).
      remat: rematerialise each layer in the backward pass.

    Returns: (B, N, D) tokens after the last layer.
    """

    def body(mdl: Block, carry: jax.Array, rate: jax.Array | None):
        return mdl(carry, deterministic, rate), None

    if remat:
        body = nn.remat(body, prevent_cse=False)
    scan = nn.scan(
        body,
        variable_axes={"params": 0, "intermediates": 0},
        split_rngs={"params": True, "dropout": True},
        in_axes=0,
        length=depth,
    )
    x, _ = scan(block, x, None if rates is None else jnp.asarray(rates, jnp.float32))
    return x


class ViT(nn.Module):
    """Pre-LN ViT returning all tokens (CLS first when ``use_cls``), after the final LayerNorm.

    Attributes:
      image_size: side of the square images the position embedding is built for.
      patch_size: side of a square patch.
      width, depth, num_heads, mlp_ratio: the usual transformer sizes.
      use_cls: prepend a learned CLS token.
      posemb: 'learned' (DINO, trunc-normal 0.02) or 'sincos' (MAE, fixed).
      init_style: 'dino', 'mae', 'xavier_legacy' (see :func:`initializers`) or 'reference'
        (by ``posemb``: 'sincos' -> 'mae', 'learned' -> 'dino'; :func:`vit_from_config` resolves
        it from the training method instead). ``model.init`` in a config.
      posemb_interpolation: 'torch_bicubic' (DINO's rule) or 'antialiased' (see :func:`resize_posemb`),
        used when images of another size than ``image_size`` come in (DINO's local crops).
      cls_pos: position embedding of the CLS token: 'learned' (parameter ``cls_pos``, DINO's CLS
        row of ``pos_embed``), 'zero' (no parameter: MAE's fixed zero row) or 'reference'
        ('learned' for posemb='learned', 'zero' for posemb='sincos').
      drop_path_rate: stochastic depth, linearly increasing over blocks.
      remat: rematerialise blocks (trades compute for memory on large models).
      scan_blocks: run the blocks as one ``nn.scan`` loop (:func:`scanned_blocks`, big_vision's
        ``scan=True``): compile time no longer grows with depth. Parameters are then stacked under
        ``blocks`` with a leading (depth,) axis instead of ``block0`` .. ``block{depth-1}``
        (``ssl_ad.models.layouts`` converts between the two); outputs agree to float rounding.
        Random init draws other numbers than the unrolled layout (scan splits the init key per layer).
      dtype: computation dtype; parameters stay float32.
      use_mask_token: create a learned ``mask_token`` parameter (1, 1, width), zero-initialised as
        iBOT's ``masked_embed`` (bytedance/ibot ``models/vision_transformer.py``) and DINOv2's
        ``mask_token``, so ``__call__`` accepts ``mask``. False (the default) keeps the parameter
        tree, and so every existing checkpoint, unchanged.
    """

    image_size: int = 32
    patch_size: int = 4
    width: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_ratio: float = 4.0
    use_cls: bool = True
    posemb: str = "learned"
    drop_path_rate: float = 0.0
    remat: bool = False
    scan_blocks: bool = False
    dtype: Any = jnp.float32
    init_style: str = "reference"
    posemb_interpolation: str = "torch_bicubic"
    cls_pos: str = "reference"
    use_mask_token: bool = False

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    @property
    def resolved_init_style(self) -> str:
        return resolve_init_style(self.init_style, None, self.posemb)

    @property
    def has_cls_pos(self) -> bool:
        """Whether the model has a learned ``cls_pos`` parameter (else the CLS position is 0)."""
        return self.use_cls and resolve_cls_pos(self.cls_pos, self.posemb) == "learned"

    def setup(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        if self.posemb_interpolation not in POSEMB_INTERPOLATIONS:
            raise ValueError(
                f"posemb_interpolation must be one of {POSEMB_INTERPOLATIONS}, got {self.posemb_interpolation!r}"
            )
        style = self.resolved_init_style
        # fan_in of the patch conv for RGB input (the data pipelines always give 3 channels).
        inits = initializers(style, patch_fan_in=3 * self.patch_size**2)
        self.patch_embed = nn.Conv(
            self.width,
            (self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            dtype=self.dtype,
            kernel_init=inits["patch_kernel"],
            bias_init=inits["patch_bias"],
            name="patch_embed",
        )
        if self.posemb == "sincos":
            self.pos_embed = jnp.asarray(sincos_2d_posemb(self.grid, self.width)[None])
        elif self.posemb == "learned":
            self.pos_embed = self.param("pos_embed", inits["embed"], (1, self.num_patches, self.width))
        else:
            raise ValueError(f"posemb must be 'learned' or 'sincos', got {self.posemb!r}")
        if self.use_cls:
            self.cls_token = self.param("cls_token", inits["embed"], (1, 1, self.width))
            if self.has_cls_pos:
                self.cls_pos_embed = self.param("cls_pos", inits["embed"], (1, 1, self.width))
            else:  # MAE: the fixed zero CLS row of the sine-cosine table
                self.cls_pos_embed = jnp.zeros((1, 1, self.width), jnp.float32)
        if self.scan_blocks:  # one Block whose parameters scanned_blocks stacks over the layers
            self.blocks = Block(self.num_heads, self.mlp_ratio, dtype=self.dtype, init_style=style, name="blocks")
        else:
            block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
            rates = drop_path_rates(self.drop_path_rate, self.depth)
            self.blocks = [
                block(self.num_heads, self.mlp_ratio, float(rates[i]), dtype=self.dtype, init_style=style,
                      name=f"block{i}")
                for i in range(self.depth)
            ]
        self.norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")
        if self.use_mask_token:
            # Created last: the other parameters draw the same init rngs with or without it.
            self.mask_token = self.param("mask_token", nn.initializers.zeros, (1, 1, self.width))

    def patchify_embed(self, images: jax.Array) -> jax.Array:
        """Patch tokens with position embeddings added (interpolated for other image sizes)."""
        x = self.patch_embed(images.astype(self.dtype))
        b, gh, gw, d = x.shape
        if gh != gw:
            raise ValueError(f"images must be square, got {images.shape}")
        x = x.reshape(b, gh * gw, d)
        return x + resize_posemb(self.pos_embed, gh, self.posemb_interpolation).astype(x.dtype)

    def __call__(
        self,
        images: jax.Array,
        *,
        train: bool = False,
        keep_idx: jax.Array | None = None,
        mask: jax.Array | None = None,
    ) -> jax.Array:
        """Args: images (B, H, W, C); keep_idx (B, n_keep) optional patch indices to keep;
        mask (B, N) optional bool over the N = (H / patch_size)**2 patches of ``images``:
        True = the patch embedding is replaced by ``mask_token`` before the position embedding
        is added (iBOT ``VisionTransformer.prepare_tokens``/``mask_model``). A mask is applied
        before ``keep_idx`` selects patches.

        Returns: (B, [1 +] n_tokens, width) tokens after the final norm.

        Raises:
          ValueError: ``mask`` given to a model without ``use_mask_token``, or of the wrong shape.
        """
        x = self.patchify_embed(images)
        if mask is not None:
            if not self.use_mask_token:
                raise ValueError("a patch mask needs a model with use_mask_token=True")
            if tuple(mask.shape) != tuple(x.shape[:2]):
                raise ValueError(f"mask must be (batch, patches) = {tuple(x.shape[:2])}, got {tuple(mask.shape)}")
            grid = images.shape[1] // self.patch_size
            pos = resize_posemb(self.pos_embed, grid, self.posemb_interpolation).astype(x.dtype)
            x = jnp.where(mask[..., None], self.mask_token.astype(x.dtype) + pos, x)
        if keep_idx is not None:
            x = jnp.take_along_axis(x, keep_idx[..., None], axis=1)
        if self.use_cls:
            cls = jnp.broadcast_to(self.cls_token + self.cls_pos_embed, (x.shape[0], 1, self.width)).astype(x.dtype)
            x = jnp.concatenate([cls, x], axis=1)
        if self.scan_blocks:
            if self.depth:
                rates = drop_path_rates(self.drop_path_rate, self.depth) if train and self.drop_path_rate else None
                x = scanned_blocks(self.blocks, x, self.depth, not train, rates, self.remat)
        else:
            for blk in self.blocks:
                x = blk(x, not train)
        return self.norm(x)


def vit_from_config(model_cfg: Any, method: str | None = None, **overrides: Any) -> ViT:
    """Builds a ViT from a ``config.model`` block; keys that are not ViT fields are ignored.

    ``model.init`` becomes the ``init_style`` field; its default 'reference' is resolved to
    ``method`` ('dino' or 'mae': the method that builds the model passes its name), else by
    ``posemb`` (see :func:`resolve_init_style`). A block without ``init``,
    ``posemb_interpolation`` or ``cls_pos`` gets the reference defaults; configs saved before
    these keys existed must be filled with the legacy values first
    (``ssl_ad.config_defaults.fill_legacy_model_keys``).

    ``model.variant`` (e.g. 'S/16'; '' or absent: none) gives width, depth, num_heads,
    mlp_ratio and, when named, patch_size, resolved on a copy by :func:`apply_variant` (the
    same function config validation applies in place, so every builder sees the same sizes).

    Raises:
      UserInputError: an unknown ``model.variant``, or a size key that contradicts it.
    """
    cfg = apply_variant(dict(model_cfg))
    fields = {f.name for f in dataclasses.fields(ViT)} - {"parent", "name"}
    kwargs = {k: v for k, v in cfg.items() if k in fields and k != "init_style"}
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
    kwargs["init_style"] = resolve_init_style(
        str(cfg.get("init", "reference")), method, str(overrides.get("posemb", kwargs.get("posemb", "learned")))
    )
    kwargs.update(overrides)
    return ViT(**kwargs)


def pool_tokens(tokens: jax.Array, pooling: str, has_cls: bool) -> jax.Array:
    """Turns tokens into one vector per image: 'cls', 'mean' (of patch tokens) or 'cls+mean'."""
    patches = tokens[:, 1:] if has_cls else tokens
    if pooling == "mean":
        return patches.mean(axis=1)
    if not has_cls:
        raise ValueError(f"pooling {pooling!r} needs a CLS token (model.use_cls=True)")
    if pooling == "cls":
        return tokens[:, 0]
    if pooling == "cls+mean":
        return jnp.concatenate([tokens[:, 0], patches.mean(axis=1)], axis=-1)
    raise ValueError(f"pooling must be 'cls', 'mean' or 'cls+mean', got {pooling!r}")
