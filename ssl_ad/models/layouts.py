"""The two parameter layouts of a ViT's blocks, and pure conversions between them.

``model.scan_blocks=False`` (unrolled, the default and every checkpoint before the key): one
subtree per block, ``block0`` .. ``block{depth-1}``, each leaf of its natural shape, e.g.
``block3/attn/qkv/kernel`` (D, 3D). ``model.scan_blocks=True`` (scanned, ``nn.scan`` as in
big_vision's ``models/vit.py``): one subtree ``blocks`` whose leaves are the blocks' leaves stacked
on a new leading axis, ``blocks/attn/qkv/kernel`` (depth, D, 3D), layer i at index i. Every other
key of the ViT (``patch_embed``, ``pos_embed``, ``cls_token``, ``cls_pos``, ``norm``,
``mask_token``) is the same in both.

:func:`unrolled_to_scan` / :func:`scan_to_unrolled` convert one ViT's parameter dict exactly
(stacking and slicing only; round trips are bit-equal). :func:`to_layout` converts every ViT inside
a larger tree (a train state's params, DINO's teacher, optimiser moments), recognised by its
``patch_embed`` key, and leaves everything else (MAE's decoder, whose blocks stay unrolled, DINO's
head) untouched.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

SCANNED_KEY = "blocks"  # the scanned layout's subtree of stacked blocks
VIT_MARKER = "patch_embed"  # a dict holding this key is one ViT's parameters
_BLOCK = re.compile(r"^block(\d+)$")


def _block_keys(params: Mapping[str, Any]) -> list[str]:
    """``block{i}`` keys of an unrolled ViT in layer order; ValueError unless they are block0..block{d-1}."""
    found = sorted((int(m.group(1)), k) for k in params if (m := _BLOCK.match(k)))
    if [i for i, _ in found] != list(range(len(found))):
        raise ValueError(f"block keys are not block0..block{{depth-1}}: {[k for _, k in found]}")
    return [k for _, k in found]


def is_scanned(params: Mapping[str, Any]) -> bool:
    """Whether one ViT's parameter dict is in the scanned layout (has ``blocks``)."""
    return SCANNED_KEY in params


def stacked_by_layer(path: str) -> bool:
    """Whether a parameter at ``path`` ('/'-joined keys, e.g. 'encoder/blocks/norm1/scale') has a
    leading layer axis: it lies under a scanned ViT's ``blocks``. Per-tensor rules (weight-decay
    groups by number of dimensions, DINO's per-tensor gradient clipping) treat each layer's slice
    as the tensor."""
    return SCANNED_KEY in path.split("/")


def unrolled_to_scan(params: Mapping[str, Any]) -> dict[str, Any]:
    """One ViT's parameters, unrolled -> scanned.

    Args:
      params: {'block0': T, ..., 'block{d-1}': T, other keys}, every block the same tree T.

    Returns:
      A new dict {'blocks': T with each leaf stacked to (d, *leaf.shape), other keys as given}.

    Raises:
      ValueError: already scanned, no blocks, block keys not 0..d-1, or blocks of different shapes.
    """
    if is_scanned(params):
        raise ValueError("parameters are already in the scanned layout (they hold 'blocks')")
    keys = _block_keys(params)
    if not keys:
        raise ValueError("no block0..block{depth-1} keys to stack")
    blocks = [params[k] for k in keys]
    try:
        stacked = jax.tree.map(lambda *leaves: jnp.stack(leaves), *blocks)
    except ValueError as e:  # tree structures or shapes differ between blocks
        raise ValueError(f"the blocks cannot be stacked: {e}") from e
    out = {k: v for k, v in params.items() if k not in keys}
    out[SCANNED_KEY] = stacked
    return out


def scan_to_unrolled(params: Mapping[str, Any]) -> dict[str, Any]:
    """One ViT's parameters, scanned -> unrolled (the inverse of :func:`unrolled_to_scan`).

    Args:
      params: {'blocks': T with leaves (d, ...), other keys}.

    Returns:
      A new dict {'block0': T[0], ..., 'block{d-1}': T[d-1], other keys as given}.

    Raises:
      ValueError: no 'blocks', block{i} keys present as well, or leaves of different leading sizes.
    """
    if not is_scanned(params):
        raise ValueError("parameters are not in the scanned layout (no 'blocks')")
    if _block_keys(params):
        raise ValueError("parameters hold both 'blocks' and block{i} keys")
    stacked = params[SCANNED_KEY]
    depths = {leaf.shape[0] if leaf.ndim else None for leaf in jax.tree.leaves(stacked)}
    if len(depths) != 1 or None in depths:
        raise ValueError(f"'blocks' leaves do not share one leading layer axis (sizes {sorted(map(str, depths))})")
    (depth,) = depths
    out = {k: v for k, v in params.items() if k != SCANNED_KEY}
    for i in range(depth):
        out[f"block{i}"] = jax.tree.map(lambda leaf, i=i: leaf[i], stacked)
    return out


def to_layout(tree: Any, scanned: bool) -> Any:
    """Every ViT parameter dict inside ``tree`` (a dict with a ``patch_embed`` key, at any depth of
    nested dicts) put into the scanned (``scanned=True``) or unrolled layout; ViTs already in it and
    all other entries are returned as they are. Pure: ``tree`` is not modified.

    For a checkpoint saved in one layout and a model built in the other (evaluation of a run,
    converted PyTorch weights). Raises ValueError as the two conversions do.
    """
    if not isinstance(tree, Mapping):
        return tree
    out = {k: to_layout(v, scanned) for k, v in tree.items()}
    has_blocks = is_scanned(out) or bool(_block_keys(out))  # a depth-0 ViT is the same in both layouts
    if VIT_MARKER in tree and has_blocks and is_scanned(out) != scanned:
        out = unrolled_to_scan(out) if scanned else scan_to_unrolled(out)
    return out
