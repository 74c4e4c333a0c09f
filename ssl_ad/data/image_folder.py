"""Loads a user's folder of class sub-folders of images into an in-memory split.

Two layouts are accepted (``data.data_dir`` is the root):

* ``root/<split>/<class>/<image>``: ``split`` names the sub-folder; class names
  are the union of the class folders of all splits, so labels mean the same in
  every split.
* ``root/<class>/<image>`` (no split folders): a deterministic stratified split
  makes 'train' and 'test': per class, the files are sorted, permuted with
  seed 0, and the first ``round(n * data.test_fraction)`` (half up, default
  0.2) go to 'test', the rest to 'train'.

A class folder holds its images directly: images found deeper (e.g.
``root/test/<class>/<batch>/*.png``) are an error that names where they were
found and the layouts expected. Every format Pillow can decode is read
(:func:`image_extensions`: .png, .jpg, .bmp, .tif/.tiff, .webp, .ppm, ...);
other files (and images lying directly in the root, outside any class folder)
are skipped and reported in one log line per split, with a count.

Class names are sorted; labels index into them. Images are decoded with PIL;
grey, grey+alpha, RGBA, CMYK and palette images become RGB (alpha is dropped,
not composited), 16-bit grey is scaled to 8 bits.

Size (``data.load_size``): training draws examples by index from one array, so
every image of a split must have one size. With ``load_size`` > 0 each image is
made square at ``load_size`` x ``load_size`` by ``data.resize_mode``
(:func:`fit_square`):

* ``crop`` (default, the former behaviour): the shorter side is resized to
  ``load_size`` and the centre square is kept; a warning (one line per split)
  counts the images that lose more than 20 % of their area;
* ``pad``: the longer side is resized to ``load_size`` and the image is
  centred on a black square (letterbox): nothing is lost;
* ``stretch``: resized to the square, ignoring the aspect ratio.

With 0 (default) images keep their native size, which must then be the same for
all (non-square images are then stretched to the model's square input by the
evaluation, which is logged).

``data.max_image_pixels`` is Pillow's decompression-bomb limit while decoding
(``PIL.Image.MAX_IMAGE_PIXELS``; Pillow refuses images over twice it; default
Pillow's own, 0 = no limit); the previous limit is restored afterwards.

:func:`fit_square`, :class:`SquareResizer`, :func:`open_image`,
:func:`pixel_limit` and :func:`to_rgb` are shared with the MVTec AD and COCO
loaders.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import os
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image, ImageFile, ImageOps

from ssl_ad.data.split import DataSettings, ImageSplit
from ssl_ad.errors import UserInputError

log = logging.getLogger(__name__)

SPLIT_SEED = 0
RESIZE_MODES = ("crop", "pad", "stretch")
CROP_WARN_FRACTION = 0.2  # warn when a centre crop discards more than this share of an image's area
PILLOW_DEFAULT_MAX_PIXELS = 89_478_485  # PIL.Image.MAX_IMAGE_PIXELS as Pillow ships it
MAX_DEPTH = 6  # folder levels below the root that are searched (guards against symlink loops)
_NOT_DECODABLE = ("MPEG",)  # Pillow identifies these but cannot decode their pixels


# ---------------------------------------------------------------------------
# Settings blocks.


@dataclasses.dataclass(frozen=True)
class ImageSettings(DataSettings):
    """The image keys (and their defaults) of every loader that decodes image files: image_folder, MVTec AD, COCO."""

    load_size: int = 0  # 0: native size (see the module doc)
    resize_mode: str = "crop"  # RESIZE_MODES
    max_image_pixels: int | None = PILLOW_DEFAULT_MAX_PIXELS  # None: Pillow's default; 0: no limit


@dataclasses.dataclass(frozen=True)
class FolderSettings(ImageSettings):
    """The ``data.*`` keys of image_folder and their defaults (``data_dir`` is the images' root)."""

    test_fraction: float = 0.2  # flat layout: share of each class that goes to 'test'


# ---------------------------------------------------------------------------
# Shared image helpers (PIL only, no TensorFlow).


def image_extensions() -> tuple[str, ...]:
    """Lower-case file extensions of every format Pillow can open and decode (.png, .tif, .webp, ...)."""
    Image.init()
    exts = []
    for ext, fmt in Image.registered_extensions().items():
        factory = Image.OPEN.get(fmt, (None,))[0]
        if factory is None or fmt in _NOT_DECODABLE:
            continue
        if isinstance(factory, type) and issubclass(factory, ImageFile.StubImageFile):
            continue  # BUFR, GRIB, HDF5, WMF: need handlers Pillow does not ship
        exts.append(ext.lower())
    return tuple(sorted(set(exts)))


def to_rgb(img) -> Any:
    """Any PIL image -> mode 'RGB' (alpha dropped, 16-bit grey scaled to 8 bits)."""
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


def fit_square(img, size: int, *, nearest: bool = False, mode: str = "crop"):
    """``img`` made ``size`` x ``size`` by ``mode`` ('crop', 'pad' or 'stretch', see the module doc).

    Bicubic (antialiased when shrinking: PIL widens its filter by the scale
    factor) for images, nearest neighbour for masks. ``size`` 0: unchanged.
    The geometry depends only on the image size, so an image and its
    same-sized mask stay aligned (padding is 0: black, or 'normal' in a mask).
    """
    if mode not in RESIZE_MODES:
        raise UserInputError(f"data.resize_mode must be one of {list(RESIZE_MODES)}, got {mode!r}")
    if not size or img.size == (size, size):
        return img
    method = Image.Resampling.NEAREST if nearest else Image.Resampling.BICUBIC
    if mode == "crop":
        return ImageOps.fit(img, (size, size), method=method, centering=(0.5, 0.5))
    if mode == "pad":
        return ImageOps.pad(img, (size, size), method=method, color=0, centering=(0.5, 0.5))
    return img.resize((size, size), method)


def crop_loss(width: int, height: int) -> float:
    """Share of an image's area that a centre square crop discards."""
    return 1.0 - min(width, height) / max(width, height, 1)


@dataclasses.dataclass
class SquareResizer:
    """:func:`fit_square` with one configuration, counting what cropping discards (for one warning per split)."""

    size: int
    mode: str = "crop"
    seen: int = 0
    cropped: int = 0  # images losing more than CROP_WARN_FRACTION of their area
    worst: float = 0.0
    non_square: int = 0  # size 0: images kept at a non-square native size

    @classmethod
    def from_settings(cls, settings: ImageSettings) -> SquareResizer:
        return cls(load_size_of(settings), resize_mode_of(settings))

    def __call__(self, img, *, nearest: bool = False):
        if not nearest:
            self.seen += 1
            w, h = img.size
            if not self.size:
                self.non_square += w != h
            elif self.mode == "crop":
                loss = crop_loss(w, h)
                self.worst = max(self.worst, loss)
                self.cropped += loss > CROP_WARN_FRACTION
        return fit_square(img, self.size, nearest=nearest, mode=self.mode)

    def report(self, what: str) -> None:
        """One warning line for ``what`` (a split) when cropping discarded a sizeable part of images."""
        if self.cropped:
            log.warning(
                "%s: the centre crop to %dx%d discards more than %d%% of the area of %d of %d images (up to %d%%); "
                "set data.resize_mode=pad (letterbox) or stretch to keep whole images",
                what, self.size, self.size, round(100 * CROP_WARN_FRACTION), self.cropped, self.seen,
                round(100 * self.worst),
            )
        if self.non_square:
            log.warning(
                "%s: %d of %d images are not square and data.load_size is 0: evaluation stretches them to the "
                "model's square input; set data.load_size and data.resize_mode (crop, pad or stretch) to choose",
                what, self.non_square, self.seen,
            )

    @property
    def info(self) -> dict[str, Any]:
        return {"load_size": self.size, "resize_mode": self.mode, "crop_discards_over_20pct": self.cropped}


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
    left, top, side_px = round(left), round(top), round(side)
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
    if not parts:
        return base
    digest = hashlib.sha1(repr(parts).encode()).hexdigest()[:8]
    return f"{base}_{digest}"


def load_size_of(settings: ImageSettings) -> int:
    size = int(settings.load_size or 0)
    if size < 0:
        raise UserInputError(f"data.load_size must be >= 0 (0 = native size), got {size}")
    return size


def resize_mode_of(settings: ImageSettings) -> str:
    mode = str(settings.resize_mode or "crop")
    if mode not in RESIZE_MODES:
        raise UserInputError(
            f"data.resize_mode must be one of {list(RESIZE_MODES)} (centre crop, letterbox, or resize ignoring "
            f"the aspect ratio), got {mode!r}"
        )
    return mode


def max_image_pixels_of(settings: ImageSettings) -> int | None:
    """Pillow's MAX_IMAGE_PIXELS from ``data.max_image_pixels`` (None = no limit)."""
    value = settings.max_image_pixels
    value = PILLOW_DEFAULT_MAX_PIXELS if value is None else int(value)
    if value < 0:
        raise UserInputError(f"data.max_image_pixels must be >= 0 (0 = no limit), got {value}")
    return value or None


@contextlib.contextmanager
def pixel_limit(settings: ImageSettings) -> Iterator[None]:
    """Sets PIL.Image.MAX_IMAGE_PIXELS from ``data.max_image_pixels`` and restores it afterwards."""
    limit = max_image_pixels_of(settings)
    before = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = limit
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = before


def open_image(path: str, what: str = "image", *, load: bool = True):
    """``Image.open`` (+ ``load``) with every failure a UserInputError naming the file.

    A refusal by Pillow's decompression-bomb check names ``data.max_image_pixels``. With
    ``load=False`` only the header is read (format, mode and size are available).
    """
    try:
        with Image.open(path) as img:
            if load:
                img.load()
            return img
    except Image.DecompressionBombError as e:
        limit = Image.MAX_IMAGE_PIXELS
        raise UserInputError(
            f"cannot decode {what} {path}: {e}. Pillow refuses images with more than twice "
            f"data.max_image_pixels (now {limit}) pixels; if you trust the file, raise it "
            "(e.g. --config.data.max_image_pixels=200000000) or set it to 0 for no limit"
        ) from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UserInputError(f"cannot decode {what} {path}: {e}") from None


def report_skipped(what: str, skipped: list[str], hidden: int = 0) -> None:
    """One log line naming how many files were skipped and a few examples."""
    if skipped:
        examples = ", ".join(skipped[:3]) + (", ..." if len(skipped) > 3 else "")
        exts = sorted({os.path.splitext(s)[1].lower() or "(no extension)" for s in skipped})
        log.warning(
            "%s: skipped %d file(s) that are not images Pillow can decode, or lie outside a class folder "
            "(%s; extensions %s)%s",
            what, len(skipped), examples, exts, f" and {hidden} hidden file(s)" if hidden else "",
        )
    elif hidden:
        log.info("%s: skipped %d hidden file(s)", what, hidden)


# ---------------------------------------------------------------------------
# The folder loader.


@dataclasses.dataclass
class _Tree:
    """What :func:`_scan` found: image files per folder (path parts below the root) and skipped files."""

    root: str
    images: dict[tuple[str, ...], list[str]]
    skipped: list[tuple[tuple[str, ...], str]]  # (folder parts, file name)
    hidden: list[tuple[str, ...]]

    def example(self, depth: int) -> str:
        parts = min(p for p in self.images if len(p) == depth)
        return os.path.join(self.root, *parts, self.images[parts][0])


def _subdirs(path: str) -> list[str]:
    return sorted(e.name for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))


def _scan(root: str) -> _Tree:
    exts = set(image_extensions())
    images: dict[tuple[str, ...], list[str]] = {}
    skipped, hidden = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        rel = os.path.relpath(dirpath, root)
        parts = () if rel == "." else tuple(rel.split(os.sep))
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if len(parts) < MAX_DEPTH else []
        for name in sorted(filenames):
            if name.startswith("."):
                hidden.append(parts)
            elif os.path.splitext(name)[1].lower() in exts:
                images.setdefault(parts, []).append(name)
            else:
                skipped.append((parts, name))
    return _Tree(root, images, skipped, hidden)


EXPECTED = "root/<class>/<image> or root/<split>/<class>/<image> (a class folder holds its images directly)"


def _layout(tree: _Tree) -> str:
    """'split' when images sit two levels down (root/split/class/x), 'flat' when one; else a UserInputError."""
    root = tree.root
    depths = {len(p) for p in tree.images}
    deep = [d for d in depths if d >= 3]
    if deep:
        example = tree.example(min(deep))
        n_files = sum(len(f) for p, f in tree.images.items() if len(p) >= 3)
        raise UserInputError(
            f"image folder {root}: {n_files} images lie deeper than expected, e.g. {example} "
            f"({min(deep)} folders below the root); expected {EXPECTED.replace('root', root)}. Move the images up "
            "into their class folder, or point data.data_dir at the folder holding the class folders"
        )
    if 1 in depths and 2 in depths:
        direct, nested = tree.example(1), tree.example(2)
        raise UserInputError(
            f"{root} mixes layouts: images lie in class folders directly below the root (e.g. {direct}) and "
            f"in folders two levels down (e.g. {nested}); use {EXPECTED.replace('root', root)}"
        )
    if 2 in depths:
        return "split"
    if 1 in depths or _subdirs(root):
        return "flat"  # also: only empty class folders, reported by _class_files
    raise UserInputError(f"{root} has no class folders with images; expected {EXPECTED.replace('root', root)}")


def _class_files(tree: _Tree, prefix: tuple[str, ...], classes: list[str]) -> dict[str, list[str]]:
    """Image files per class folder below ``prefix``; an empty class folder is an error."""
    out = {}
    for c in classes:
        path = os.path.join(tree.root, *prefix, c)
        if not os.path.isdir(path):
            continue
        names = tree.images.get(prefix + (c,), [])
        if not names:
            raise UserInputError(
                f"class folder {path} has no images (any format Pillow decodes: .png, .jpg, .tif, .webp, ...)"
            )
        out[c] = [os.path.join(path, n) for n in names]
    return out


def decode(path: str, resize: SquareResizer | int = 0) -> np.ndarray:
    """One image file -> uint8 (H, W, 3), made square by ``resize`` (a SquareResizer or a load size, crop)."""
    if not isinstance(resize, SquareResizer):
        resize = SquareResizer(int(resize))
    img = to_rgb(open_image(path))
    return np.asarray(resize(img), dtype=np.uint8)


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


def load_image_folder(data_cfg: Any, split: str) -> ImageSplit:
    """The ``image_folder`` loader: see the module docstring."""
    s = FolderSettings.from_config(data_cfg)
    root = os.path.expanduser(str(s.data_dir or ""))
    if not root:
        raise UserInputError("data set 'image_folder' needs data.data_dir: the root folder of the images")
    if not os.path.isdir(root):
        raise UserInputError(f"image folder root {root} does not exist or is not a folder")
    resizer = SquareResizer.from_settings(s)
    max_image_pixels_of(s)  # validated before any decoding
    tree = _scan(root)

    if _layout(tree) == "split":
        splits = sorted({p[0] for p in tree.images if len(p) == 2})
        if split not in splits:
            raise UserInputError(
                f"image folder {root} has no split {split!r}; its images lie two levels down (e.g. "
                f"{tree.example(2)}), so it is read as {root}/<split>/<class>/<image> with splits {splits}"
            )
        classes = sorted({c for s in splits for c in _subdirs(os.path.join(root, s))})
        per_class = _class_files(tree, (split,), classes)
        files = [f for c in classes for f in per_class.get(c, [])]
        labels = np.array([i for i, c in enumerate(classes) for _ in per_class.get(c, [])], np.int64)
        region = split
    else:
        if split not in ("train", "test"):
            raise UserInputError(
                f"image folder {root} has no split folders, so it is split into ['test', 'train']; "
                f"no split {split!r}"
            )
        fraction = float(s.test_fraction)
        if not 0.0 < fraction < 1.0:
            raise UserInputError(f"data.test_fraction must be in (0, 1), got {fraction}")
        classes = _subdirs(root)
        per_class = _class_files(tree, (), classes)
        all_files = [f for c in classes for f in per_class[c]]
        all_labels = np.array([i for i, c in enumerate(classes) for _ in per_class[c]], np.int64)
        train_idx, test_idx = stratified_split(all_labels, fraction)
        idx = train_idx if split == "train" else test_idx
        files, labels = [all_files[i] for i in idx], all_labels[idx]
        region = None

    what = f"image folder {root} split {split!r}"

    def in_split(parts: tuple[str, ...]) -> bool:
        return region is None or not parts or parts[0] == region

    skipped = [os.path.join(*parts, name) for parts, name in tree.skipped if in_split(parts)]
    skipped += [os.path.join(*parts, name) for parts, names in tree.images.items() if not parts for name in names]
    report_skipped(what, sorted(skipped), sum(1 for parts in tree.hidden if in_split(parts)))
    with pixel_limit(s):
        images = stack_same_size([decode(f, resizer) for f in files], what)
    resizer.report(what)
    name = variant_name(
        "image_folder", os.path.abspath(root), resizer.size, float(s.test_fraction),
        *(() if resizer.mode == "crop" else (resizer.mode,)),
    )
    info = dict(resizer.info, skipped_files=len(skipped))
    return ImageSplit(name, split, images, labels, classes, info=info)
