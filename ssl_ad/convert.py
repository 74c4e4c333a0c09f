"""Converts published PyTorch ViT weights (DINO, MAE, timm) into an ssl_ad checkpoint.

  python -m ssl_ad.convert --from=dino_deitsmall16_pretrain.pth --arch=vit_small_patch16 --out=runs/dino_vits16
  python -m ssl_ad.convert --from=mae_pretrain_vit_huge.pth --arch=vit_huge_patch14 --out=runs/mae_vith14
  python evaluate.py --config=configs/eval_seed_study.py --config.checkpoint=runs/dino_vits16,runs/mae_vith14 ...

Reads the state dicts of facebookresearch/dino (``dino_*_pretrain.pth``: the
teacher backbone; full training checkpoints: their 'teacher'), facebookresearch/mae
(``mae_pretrain_vit_*.pth``: {'model': encoder}; ``mae_visualize_vit_*.pth``:
encoder + decoder) and timm's ``VisionTransformer`` (``.pth``/``.bin``/``.safetensors``).
``.pth`` files are read with ``torch.load(weights_only=True)``: tensors and plain
containers only, never arbitrary pickled objects. torch is needed for ``.pth``
only (``pip install -e '.[convert]'``); the rest of ssl_ad never imports it.

The layout mapping (PyTorch -> ssl_ad.models.vit.ViT):

* ``patch_embed.proj.weight`` (D, 3, p, p) -> ``patch_embed/kernel`` (p, p, 3, D).
* ``pos_embed`` (1, 1+N, D): the CLS position -> ``cls_pos``, the N patch positions ->
  ``pos_embed`` (or the fixed ``posemb='sincos'`` when they equal MAE's sine-cosine
  table with its zero CLS row, which is then recomputed exactly at any image size, with
  ``model.cls_pos='zero'``: no ``cls_pos`` parameter, as MAE's reference). At another
  ``--image_size`` learned positions are resized bicubically with antialiasing, the
  same as timm's ``resample_abs_pos_embed`` (``jax.image.resize`` == ``F.interpolate(
  mode='bicubic', antialias=True)``; DINO's own ``interpolate_pos_encoding`` uses no
  antialiasing and differs slightly). A ``pos_embed`` with no CLS position (timm's
  ``no_embed_class``) gives ``cls_pos`` = 0.
* ``blocks.i.attn.qkv.weight`` (3D, D) -> ``block{i}/attn/qkv/kernel`` (D, 3D): both
  split the 3D outputs as [q | k | v] then heads, so a transpose suffices. No qkv bias
  (timm ``qkv_bias=False``) -> zeros; BEiT-style ``q_bias``/``v_bias`` -> [q, 0, v].
* Every Linear (out, in) -> Dense kernel (in, out); LayerNorm weight -> scale (eps 1e-6,
  exact GELU on both sides).
* ``norm`` -> ``norm``. timm models with global average pooling have no ``norm`` but an
  ``fc_norm`` applied after pooling; it is mapped to ``norm`` (applied per token, before
  pooling) with a note in the checkpoint's meta, since the Flax ViT always ends in a
  per-token LayerNorm.
* MAE decoder: ``decoder_embed`` -> ``embed``, ``mask_token``, ``decoder_blocks.i`` ->
  ``block{i}``, ``decoder_norm`` -> ``norm``, ``decoder_pred`` -> ``pred``;
  ``decoder_pos_embed`` must be MAE's fixed sine-cosine table (the Flax decoder
  computes it), which is checked.
* Classifier / DINO projection head keys (``head.*``) are ignored and listed in the meta.

Anything else missing, unexpected or mis-shaped is a ``UserInputError`` naming the keys.

The output is ``OUT/checkpoints/0`` with the training loop's meta ({'config': a full
training config, 'step': 0, 'version'} plus 'converted_from': source, sha256, notes),
so ``evaluate.py --config.checkpoint=OUT`` loads it like a trained run. The state is
laid out for the method's ``encoder_params``:

* ``--method=mae`` (auto when the weights have an MAE decoder or MAE's sine-cosine
  positions): {'params': {'encoder', 'decoder'}}, or {'encoder'} alone for
  ``mae_pretrain_*`` files (``config.mae.decoder_depth = 0``; no reconstruction).
* ``--method=dino`` (auto otherwise: DINO and timm backbones): {'params': {'backbone'},
  'extra': {'teacher': {'backbone'}}}, the same weights as teacher and student (DINO
  publishes the teacher); the projection head is not converted (evaluation never uses it).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import re
import sys
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

import ssl_ad
from ssl_ad.checkpointing import Checkpointer, describe_mismatch
from ssl_ad.cli import run_guarded, setup_logging
from ssl_ad.config_defaults import base_config, dino_block, mae_block
from ssl_ad.data.provenance import file_sha256
from ssl_ad.errors import UserInputError
from ssl_ad.methods.mae import MAEDecoder
from ssl_ad.models.layouts import to_layout
from ssl_ad.models.variants import PRESETS, decode_variant
from ssl_ad.models.vit import resize_posemb, sincos_2d_posemb, vit_from_config

log = logging.getLogger(__name__)

# timm's size names -> big_vision's: the sizes themselves are ssl_ad.models.variants.PRESETS.
ARCHS: dict[str, str] = {
    "vit_tiny": "Ti",
    "vit_small": "S",
    "vit_base": "B",
    "vit_large": "L",
    "vit_huge": "H",
}
assert set(ARCHS.values()) <= set(PRESETS), "every --arch size must be a preset"
_ARCH_RE = re.compile(r"^(vit_(?:tiny|small|base|large|huge))_patch(\d+)(?:_(\d+))?$")
_STRIP_PREFIXES = ("module.", "_orig_mod.", "backbone.")
_IGNORED = re.compile(r"^(head|head_dist|pre_logits)(\.|$)")
_MAX_LISTED = 12


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """The encoder sizes the weights are checked against."""

    width: int
    depth: int
    num_heads: int
    patch_size: int
    mlp_ratio: float = 4.0

    @property
    def hidden(self) -> int:
        return int(self.width * self.mlp_ratio)


def parse_arch(arch: str) -> tuple[ModelSpec, int | None]:
    """'vit_small_patch16' (or timm's 'vit_small_patch16_224') -> (spec, image size in the name or None).

    The sizes are those of the model variant of the same name ('vit_small_patch16' is
    ``decode_variant('S/16')``, :data:`ARCHS` maps the names).

    Raises:
      UserInputError: a name that is not vit_{tiny,small,base,large,huge}_patch<P>[_<size>].
    """
    m = _ARCH_RE.match(arch.strip())
    if not m:
        names = ", ".join(f"{a}_patch16" for a in ARCHS)
        raise UserInputError(
            f"unknown --arch {arch!r}; expected vit_<size>_patch<P>[_<image size>], e.g. {names}, vit_huge_patch14"
        )
    spec = ModelSpec(**decode_variant(f"{ARCHS[m.group(1)]}/{int(m.group(2))}"))
    return spec, (int(m.group(3)) if m.group(3) else None)


@dataclasses.dataclass
class Converted:
    """Flax params and what the config needs to rebuild the model."""

    params: dict[str, Any]  # {'encoder': ..., ['decoder': ...]}
    spec: ModelSpec
    image_size: int
    native_image_size: int
    posemb: str  # 'learned' or 'sincos'
    decoder: dict[str, int] | None  # width, depth, num_heads
    notes: list[str]
    ignored: list[str]


# -- reading files ---------------------------------------------------------------------------------


def _to_numpy(value: Any, key: str) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value.astype(np.float32, copy=False)
    if hasattr(value, "detach"):  # a torch tensor
        import torch

        return value.detach().to(torch.float32).cpu().numpy()
    raise UserInputError(f"state dict entry {key!r} is a {type(value).__name__}, not a tensor")


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and bool(obj) and all(
        isinstance(v, np.ndarray) or hasattr(v, "detach") for v in obj.values()
    )


def unwrap_state_dict(obj: Any, key: str = "") -> dict[str, Any]:
    """The weights inside a loaded file: itself, or its ``key`` / 'model' / 'teacher' / 'state_dict' entry."""
    if key:
        if not isinstance(obj, Mapping) or key not in obj:
            have = sorted(obj) if isinstance(obj, Mapping) else type(obj).__name__
            raise UserInputError(f"--key={key!r} is not in the file; it holds {have}")
        obj = obj[key]
    for _ in range(2):
        if _is_state_dict(obj):
            return dict(obj)
        if not isinstance(obj, Mapping):
            break
        found = next((k for k in ("model", "teacher", "state_dict", "model_ema", "module") if k in obj), None)
        if found is None:
            break
        obj = obj[found]
    if _is_state_dict(obj):
        return dict(obj)
    have = sorted(obj)[:20] if isinstance(obj, Mapping) else type(obj).__name__
    raise UserInputError(f"found no state dict of tensors in the file (top level: {have}); pass --key=NAME")


def load_state_dict(path: str, key: str = "") -> dict[str, np.ndarray]:
    """Reads a .pth/.pt/.bin (torch, weights_only) or .safetensors file into float32 NumPy arrays."""
    if not os.path.isfile(path):
        raise UserInputError(f"no weights file at {path}")
    if path.endswith(".safetensors"):
        try:
            from safetensors.numpy import load_file
        except ImportError as e:
            raise UserInputError(
                "reading .safetensors needs the 'safetensors' package (pip install -e '.[convert]')"
            ) from e
        try:
            raw: Any = load_file(path)
        except Exception as e:  # noqa: BLE001 - any parse failure is a bad input file
            raise UserInputError(f"cannot read {path} as safetensors: {e}") from e
    else:
        try:
            import torch
        except ImportError as e:
            raise UserInputError(
                f"reading {os.path.basename(path)} needs PyTorch: pip install -e '.[convert]' "
                "(or convert the file to .safetensors elsewhere)"
            ) from e
        import argparse as _argparse  # training checkpoints of DINO/MAE store their argparse.Namespace

        try:
            with torch.serialization.safe_globals([_argparse.Namespace]):
                raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - pickle errors come in many types
            raise UserInputError(
                f"cannot load {path} with torch.load(weights_only=True) (only tensors and plain containers "
                f"are accepted, never arbitrary pickled objects): {str(e).splitlines()[0] if str(e) else e!r}"
            ) from e
    sd = unwrap_state_dict(raw, key)
    out: dict[str, np.ndarray] = {}
    for k, v in sd.items():
        name = k
        changed = True
        while changed:
            changed = False
            for prefix in _STRIP_PREFIXES:
                if name.startswith(prefix):
                    name, changed = name[len(prefix):], True
        out[name] = _to_numpy(v, k)
    return out


# -- the mapping ----------------------------------------------------------------------------------


def _square(n: int) -> int | None:
    g = int(round(n**0.5))
    return g if g * g == n else None


def _sincos_with_cls(grid: int, width: int) -> np.ndarray | None:
    if width % 4:
        return None
    return sincos_2d_posemb(grid, width)


def describe_sd(sd: Mapping[str, np.ndarray]) -> str:
    """What the state dict itself says about its sizes, for error messages."""
    parts = []
    if "patch_embed.proj.weight" in sd:
        w = sd["patch_embed.proj.weight"]
        parts.append(f"width {w.shape[0]}, patch {w.shape[-1]}")
    depth = {int(m.group(1)) for k in sd if (m := re.match(r"^blocks\.(\d+)\.", k))}
    if depth:
        parts.append(f"depth {max(depth) + 1}")
    if "pos_embed" in sd:
        parts.append(f"pos_embed {tuple(sd['pos_embed'].shape)}")
    return ", ".join(parts) or "no ViT encoder keys"


class _Mapper:
    """Consumes state-dict keys while recording missing and mis-shaped ones."""

    def __init__(self, sd: Mapping[str, np.ndarray]):
        self.sd = sd
        self.used: set[str] = set()
        self.missing: list[str] = []
        self.misshaped: list[str] = []

    def has(self, key: str) -> bool:
        return key in self.sd

    def take(self, key: str, shape: tuple[int, ...] | None) -> np.ndarray | None:
        if key not in self.sd:
            self.missing.append(f"{key} {shape}" if shape else key)
            return None
        self.used.add(key)
        value = self.sd[key]
        if shape is not None and tuple(value.shape) != tuple(shape):
            self.misshaped.append(f"{key}: expected {tuple(shape)}, found {tuple(value.shape)}")
            return None
        return value

    def linear(self, key: str, out_dim: int, in_dim: int, bias: bool = True) -> dict[str, np.ndarray] | None:
        w = self.take(f"{key}.weight", (out_dim, in_dim))
        b = self.take(f"{key}.bias", (out_dim,)) if bias else np.zeros((out_dim,), np.float32)
        if w is None or b is None:
            return None
        return {"kernel": np.ascontiguousarray(w.T), "bias": b}

    def layernorm(self, key: str, dim: int) -> dict[str, np.ndarray] | None:
        w, b = self.take(f"{key}.weight", (dim,)), self.take(f"{key}.bias", (dim,))
        if w is None or b is None:
            return None
        return {"scale": w, "bias": b}

    def block(self, prefix: str, dim: int, hidden: int, notes: list[str]) -> dict[str, Any]:
        qkv_w = self.take(f"{prefix}.attn.qkv.weight", (3 * dim, dim))
        if self.has(f"{prefix}.attn.qkv.bias"):
            qkv_b = self.take(f"{prefix}.attn.qkv.bias", (3 * dim,))
        elif self.has(f"{prefix}.attn.q_bias") or self.has(f"{prefix}.attn.v_bias"):
            q, v = self.take(f"{prefix}.attn.q_bias", (dim,)), self.take(f"{prefix}.attn.v_bias", (dim,))
            qkv_b = None if q is None or v is None else np.concatenate([q, np.zeros_like(q), v])
        else:
            qkv_b = np.zeros((3 * dim,), np.float32)
            note = "no qkv bias in the weights (qkv_bias=False): zero biases"
            if note not in notes:
                notes.append(note)
        qkv = None if qkv_w is None or qkv_b is None else {"kernel": np.ascontiguousarray(qkv_w.T), "bias": qkv_b}
        return {
            "norm1": self.layernorm(f"{prefix}.norm1", dim),
            "attn": {"qkv": qkv, "proj": self.linear(f"{prefix}.attn.proj", dim, dim)},
            "norm2": self.layernorm(f"{prefix}.norm2", dim),
            "mlp": {
                "fc1": self.linear(f"{prefix}.mlp.fc1", hidden, dim),
                "fc2": self.linear(f"{prefix}.mlp.fc2", dim, hidden),
            },
        }


def _resize_patch_posemb(posemb: np.ndarray, new_grid: int) -> np.ndarray:
    return np.asarray(resize_posemb(posemb, new_grid, method="antialiased"), np.float32)


def convert_state_dict(
    sd: Mapping[str, np.ndarray],
    spec: ModelSpec,
    image_size: int | None = None,
    decoder_heads: int = 16,
    posemb: str = "auto",
) -> Converted:
    """Maps a PyTorch ViT (+ optional MAE decoder) state dict onto the Flax layout.

    Args:
      sd: PyTorch names -> float32 arrays (prefixes like 'module.' already stripped).
      spec: the encoder sizes the weights must have.
      image_size: side the checkpoint is built for (default: the weights' native size);
        learned position embeddings are resized bicubically (antialiased, as timm does).
      decoder_heads: MAE decoder heads (16 in every official MAE model); not in the weights.
      posemb: 'auto' (fixed 'sincos' when the weights hold MAE's sine-cosine table, else
        'learned'), 'learned' or 'sincos' (checked).
    """
    if posemb not in ("auto", "learned", "sincos"):
        raise UserInputError(f"posemb must be 'auto', 'learned' or 'sincos', got {posemb!r}")
    m = _Mapper(sd)
    d, p = spec.width, spec.patch_size
    notes: list[str] = []
    problems: list[str] = []

    # Position embedding: decides the native grid.
    native_grid, cls_pos, patch_pos = None, None, None
    if "pos_embed" not in sd:
        m.missing.append(f"pos_embed (1, 1+N, {d})")
    else:
        pe = sd["pos_embed"]
        m.used.add("pos_embed")
        if pe.ndim != 3 or pe.shape[0] != 1 or pe.shape[2] != d:
            m.misshaped.append(f"pos_embed: expected (1, 1+N, {d}), found {tuple(pe.shape)}")
        elif _square(pe.shape[1] - 1):
            native_grid = _square(pe.shape[1] - 1)
            cls_pos, patch_pos = pe[:, :1], pe[:, 1:]
        elif _square(pe.shape[1]):
            native_grid = _square(pe.shape[1])
            cls_pos, patch_pos = np.zeros((1, 1, d), np.float32), pe
            notes.append("pos_embed has no CLS position (timm no_embed_class): cls_pos = 0")
        else:
            m.misshaped.append(f"pos_embed: {pe.shape[1]} tokens is neither N nor 1+N for a square grid of patches")
    native_size = native_grid * p if native_grid else None
    size = int(image_size or native_size or 0)
    if size and size % p:
        raise UserInputError(f"--image_size {size} is not a multiple of the patch size {p}")
    grid = size // p if size else None

    enc: dict[str, Any] = {}
    w = m.take("patch_embed.proj.weight", (d, 3, p, p))
    b = m.take("patch_embed.proj.bias", (d,))
    if w is not None and b is not None:  # (D, 3, p, p) -> (p, p, 3, D)
        enc["patch_embed"] = {"kernel": np.ascontiguousarray(w.transpose(2, 3, 1, 0)), "bias": b}
    enc["cls_token"] = m.take("cls_token", (1, 1, d))
    enc["cls_pos"] = cls_pos

    chosen = "learned"
    if patch_pos is not None:
        table = _sincos_with_cls(native_grid, d)
        is_sincos = (
            table is not None
            and np.abs(patch_pos[0] - table).max() < 1e-4
            and np.abs(cls_pos).max() == 0.0
        )
        if posemb == "sincos" and not is_sincos:
            raise UserInputError("posemb='sincos' asked for, but the weights' pos_embed is not MAE's sine-cosine table")
        chosen = "sincos" if (posemb == "sincos" or (posemb == "auto" and is_sincos)) else "learned"
        if chosen == "learned":
            enc["pos_embed"] = _resize_patch_posemb(patch_pos, grid) if grid != native_grid else patch_pos
            if grid != native_grid:
                notes.append(f"learned pos_embed resized bicubically (antialiased) from {native_grid}x{native_grid} "
                             f"to {grid}x{grid}")
        else:
            notes.append("pos_embed is MAE's fixed sine-cosine table: posemb='sincos' (recomputed at any size)")

    for i in range(spec.depth):
        enc[f"block{i}"] = m.block(f"blocks.{i}", d, spec.hidden, notes)
    if m.has("norm.weight") or not m.has("fc_norm.weight"):
        enc["norm"] = m.layernorm("norm", d)
        if m.has("fc_norm.weight"):
            m.used.update(k for k in ("fc_norm.weight", "fc_norm.bias") if k in sd)
            notes.append("fc_norm ignored (the weights also have a final norm)")
    else:
        enc["norm"] = m.layernorm("fc_norm", d)
        notes.append(
            "no final 'norm' but an 'fc_norm' (timm global average pooling): mapped to the per-token final "
            "norm, so pooled features are the mean of normalised tokens, not the norm of the mean token"
        )

    # MAE decoder.
    dec_keys = [k for k in sd if k.startswith("decoder_")]
    decoder = None
    dec: dict[str, Any] | None = None
    if dec_keys:
        dw = sd["decoder_embed.weight"].shape[0] if "decoder_embed.weight" in sd else None
        indices = [int(mm.group(1)) for k in dec_keys if (mm := re.match(r"^decoder_blocks\.(\d+)\.", k))]
        ddepth = 1 + max(indices, default=-1)
        if dw is None:
            m.missing.append(f"decoder_embed.weight (D_dec, {d})")
        else:
            if dw % decoder_heads:
                raise UserInputError(f"decoder width {dw} is not divisible by --decoder_heads {decoder_heads}")
            decoder = {"width": int(dw), "depth": int(ddepth), "num_heads": int(decoder_heads)}
            dec = {"embed": m.linear("decoder_embed", dw, d), "mask_token": m.take("mask_token", (1, 1, dw))}
            n_pos = 1 + (native_grid or 0) ** 2
            dpe = m.take("decoder_pos_embed", (1, n_pos, dw)) if native_grid else None
            if dpe is not None:
                table = _sincos_with_cls(native_grid, dw)
                if table is None or np.abs(dpe[0, 1:] - table).max() > 1e-4 or np.abs(dpe[0, 0]).max() != 0.0:
                    problems.append("decoder_pos_embed is not MAE's fixed sine-cosine table (with a zero CLS row), "
                                    "which the Flax decoder assumes")
            for i in range(ddepth):
                dec[f"block{i}"] = m.block(f"decoder_blocks.{i}", dw, int(dw * spec.mlp_ratio), notes)
            dec["norm"] = m.layernorm("decoder_norm", dw)
            dec["pred"] = m.linear("decoder_pred", p * p * 3, dw)
            if grid != native_grid:
                notes.append(f"decoder sine-cosine positions recomputed for the {grid}x{grid} grid")
    elif "mask_token" in sd:
        pass  # left unused: reported as unexpected below (e.g. DINOv2/iBOT/BEiT weights)

    ignored = sorted(k for k in sd if k not in m.used and _IGNORED.match(k))
    unexpected = sorted(k for k in sd if k not in m.used and not _IGNORED.match(k))
    for what, keys in (("missing", m.missing), ("mis-shaped", m.misshaped), ("unexpected", unexpected)):
        if keys:
            more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
            problems.append(f"{what} keys: " + ", ".join(keys[:_MAX_LISTED]) + more)
    if problems:
        raise UserInputError(
            f"the state dict does not fit a ViT of width {d}, depth {spec.depth}, patch {p} "
            f"(it looks like: {describe_sd(sd)}): " + "; ".join(problems)
        )
    if ignored:
        notes.append(f"ignored {len(ignored)} head keys: {', '.join(ignored[:6])}{' ...' if len(ignored) > 6 else ''}")
    if chosen == "sincos":
        enc.pop("pos_embed", None)
        enc.pop("cls_pos", None)  # MAE's fixed zero CLS row (checked above): model.cls_pos='zero'
    params: dict[str, Any] = {"encoder": enc}
    if dec is not None:
        params["decoder"] = dec
    return Converted(params, spec, size, native_size, chosen, decoder, notes, ignored)


# -- config, checking and writing -----------------------------------------------------------------


def choose_method(conv: Converted, method: str = "auto") -> str:
    """'auto': 'mae' when the weights have an MAE decoder or MAE's fixed sine-cosine positions, else 'dino'."""
    if method not in ("auto", "mae", "dino"):
        raise UserInputError(f"--method must be 'auto', 'mae' or 'dino', got {method!r}")
    if method == "auto":
        return "mae" if (conv.decoder or conv.posemb == "sincos") else "dino"
    if method == "dino" and conv.decoder:
        raise UserInputError("the weights hold an MAE decoder; convert them with --method=mae (or auto)")
    return method


def training_config(conv: Converted, method: str = "mae", norm_pix_loss: bool = True, scan_blocks: bool = False):
    """A full training config (base_config + the method's block) describing the converted model;
    ``scan_blocks``: the encoder's blocks in the scanned layout (``model.scan_blocks``)."""
    c = base_config()
    c.model.scan_blocks = bool(scan_blocks)
    c.method = method
    c.model.image_size = conv.image_size
    c.model.patch_size = conv.spec.patch_size
    c.model.width = conv.spec.width
    c.model.depth = conv.spec.depth
    c.model.num_heads = conv.spec.num_heads
    c.model.mlp_ratio = conv.spec.mlp_ratio
    c.model.use_cls = True
    c.model.posemb = conv.posemb
    c.model.cls_pos = "zero" if conv.posemb == "sincos" else "learned"
    # The weights were pretrained on ImageNet-1k with its mean/std (base_config's default),
    # which is what evaluation normalises images with.
    c.data.name = "image_folder"
    c.data.load_size = conv.image_size
    c.total_steps = 0
    if method == "mae":
        c.mae = mae_block()
        c.mae.norm_pix_loss = bool(norm_pix_loss)
        if conv.decoder:
            c.mae.decoder_width = conv.decoder["width"]
            c.mae.decoder_depth = conv.decoder["depth"]
            c.mae.decoder_heads = conv.decoder["num_heads"]
        else:
            c.mae.decoder_depth = 0  # no decoder in the weights: encoder-only checkpoint
    elif method == "dino":
        c.dino = dino_block()
    else:
        raise UserInputError(f"unknown method {method!r}")
    return c


def checkpoint_state(conv: Converted, method: str, scan_blocks: bool = False) -> dict[str, Any]:
    """The state tree ``load_checkpoint`` restores, shaped as the method's ``encoder_params`` reads it.

    MAE: {'params': {'encoder', ['decoder']}}. DINO: the weights are the teacher backbone
    (what DINO publishes), so {'params': {'backbone'}, 'extra': {'teacher': {'backbone'}}} with
    the same weights in both places (the projection head is not converted: evaluation
    never uses it). ``scan_blocks``: the encoder's blocks stacked under ``blocks``
    (``ssl_ad.models.layouts.unrolled_to_scan``); the MAE decoder's stay unrolled.
    """

    def arrays(tree: Any) -> Any:
        if isinstance(tree, dict):
            return {k: arrays(v) for k, v in tree.items()}
        return jnp.array(tree, jnp.float32, copy=True)

    params = to_layout(conv.params, scan_blocks)
    if method == "mae":
        return {"params": arrays(params)}
    enc = params["encoder"]
    return {"params": {"backbone": arrays(enc)}, "extra": {"teacher": {"backbone": arrays(enc)}}}


def check_against_model(conv: Converted, config: Any) -> None:
    """Compares the converted encoder (and decoder) with the shapes the Flax modules initialise."""
    vit = vit_from_config(config.model)
    x = jnp.zeros((1, vit.image_size, vit.image_size, 3), jnp.float32)
    want = jax.eval_shape(lambda: vit.init(jax.random.key(0), x)["params"])
    problem = describe_mismatch(want, to_layout(conv.params["encoder"], bool(config.model.scan_blocks)))
    if problem is None and "decoder" in conv.params:
        dec = MAEDecoder(vit.num_patches, vit.patch_size, config.mae.decoder_width, config.mae.decoder_depth,
                         config.mae.decoder_heads)
        tokens = jnp.zeros((1, 1 + vit.num_patches // 4, vit.width))
        ids = jnp.arange(vit.num_patches)[None]
        want = jax.eval_shape(lambda: dec.init(jax.random.key(0), tokens, ids, True)["params"])
        problem = describe_mismatch(want, conv.params["decoder"])
    if problem:  # pragma: no cover - a converter bug, not a user mistake
        raise AssertionError(f"converted params do not fit the Flax model: {problem}")


def write_checkpoint(out: str, state: dict[str, Any], config: Any, provenance: dict[str, Any]) -> str:
    """Writes ``out/checkpoints/0`` with the training loop's meta; refuses to overwrite a checkpoint."""
    ckpt_dir = os.path.join(out, "checkpoints")
    if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
        raise UserInputError(f"{ckpt_dir} already holds a checkpoint; choose another --out or remove it")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserInputError(f"cannot create --out {out}: {e.strerror}") from e
    meta = {"step": 0, "config": config.to_dict(), "version": ssl_ad.__version__, "converted_from": provenance}
    ckpt = Checkpointer(ckpt_dir, max_to_keep=1)
    ckpt.save(0, state, meta)
    ckpt.close()
    return ckpt_dir


def convert_file(
    src: str,
    arch: str | ModelSpec,
    out: str,
    image_size: int | None = None,
    method: str = "auto",
    decoder_heads: int = 16,
    norm_pix_loss: bool = True,
    key: str = "",
    posemb: str = "auto",
    scan_blocks: bool = False,
) -> tuple[Converted, str]:
    """The whole conversion: read, map, check, write. Returns (what was converted, the method written)."""
    spec, size_in_name = parse_arch(arch) if isinstance(arch, str) else (arch, None)
    sd = load_state_dict(src, key)
    conv = convert_state_dict(sd, spec, image_size, decoder_heads=decoder_heads, posemb=posemb)
    if size_in_name and not image_size and size_in_name != conv.native_image_size:
        log.warning("--arch names %d px but the weights are for %d px; using %d", size_in_name,
                    conv.native_image_size, conv.native_image_size)
    method = choose_method(conv, method)
    config = training_config(conv, method, norm_pix_loss, scan_blocks)
    check_against_model(conv, config)
    notes = list(conv.notes)
    if method == "dino":
        notes.append("DINO: the weights are stored as both the teacher and the student backbone; no projection head")
    elif "decoder" not in conv.params:
        notes.append("MAE encoder only: no decoder in the weights, so no reconstruction (mae_recon) is possible")
    provenance = {
        "path": os.path.abspath(src),
        "sha256": file_sha256(src),
        "arch": arch if isinstance(arch, str) else dataclasses.asdict(arch),
        "method": method,
        "native_image_size": conv.native_image_size,
        "image_size": conv.image_size,
        "posemb": conv.posemb,
        "has_decoder": "decoder" in conv.params,
        "notes": notes,
        "ignored_keys": conv.ignored,
    }
    provenance["scan_blocks"] = bool(scan_blocks)
    write_checkpoint(out, checkpoint_state(conv, method, scan_blocks), config, provenance)
    for note in notes:
        log.info("note: %s", note)
    return conv, method


def _bool(text: str) -> bool:
    t = text.strip().lower()
    if t in ("1", "true", "yes", "y"):
        return True
    if t in ("0", "false", "no", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {text!r}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m ssl_ad.convert",
        description="Convert DINO / MAE / timm PyTorch ViT weights into an ssl_ad checkpoint that evaluate.py reads.",
    )
    parser.add_argument("--from", dest="src", required=True, help=".pth/.pt/.bin (torch) or .safetensors weights file")
    parser.add_argument("--arch", required=True, help="vit_{tiny,small,base,large,huge}_patch{16,14,8}")
    parser.add_argument("--out", required=True, help="run directory to create (DIR/checkpoints/0)")
    parser.add_argument("--image_size", type=int, default=0, help="image side (default: the weights' native size)")
    parser.add_argument("--method", default="auto", choices=("auto", "mae", "dino"),
                        help="checkpoint layout; auto: 'mae' for MAE weights (decoder or sine-cosine positions), "
                             "else 'dino'")
    parser.add_argument("--decoder_heads", type=int, default=16, help="MAE decoder heads (16 in the official models)")
    parser.add_argument("--norm_pix_loss", type=_bool, default=True,
                        help="MAE target normalisation the decoder was trained with (mae_visualize_* files: false)")
    parser.add_argument("--posemb", default="auto", choices=("auto", "learned", "sincos"))
    parser.add_argument("--key", default="", help="entry of the file holding the state dict (default: found)")
    parser.add_argument("--scan_blocks", type=_bool, default=False,
                        help="write the encoder's blocks in the scanned layout (model.scan_blocks=True: stacked "
                             "under 'blocks'); default: unrolled block0..block{depth-1}")
    args = parser.parse_args(argv)
    setup_logging()

    def job():
        conv, method = convert_file(args.src, args.arch, args.out, args.image_size or None, args.method,
                                    args.decoder_heads, args.norm_pix_loss, args.key, args.posemb, args.scan_blocks)
        parts = "encoder + decoder" if "decoder" in conv.params else "encoder only"
        sys.stdout.write(
            f"Wrote {os.path.join(args.out, 'checkpoints', '0')}: {method}, {parts}, {conv.image_size} px, "
            f"posemb {conv.posemb}.\n"
        )

    run_guarded(job)


if __name__ == "__main__":
    main()
