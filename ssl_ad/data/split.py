"""What every data-set loader shares: the in-memory split type and the settings-block base.

This is the bottom of ``ssl_ad.data``: it imports no loader, so every loader
(``mnist5k``, ``cifar10``, ``image_folder``, ``mvtec_ad``, ``coco2017``) imports it
at module top, and ``ssl_ad.data.sources`` imports the loaders at module top.

Settings: each data set declares the ``data.*`` keys it reads, with their
defaults, in ONE frozen dataclass derived from :class:`Settings` (fields are the
keys, field defaults the defaults); :meth:`Settings.from_config` is the only
place the config is read, and a loader reads its settings only through that
object.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import os
from collections.abc import Sequence
from typing import Any, TypeVar

import numpy as np

from ssl_ad.errors import UserInputError

S = TypeVar("S", bound="Settings")


@dataclasses.dataclass(frozen=True)
class ImageSplit:
    """One split: images (N, H, W, C) uint8, integer labels, class names.

    ``is_anomaly`` and ``masks`` are set by anomaly-detection sets (MVTec AD); ``info`` holds
    how the images were made (e.g. ``load_size``, ``resize_mode``, skipped files).
    ``mask_valid`` (N,) bool, with ``masks``: False for the images of a defect type that has no
    ground-truth masks (their ``masks`` rows are zeros that do not describe the defect, so pixel
    metrics leave them out); None when every mask row is ground truth.
    """

    name: str
    split: str
    images: np.ndarray
    labels: np.ndarray
    class_names: list[str]
    is_anomaly: np.ndarray | None = None
    masks: np.ndarray | None = None
    info: dict[str, Any] = dataclasses.field(default_factory=dict, compare=False)
    mask_valid: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def take(self, keep: np.ndarray, **changes: Any) -> ImageSplit:
        """The examples ``keep`` (indices or a (N,) bool mask) of every per-image array, plus ``changes``
        (e.g. ``name=``, ``split=``) to the other fields."""
        def pick(a: np.ndarray | None) -> np.ndarray | None:
            return None if a is None else a[keep]

        return dataclasses.replace(self, images=self.images[keep], labels=self.labels[keep],
                                   is_anomaly=pick(self.is_anomaly), masks=pick(self.masks),
                                   mask_valid=pick(self.mask_valid), **changes)

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


# ---------------------------------------------------------------------------
# Settings blocks.


@dataclasses.dataclass(frozen=True)
class Settings:
    """Base of a settings block: each field is a ``data.*`` key, its default the key's default."""

    @classmethod
    def from_config(cls: type[S], data_cfg: Any) -> S:
        """Each field's key from ``data_cfg`` as given (None included), or the field default when absent."""
        return cls(**{f.name: data_cfg.get(f.name, _default(f)) for f in dataclasses.fields(cls)})


def _default(field: dataclasses.Field) -> Any:
    return field.default_factory() if field.default is dataclasses.MISSING else field.default


@dataclasses.dataclass(frozen=True)
class DataSettings(Settings):
    """The key every data set reads: ``data.data_dir`` (tfds' data dir; for image_folder the images' root)."""

    data_dir: str = ""

    @property
    def tfds_dir(self) -> str:
        """The tfds data dir: ``data.data_dir``, else $TFDS_DATA_DIR, else tfds' default (~/tensorflow_datasets)."""
        d = self.data_dir or os.environ.get("TFDS_DATA_DIR", "")
        return os.path.expanduser(d or "~/tensorflow_datasets")


def data_dir_of(data_cfg: Any) -> str:
    """The tfds data dir: ``data.data_dir`` or tfds' default (~/tensorflow_datasets)."""
    return DataSettings.from_config(data_cfg).tfds_dir


# ---------------------------------------------------------------------------
# Helpers of more than one loader.


def cap_per_class(labels: np.ndarray, max_per_class: int | None) -> np.ndarray:
    """Indices keeping the first ``max_per_class`` examples of each class, in file order."""
    if not max_per_class:
        return np.arange(labels.shape[0])
    keep = np.zeros(labels.shape[0], bool)
    for c in np.unique(labels):
        keep[np.flatnonzero(labels == c)[:max_per_class]] = True
    return np.flatnonzero(keep)


def builder_split(builder, split: str, name: str) -> ImageSplit:
    """``split`` of a prepared tfds builder with ``image`` and ``label`` features, in memory."""
    # heavy (imports TensorFlow): kept lazy so this base module stays light to import
    import tensorflow_datasets as tfds

    if split not in builder.info.splits:
        raise UserInputError(f"data set {name!r} has no split {split!r}; it has {sorted(builder.info.splits)}")
    data = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1, shuffle_files=False))
    images, labels = data["image"], data["label"].astype(np.int64)
    names = list(builder.info.features["label"].names)
    return ImageSplit(name, split, images, labels, names)


# ---------------------------------------------------------------------------
# Validation split carved from a training split.

VAL_SUFFIX = ":val"  # '<split>:val': data.val_fraction of <split>, per class, fixed seed
FIT_SUFFIX = ":fit"  # '<split>:fit': the rest of <split>
CARVE_SEED = 0  # the same validation images for every run and every training seed


def base_split_name(split: str) -> str:
    """'train:val' / 'train:fit' -> 'train'; any other name unchanged."""
    for suffix in (VAL_SUFFIX, FIT_SUFFIX):
        if split.endswith(suffix):
            return split[: -len(suffix)]
    return split


def validation_indices(labels: np.ndarray, fraction: float, seed: int = CARVE_SEED) -> np.ndarray:
    """Sorted positions of a stratified validation subset: round(fraction * n_c) of each class c
    (at least 1 when the class has 2 or more images, never all of them), drawn with ``seed``.

    Raises:
      UserInputError: when ``fraction`` is not in (0, 1).
    """
    if not 0.0 < float(fraction) < 1.0:
        raise UserInputError(f"data.val_fraction={fraction!r}; expected a fraction in (0, 1), e.g. 0.1")
    rng = np.random.default_rng(seed)
    picked = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        n = int(round(float(fraction) * members.size))
        n = min(max(n, 1 if members.size >= 2 else 0), members.size - 1)
        if n > 0:
            picked.append(rng.choice(members, size=n, replace=False))
    return np.sort(np.concatenate(picked)) if picked else np.zeros((0,), np.int64)


def subset(split: ImageSplit, keep: np.ndarray, suffix: str) -> ImageSplit:
    """The examples ``keep`` of ``split``, named ``split.split + suffix``."""
    return split.take(keep, split=split.split + suffix)


def carve_validation(split: ImageSplit, fraction: float, part: str) -> ImageSplit:
    """``part`` 'val' (the stratified ``fraction`` of ``split``, see :func:`validation_indices`) or
    'fit' (everything else) of ``split``; the two are disjoint and together make ``split``."""
    val = validation_indices(split.labels, fraction)
    if part == "val":
        return subset(split, val, VAL_SUFFIX)
    keep = np.setdiff1d(np.arange(len(split)), val)
    return subset(split, keep, FIT_SUFFIX)


def stratified_subset(split: ImageSplit, max_images: int, seed: int = CARVE_SEED) -> ImageSplit:
    """At most ``max_images`` of ``split``, the same fraction of each class (seeded); all when 0 or fewer."""
    if not max_images or len(split) <= max_images:
        return split
    keep = validation_indices(split.labels, max_images / len(split), seed)
    return split.take(keep)
