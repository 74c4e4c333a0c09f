"""Loads a user's folder of class sub-folders of images into an in-memory split.

Two layouts are accepted (``data.data_dir`` is the root):

* ``root/<split>/<class>/*.{png,jpg,jpeg,bmp}``: ``split`` names the sub-folder;
  class names are the union of the class folders of all splits, so labels mean
  the same in every split.
* ``root/<class>/*.{png,...}`` (no split folders): a deterministic stratified
  split makes 'train' and 'test': per class, the files are sorted, permuted with
  seed 0, and the first ``round(n * data.test_fraction)`` (half up, default
  0.2) go to 'test', the rest to 'train'.

Class names are sorted; labels index into them. Images are decoded with PIL;
grey, grey+alpha, RGBA, CMYK and palette images become RGB (alpha is dropped,
not composited), 16-bit grey is scaled to 8 bits.

Size (``data.load_size``): training draws examples by index from one array, so
every image of a split must have one size. With ``load_size`` > 0 each image's
shorter side is resized to ``load_size`` and the centre square is cropped
(:func:`fit_square`: one bicubic resize of the centre crop, antialiased when
shrinking). With 0 (default) images keep their native size, which must then be
the same for all.

:func:`fit_square` and :func:`to_rgb` are shared with the MVTec AD and COCO
loaders.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ssl_ad.errors import UserInputError

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp")
SPLIT_SEED = 0


# ---------------------------------------------------------------------------
# Shared image helpers (PIL only, no TensorFlow).


def to_rgb(img) -> "PIL.Image.Image":  # noqa: F821
    """Any PIL image -> mode 'RGB' (alpha dropped, 16-bit grey scaled to 8 bits)."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max(initial=0) > 255 else 255.0
        arr = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, mode="L")
    if img.mode == "P":
        img = img.convert("RGBA")  # resolves palettes with transparency cleanly
    return img.convert("RGB")


def fit_square(img, size: int, *, nearest: bool = False):
    """Centre square crop of the shorter side, resized to ``size`` x ``size``.

    Bicubic (antialiased when shrinking: PIL widens its filter by the scale
    factor) for images, nearest neighbour for masks. ``size`` 0: unchanged.
    The crop box depends only on the image size, so an image and its
    same-sized mask stay aligned.
    """
    from PIL import Image, ImageOps

    if not size:
        return img
    if img.size == (size, size):
        return img
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.BICUBIC
    return ImageOps.fit(img, (size, size), method=method, centering=(0.5, 0.5))


def crop_box(img, box: tuple[float, float, float, float], margin: float):
    """Square crop around ``box`` = (x, y, w, h) in pixels.

    The side is ``max(w, h) * (1 + 2 * margin)`` (a ``margin`` fraction of the
    longer box side on every side), at most the image's shorter side; the
    square is centred on the box and shifted to lie inside the image.
    """
    width, height = img.size
    x, y, w, h = (float(v) for v in box)
    side = min(max(w, h) * (1.0 + 2.0 * margin), float(min(width, height)))
    side = max(side, 1.0)
    cx, cy = x + w / 2.0, y + h / 2.0
    left = min(max(cx - side / 2.0, 0.0), width - side)
    top = min(max(cy - side / 2.0, 0.0), height - side)
    left, top, side_px = int(round(left)), int(round(top)), int(round(side))
    side_px = max(1, min(side_px, width - left, height - top))
    return img.crop((left, top, left + side_px, top + side_px))


def stack_same_size(arrays: list[np.ndarray], what: str) -> np.ndarray:
    """``np.stack`` with a clear error when sizes differ (``data.load_size`` is 0)."""
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1:
        raise UserInputError(
            f"{what} has images of different sizes ({shapes[0][:2]} and {shapes[-1][:2]}, "
            f"{len(shapes)} sizes in all); set data.load_size (e.g. --config.data.load_size=224) "
            "to resize them to one square size"
        )
    return np.stack(arrays) if arrays else np.zeros((0, 0, 0, 3), np.uint8)


def variant_name(base: str, *parts: Any) -> str:
    """A path-safe ImageSplit name that differs between data variants (feature caches key on it)."""
    import hashlib

    if not parts:
        return base
    digest = hashlib.sha1(repr(parts).encode()).hexdigest()[:8]
    return f"{base}_{digest}"


def load_size_of(data_cfg: Any) -> int:
    size = int(data_cfg.get("load_size", 0) or 0)
    if size < 0:
        raise UserInputError(f"data.load_size must be >= 0 (0 = native size), got {size}")
    return size


# ---------------------------------------------------------------------------
# The folder loader.


def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(EXTENSIONS)


def _subdirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _images_in(path: str) -> list[str]:
    return sorted(
        os.path.join(path, e.name) for e in os.scandir(path) if e.is_file() and _is_image(e.name)
    )


def _class_files(folder: str, classes: list[str]) -> dict[str, list[str]]:
    """Image files per class folder of ``folder``; an empty class folder is an error."""
    out = {}
    for c in classes:
        path = os.path.join(folder, c)
        if not os.path.isdir(path):
            continue
        files = _images_in(path)
        if not files:
            raise UserInputError(f"class folder {path} has no images ({', '.join(EXTENSIONS)})")
        out[c] = files
    return out


def decode(path: str, load_size: int) -> np.ndarray:
    """One image file -> uint8 (H, W, 3), resized by :func:`fit_square`."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            img.load()
            img = to_rgb(img)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise UserInputError(f"cannot decode image {path}: {e}") from None
    return np.asarray(fit_square(img, load_size), dtype=np.uint8)


def stratified_split(labels: np.ndarray, test_fraction: float, seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train_idx, test_idx): per class ``round(n * test_fraction)`` (half up) to test."""
    rng = np.random.default_rng(seed)
    train, test = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(np.floor(idx.size * test_fraction + 0.5))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _layout(root: str) -> str:
    """'split' when images sit two levels down (root/split/class/x), 'flat' when one."""
    top = _subdirs(root)
    direct = [d for d in top if _images_in(os.path.join(root, d))]
    nested = [d for d in top if any(_images_in(os.path.join(root, d, s)) for s in _subdirs(os.path.join(root, d)))]
    if direct and nested:
        raise UserInputError(
            f"{root} mixes layouts: {direct[0]!r} holds images directly, {nested[0]!r} holds class folders; "
            "use root/<split>/<class>/* or root/<class>/*"
        )
    if nested:
        return "split"
    if direct or top:
        return "flat"  # also: only empty class folders, reported by _class_files
    raise UserInputError(f"{root} has no class folders; expected root/<class>/*.png or root/<split>/<class>/*.png")


def load_image_folder(data_cfg: Any, split: str):
    """The ``image_folder`` loader: see the module docstring."""
    from ssl_ad.data.sources import ImageSplit

    root = os.path.expanduser(str(data_cfg.get("data_dir", "") or ""))
    if not root:
        raise UserInputError("data set 'image_folder' needs data.data_dir: the root folder of the images")
    if not os.path.isdir(root):
        raise UserInputError(f"image folder root {root} does not exist or is not a folder")
    load_size = load_size_of(data_cfg)

    if _layout(root) == "split":
        splits = [d for d in _subdirs(root) if _subdirs(os.path.join(root, d))]
        if split not in splits:
            raise UserInputError(f"image folder {root} has no split {split!r}; available splits: {splits}")
        classes = sorted({c for s in splits for c in _subdirs(os.path.join(root, s))})
        per_class = _class_files(os.path.join(root, split), classes)
        files = [f for c in classes for f in per_class.get(c, [])]
        labels = np.array([i for i, c in enumerate(classes) for _ in per_class.get(c, [])], np.int64)
    else:
        if split not in ("train", "test"):
            raise UserInputError(
                f"image folder {root} has no split folders, so it is split into ['test', 'train']; "
                f"no split {split!r}"
            )
        fraction = float(data_cfg.get("test_fraction", 0.2))
        if not 0.0 < fraction < 1.0:
            raise UserInputError(f"data.test_fraction must be in (0, 1), got {fraction}")
        classes = _subdirs(root)
        per_class = _class_files(root, classes)
        all_files = [f for c in classes for f in per_class[c]]
        all_labels = np.array([i for i, c in enumerate(classes) for _ in per_class[c]], np.int64)
        train_idx, test_idx = stratified_split(all_labels, fraction)
        idx = train_idx if split == "train" else test_idx
        files, labels = [all_files[i] for i in idx], all_labels[idx]

    images = stack_same_size([decode(f, load_size) for f in files], f"image folder {root} split {split!r}")
    name = variant_name("image_folder", os.path.abspath(root), load_size, float(data_cfg.get("test_fraction", 0.2)))
    return ImageSplit(name, split, images, labels, classes)
