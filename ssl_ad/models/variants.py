"""ViT sizes by name (``model.variant``), in big_vision's style.

big_vision (``big_vision/models/vit.py``, ``decode_variant``) names a ViT by its size and
patch: ``"S/16"`` is width 384, depth 12, 6 heads, MLP 1536 (4 x width), 16 x 16 patches.
Here the part after the slash may be left out (``"S"``): the config's ``model.patch_size``
is then kept. ``''`` (the default of ``model.variant``) means no variant: the explicit
``model.width/depth/num_heads/mlp_ratio/patch_size`` keys are used.

:data:`PRESETS` is the one table of sizes in ssl_ad (the Flax ViT in
:mod:`ssl_ad.models.vit` and the PyTorch weight converter :mod:`ssl_ad.convert` read it).
:func:`apply_variant` is the one place that turns a variant into sizes; config validation
(:mod:`ssl_ad.config_check`) runs it in place before any rule, so the run, its links and its
saved ``config.json`` hold the resolved sizes, and :func:`ssl_ad.models.vit.vit_from_config`
runs it on a copy, so a config that was never validated builds the same ViT.

This module imports neither JAX nor Flax: configs are checked before JAX is loaded.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import MutableMapping
from typing import Any

from ssl_ad.config_defaults import base_config
from ssl_ad.errors import UserInputError

# name -> (width, depth, num_heads); the MLP hidden size is MLP_RATIO * width throughout.
# Ti, S, B, L, H: big_vision's decode_variant (ViT, Dosovitskiy et al. 2021; Ti and S from
# DeiT, Touvron et al. 2021); the same sizes as timm's vit_{tiny,small,base,large,huge}.
# 'mu' is ssl_ad's own CPU-demo size: big_vision's "mu" is smaller (width 32, depth 1, 2 heads).
PRESETS: dict[str, tuple[int, int, int]] = {
    "mu": (96, 4, 3),
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "H": (1280, 32, 16),
}
MLP_RATIO = 4.0

# '' or NAME or NAME/PATCH (PATCH a positive integer without leading zeros).
VARIANT_PATTERN = r"(?:(" + "|".join(PRESETS) + r")(?:/([1-9][0-9]*))?)?"
VARIANT_HELP = (
    "'' (none: model.width/depth/num_heads/patch_size as given) or a ViT size "
    + ", ".join(repr(n) for n in PRESETS)
    + ", optionally with '/<patch size>', e.g. 'S/16' or 'mu'"
)
# The model keys a variant sets ('patch_size' only when the variant names one).
SIZE_KEYS = ("width", "depth", "num_heads", "mlp_ratio", "patch_size")


def decode_variant(variant: str) -> dict[str, Any]:
    """The ViT sizes a variant name stands for (big_vision ``decode_variant``).

    ``"S/16"`` -> ``{'width': 384, 'depth': 12, 'num_heads': 6, 'mlp_ratio': 4.0,
    'patch_size': 16}``; ``"S"`` -> the same without ``'patch_size'``; ``""`` -> ``{}``.
    big_vision returns ``mlp_dim`` (1536 for S); ssl_ad's ViT has ``mlp_ratio``
    (``mlp_dim = mlp_ratio * width``). Names are case-sensitive, as in big_vision.

    Raises:
      UserInputError: an unknown size ('X/16') or a patch that is not a positive integer
        ('S/abc', 'S/0').
    """
    m = re.fullmatch(VARIANT_PATTERN, variant) if isinstance(variant, str) else None
    if m is None:
        raise UserInputError(f"unknown model.variant {variant!r}; expected {VARIANT_HELP}")
    if not m.group(1):
        return {}
    width, depth, num_heads = PRESETS[m.group(1)]
    out: dict[str, Any] = {"width": width, "depth": depth, "num_heads": num_heads, "mlp_ratio": MLP_RATIO}
    if m.group(2):
        out["patch_size"] = int(m.group(2))
    return out


def _defaults() -> dict[str, Any]:
    model = base_config().model
    return {k: model[k] for k in SIZE_KEYS}


def apply_variant(model: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Resolves ``model['variant']`` in a config's ``model`` block, in place; returns the block.

    Each size the variant determines (:func:`decode_variant`: width, depth, num_heads,
    mlp_ratio, and patch_size when the name has one) is written into the block. What counts
    as set explicitly: a size key whose value differs from ``base_config()``'s default
    (``ssl_ad/config_defaults.py``: width 192, depth 12, num_heads 3, mlp_ratio 4.0,
    patch_size 4). Such a key must equal the variant's value, else it is a conflict; a key
    at the default, or absent, is unset and takes the variant's value. A resolved block (as
    ``config.json`` saves it) therefore resolves to itself. The price of this simple rule: a
    key set explicitly *to its default* cannot be told from an unset one, so the variant
    wins ('S/16' with ``width=192`` gives width 384).

    A block without ``variant``, or with ``''``, is returned unchanged (configs saved before
    the key existed mean ``''``).

    Raises:
      UserInputError: an unknown variant (see :func:`decode_variant`), or one message naming
        the variant's value and the config's for every conflicting key.
    """
    sizes = decode_variant(model.get("variant", "") or "")
    if not sizes:
        return model
    defaults = _defaults()
    conflicts = [
        k for k, v in sizes.items() if k in model and model[k] != v and model[k] != defaults[k]
    ]
    if conflicts:
        means = ", ".join(f"model.{k}={sizes[k]!r}" for k in conflicts)
        given = ", ".join(f"model.{k}={model[k]!r}" for k in conflicts)
        raise UserInputError(
            f"model.variant={model['variant']!r} means {means}, but the config also sets {given}; "
            f"drop {'those keys' if len(conflicts) > 1 else 'that key'}, or set model.variant='' "
            "to give the sizes explicitly"
        )
    unlocked = model.unlocked() if hasattr(model, "unlocked") else contextlib.nullcontext()
    with unlocked:
        for key, value in sizes.items():
            if key not in model or model[key] != value:
                model[key] = value
    return model
