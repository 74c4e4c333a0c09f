"""Loads a data set split into memory as uint8 arrays, whatever builder it comes from.

Every split the library uses (mnist5k, CIFAR-10, MVTec AD, COCO subsets,
image folders, anomalib-style folders) fits in host memory at training resolution, which lets the
training pipeline draw examples by index: data order is then a pure function
of (seed, step), so a resumed run sees exactly the batches it would have seen.

:data:`LOADERS` maps each ``data.name`` to its loader; each loader module
declares the ``data.*`` keys it reads (and their defaults) in one settings
class. :class:`ImageSplit`, :func:`array_digest`, :func:`data_dir_of` and
:func:`cap_per_class` live in ``ssl_ad.data.split`` and are re-exported here.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any

from ssl_ad.data import cifar10, coco2017, folder, image_folder, mnist5k, mvtec_ad
from ssl_ad.data.split import (
    ImageSplit,
    Settings,
    array_digest,
    base_split_name,
    cap_per_class,
    carve_validation,
    data_dir_of,
)
from ssl_ad.errors import UserInputError

__all__ = ["LOADERS", "ImageSplit", "array_digest", "cap_per_class", "data_dir_of", "load_split"]

log = logging.getLogger(__name__)

# name -> loader
LOADERS: dict[str, Callable[[Any, str], ImageSplit]] = {
    "mnist5k": mnist5k.load_mnist5k,
    "cifar10": cifar10.load_cifar10,
    "image_folder": image_folder.load_image_folder,
    "mvtec_ad": mvtec_ad.load_mvtec_ad,
    "coco2017": coco2017.load_coco2017,
    "folder": folder.load_folder,
}


@dataclasses.dataclass(frozen=True)
class SplitSettings(Settings):
    """The ``data.*`` keys :func:`load_split` itself reads (besides ``data.name``) and their defaults."""

    max_per_class: int = 0  # keep the first N examples of each class (0: all)
    val_fraction: float = 0.1  # of '<split>:val' (the rest is '<split>:fit')


def load_split(data_cfg: Any, split: str) -> ImageSplit:
    """Loads ``split`` of the data set named ``data_cfg.name`` into memory.

    ``'<split>:val'`` and ``'<split>:fit'`` are a validation part of ``<split>`` and the rest
    (``data.val_fraction`` per class, fixed seed: :func:`ssl_ad.data.split.carve_validation`),
    carved after ``data.max_per_class``.
    """
    name = data_cfg.name
    if name not in LOADERS:
        raise UserInputError(f"unknown data set {name!r}; choose one of {sorted(LOADERS)}")
    base = base_split_name(split)
    settings = SplitSettings.from_config(data_cfg)
    out = LOADERS[name](data_cfg, base)
    cap = int(settings.max_per_class or 0)
    if cap:
        keep = cap_per_class(out.labels, cap)
        out = out.take(keep, name=f"{out.name}_first{cap}")
    if base != split:
        out = carve_validation(out, float(settings.val_fraction), split[len(base) + 1:])
    if len(out) == 0:
        raise UserInputError(f"split {split!r} of data set {name!r} is empty")
    log.info("Loaded %s/%s: %d images of shape %s", name, split, len(out), out.images.shape[1:])
    return out
