"""Vision Transformer (pre-LN, as in DeiT/DINO/MAE) in Flax linen.

The model knows nothing about self-supervision or data: it maps images to
tokens. Callers that need a subset of patch tokens (MAE's visible patches)
pass their indices as ``keep_idx``; callers that feed crops of another size
(DINO's local crops) get position embeddings interpolated on the fly.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

# Usual widths: (width, depth, heads).
PRESETS: dict[str, tuple[int, int, int]] = {
    "mu": (96, 4, 3),
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}

_INIT = nn.initializers.truncated_normal(0.02)


def sincos_2d_posemb(grid: int, width: int) -> np.ndarray:
    """Fixed 2-D sine-cosine position embedding, shape (grid*grid, width) (MAE's choice)."""
    if width % 4:
        raise ValueError(f"width must be divisible by 4 for sincos embeddings, got {width}")
    y, x = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64), indexing="ij")
    omega = 1.0 / 10000 ** (np.arange(width // 4, dtype=np.float64) / (width // 4))
    out_y = np.einsum("m,d->md", y.reshape(-1), omega)
    out_x = np.einsum("m,d->md", x.reshape(-1), omega)
    return np.concatenate([np.sin(out_x), np.cos(out_x), np.sin(out_y), np.cos(out_y)], axis=1).astype(np.float32)


def resize_posemb(posemb: jax.Array, new_grid: int) -> jax.Array:
    """Bicubically resizes a (1, g*g, D) patch position embedding to (1, new_grid**2, D)."""
    n, dim = posemb.shape[1], posemb.shape[2]
    grid = int(round(n**0.5))
    if grid * grid != n:
        raise ValueError(f"position embedding of {n} tokens is not a square grid")
    if grid == new_grid:
        return posemb
    emb = posemb.reshape(1, grid, grid, dim)
    emb = jax.image.resize(emb, (1, new_grid, new_grid, dim), method="bicubic")
    return emb.reshape(1, new_grid * new_grid, dim)


class DropPath(nn.Module):
    """Stochastic depth: drops a whole residual branch per sample."""

    rate: float

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool) -> jax.Array:
        if deterministic or self.rate == 0.0:
            return x
        keep = 1.0 - self.rate
        shape = (x.shape[0],) + (1,) * (x.ndim - 1)
        mask = jax.random.bernoulli(self.make_rng("dropout"), keep, shape)
        return x * mask.astype(x.dtype) / keep


class MlpBlock(nn.Module):
    hidden: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        dim = x.shape[-1]
        x = nn.Dense(self.hidden, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(), name="fc1")(x)
        x = nn.gelu(x, approximate=False)
        return nn.Dense(dim, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(), name="fc2")(x)


class Attention(nn.Module):
    """Multi-head self-attention through ``jax.nn.dot_product_attention`` (fused where the backend has it)."""

    num_heads: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        b, n, dim = x.shape
        if dim % self.num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {self.num_heads}")
        head = dim // self.num_heads
        qkv = nn.Dense(3 * dim, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(), name="qkv")(x)
        q, k, v = jnp.split(qkv.reshape(b, n, 3, self.num_heads, head), 3, axis=2)
        out = jax.nn.dot_product_attention(q[:, :, 0], k[:, :, 0], v[:, :, 0])
        out = out.reshape(b, n, dim)
        return nn.Dense(dim, dtype=self.dtype, kernel_init=nn.initializers.xavier_uniform(), name="proj")(out)


class Block(nn.Module):
    num_heads: int
    mlp_ratio: float
    drop_path: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, deterministic: bool = True) -> jax.Array:
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm1")(x)
        y = Attention(self.num_heads, dtype=self.dtype, name="attn")(y)
        x = x + DropPath(self.drop_path, name="drop_path1")(y, deterministic)
        y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm2")(x)
        y = MlpBlock(int(x.shape[-1] * self.mlp_ratio), dtype=self.dtype, name="mlp")(y)
        return x + DropPath(self.drop_path, name="drop_path2")(y, deterministic)


class ViT(nn.Module):
    """Pre-LN ViT returning all tokens (CLS first when ``use_cls``), after the final LayerNorm.

    Attributes:
      image_size: side of the square images the position embedding is built for.
      patch_size: side of a square patch.
      width, depth, num_heads, mlp_ratio: the usual transformer sizes.
      use_cls: prepend a learned CLS token.
      posemb: 'learned' (DINO, trunc-normal 0.02) or 'sincos' (MAE, fixed).
      drop_path_rate: stochastic depth, linearly increasing over blocks.
      remat: rematerialise blocks (trades compute for memory on large models).
      dtype: computation dtype; parameters stay float32.
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
    dtype: Any = jnp.float32

    @property
    def grid(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid**2

    def setup(self) -> None:
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        self.patch_embed = nn.Conv(
            self.width,
            (self.patch_size, self.patch_size),
            strides=(self.patch_size, self.patch_size),
            padding="VALID",
            dtype=self.dtype,
            kernel_init=nn.initializers.xavier_uniform(),
            name="patch_embed",
        )
        if self.posemb == "sincos":
            self.pos_embed = jnp.asarray(sincos_2d_posemb(self.grid, self.width)[None])
        elif self.posemb == "learned":
            self.pos_embed = self.param("pos_embed", _INIT, (1, self.num_patches, self.width))
        else:
            raise ValueError(f"posemb must be 'learned' or 'sincos', got {self.posemb!r}")
        if self.use_cls:
            self.cls_token = self.param("cls_token", _INIT, (1, 1, self.width))
            self.cls_pos = self.param("cls_pos", _INIT, (1, 1, self.width))
        block = nn.remat(Block, static_argnums=(2,)) if self.remat else Block
        rates = np.linspace(0.0, self.drop_path_rate, self.depth) if self.depth else []
        self.blocks = [
            block(self.num_heads, self.mlp_ratio, float(rates[i]), dtype=self.dtype, name=f"block{i}")
            for i in range(self.depth)
        ]
        self.norm = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name="norm")

    def patchify_embed(self, images: jax.Array) -> jax.Array:
        """Patch tokens with position embeddings added (interpolated for other image sizes)."""
        x = self.patch_embed(images.astype(self.dtype))
        b, gh, gw, d = x.shape
        if gh != gw:
            raise ValueError(f"images must be square, got {images.shape}")
        x = x.reshape(b, gh * gw, d)
        return x + resize_posemb(self.pos_embed, gh).astype(x.dtype)

    def __call__(
        self, images: jax.Array, *, train: bool = False, keep_idx: jax.Array | None = None
    ) -> jax.Array:
        """Args: images (B, H, W, C); keep_idx (B, n_keep) optional patch indices to keep.

        Returns: (B, [1 +] n_tokens, width) tokens after the final norm.
        """
        x = self.patchify_embed(images)
        if keep_idx is not None:
            x = jnp.take_along_axis(x, keep_idx[..., None], axis=1)
        if self.use_cls:
            cls = jnp.broadcast_to(self.cls_token + self.cls_pos, (x.shape[0], 1, self.width)).astype(x.dtype)
            x = jnp.concatenate([cls, x], axis=1)
        for blk in self.blocks:
            x = blk(x, not train)
        return self.norm(x)


def vit_from_config(model_cfg: Any, **overrides: Any) -> ViT:
    """Builds a ViT from a ``config.model`` block; keys that are not ViT fields are ignored."""
    fields = {f.name for f in dataclasses.fields(ViT)} - {"parent", "name"}
    kwargs = {k: v for k, v in dict(model_cfg).items() if k in fields}
    if isinstance(kwargs.get("dtype"), str):
        kwargs["dtype"] = jnp.dtype(kwargs["dtype"])
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
