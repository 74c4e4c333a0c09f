"""An anomaly-detection data set from plain folders, as anomalib's ``Folder`` data module.

For data that is not in the MVTec AD layout (``ssl_ad.data.mvtec_ad``), the
folders are named one by one (anomalib ``Folder``: ``normal_dir``,
``abnormal_dir``, ``mask_dir``, ``normal_test_dir``, ``normal_split_ratio``):

* ``data.normal_dir``: the normal (good) images;
* ``data.abnormal_dirs``: one folder or a tuple of folders of anomalous images;
  each folder's name is a defect type;
* ``data.mask_dir`` (optional): ground-truth masks of the anomalous images,
  matched by file stem: ``<stem>.png`` / ``<stem>_mask.png`` (or another image
  extension; a folder ``<stem>/`` of several masks is their union, as MVTec
  LOCO ships them). One folder for every abnormal folder (stems must then be
  unique across them), or a tuple parallel to ``abnormal_dirs`` with ``''`` for
  a folder without masks;
* ``data.normal_test_dir`` (optional): normal test images; without it
  ``data.normal_test_fraction`` (default 0.2, anomalib's ``normal_split_ratio``)
  of ``normal_dir`` is held out for 'test': the files are sorted, permuted with
  seed 0 and the first ``round(n * fraction)`` (half up) are held out, as
  ``image_folder``'s flat split (:func:`ssl_ad.data.image_folder.stratified_split`).

Relative paths are relative to ``data.data_dir`` when it is set (anomalib's
``root``), else to the working directory. Each folder holds its images
directly (any format Pillow decodes); images in sub-folders are refused naming
one, other files are skipped and counted.

Splits: 'train' (normal images only) and 'test' (held-out or ``normal_test_dir``
normals, then every abnormal image). ``class_names`` = ['good', defect types
sorted]; labels index them; ``is_anomaly`` = label > 0. ``masks`` (N, H, W)
uint8 0/1 at the loaded size (thresholded at 128, resized nearest-neighbour
with the image's geometry) when ``mask_dir`` is given, zeros for normal images
and for the abnormal folders without masks (named in
``info['defects_without_masks']``, and ``mask_valid`` False for their images, which
pixel metrics leave out); ``None`` without ``mask_dir`` (the evaluation then skips
pixel maps and reports image-level metrics only).

The mask helpers (:func:`mask_index`, :func:`mask_files`, :func:`read_mask`,
:func:`folder_images`) are shared with the MVTec AD loader.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np
from PIL import Image

from ssl_ad.data.image_folder import (
    ImageSettings,
    SquareResizer,
    image_extensions,
    max_image_pixels_of,
    open_image,
    pixel_limit,
    report_skipped,
    stack_same_size,
    stratified_split,
    to_rgb,
    variant_name,
)
from ssl_ad.data.split import ImageSplit
from ssl_ad.errors import UserInputError

log = logging.getLogger(__name__)

NORMAL = "good"  # class 0, as MVTec AD names its normal images


@dataclasses.dataclass(frozen=True)
class AnomalyFolderSettings(ImageSettings):
    """The ``data.*`` keys of the ``folder`` data set and their defaults (see the module doc)."""

    normal_dir: str = ""  # required
    abnormal_dirs: tuple[str, ...] | str = ()  # required: one folder or several; folder name = defect type
    mask_dir: tuple[str, ...] | str = ""  # '': no masks; one folder, or one per abnormal dir ('' = none)
    normal_test_dir: str = ""  # '': hold out normal_test_fraction of normal_dir instead
    normal_test_fraction: float = 0.2  # anomalib's normal_split_ratio


# ---------------------------------------------------------------------------
# Helpers shared with the MVTec AD loader.


def folder_images(folder: str, what: str, expected: str = "") -> tuple[list[str], list[str]]:
    """(sorted image file names directly in ``folder``, other non-hidden file names).

    ``expected`` (e.g. ``<root>/test/<good or defect type>/<image>``) is named when images lie deeper.

    Raises:
      UserInputError: when ``folder`` is not a folder, has no images, or has images in a
        sub-folder (a folder holds its images directly).
    """
    if not os.path.isdir(folder):
        raise UserInputError(f"{what} {folder} does not exist or is not a folder")
    exts = set(image_extensions())
    entries = sorted(f for f in os.listdir(folder) if not f.startswith("."))
    files = [f for f in entries if os.path.splitext(f)[1].lower() in exts and os.path.isfile(os.path.join(folder, f))]
    others = [f for f in entries if f not in files and os.path.isfile(os.path.join(folder, f))]
    deeper = _images_below(folder, exts)
    if deeper:
        raise UserInputError(
            f"{what} {folder}: images lie in a sub-folder, e.g. {deeper}; "
            + (f"expected {expected} " if expected else "")
            + "(a folder holds its images directly: move them up, or name the sub-folder itself)"
        )
    if not files:
        raise UserInputError(f"{what} {folder} has no images (.png, or any format Pillow decodes)")
    return files, others


def _images_below(folder: str, exts: set[str]) -> str:
    """The first image file in a sub-folder of ``folder`` (any depth), or ''."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if dirpath == folder:
            continue
        for f in sorted(filenames):
            if os.path.splitext(f)[1].lower() in exts and not f.startswith("."):
                return os.path.join(dirpath, f)
    return ""


@dataclasses.dataclass(frozen=True)
class MaskIndex:
    """The image files of one mask folder by name without extension, and its sub-folders."""

    folder: str
    by_base: dict[str, list[str]]  # 'x_mask' -> ['x_mask.png', 'x_mask.tif']
    subdirs: frozenset[str]


def mask_index(folder: str) -> MaskIndex:
    """Lists ``folder`` once for :func:`mask_files` (an absent folder is an empty index)."""
    exts = set(image_extensions())
    by_base: dict[str, list[str]] = {}
    subdirs = set()
    if os.path.isdir(folder):
        for f in sorted(os.listdir(folder)):
            if f.startswith("."):
                continue
            path = os.path.join(folder, f)
            base, ext = os.path.splitext(f)
            if os.path.isdir(path):
                subdirs.add(f)
            elif ext.lower() in exts:
                by_base.setdefault(base, []).append(f)
    return MaskIndex(folder, by_base, frozenset(subdirs))


def mask_files(index: MaskIndex, stem: str) -> tuple[str, ...]:
    """The ground-truth file(s) of the image named ``stem``, () when there is none.

    Looked for in this order: ``<stem>_mask.png`` (MVTec AD, MPDD), ``<stem>_mask.<ext>``,
    ``<stem>.png`` / ``<stem>.<ext>`` (BTAD, anomalib ``Folder``), and a folder ``<stem>/`` whose
    images are all masks of that image (MVTec LOCO AD: one file per defect region; their union).
    """
    for base in (f"{stem}_mask", stem):
        names = index.by_base.get(base, [])
        if names:
            png = [n for n in names if os.path.splitext(n)[1].lower() == ".png"]
            return (os.path.join(index.folder, (png or names)[0]),)
    if stem in index.subdirs:
        sub = os.path.join(index.folder, stem)
        exts = set(image_extensions())
        found = sorted(f for f in os.listdir(sub) if not f.startswith(".") and os.path.splitext(f)[1].lower() in exts)
        return tuple(os.path.join(sub, f) for f in found)
    return ()


def read_mask(paths: tuple[str, ...], size: tuple[int, int]) -> np.ndarray:
    """The union of the masks ``paths`` as (H, W) uint8 0/1 (grey value >= 128 is anomalous).

    ``size`` is the image's (width, height).

    Raises:
      UserInputError: when a mask cannot be decoded or its size differs from its image's.
    """
    out = np.zeros((size[1], size[0]), np.uint8)
    for path in paths:
        arr = np.asarray(open_image(path, "mask").convert("L"))
        if (arr.shape[1], arr.shape[0]) != tuple(size):
            raise UserInputError(f"mask {path} is {arr.shape[1]}x{arr.shape[0]}, its image {size[0]}x{size[1]}")
        out |= (arr >= 128).astype(np.uint8)
    return out


def decode_pair(path: str, masks: tuple[str, ...] | None, resize: SquareResizer) -> tuple[np.ndarray, np.ndarray]:
    """One image (H, W, 3) uint8 and its mask (H, W) uint8 0/1, both made square by ``resize``
    (bicubic / nearest, same geometry). ``masks`` () or None: an all-zero mask."""
    img = open_image(path)
    mask = read_mask(masks, img.size) if masks else np.zeros((img.size[1], img.size[0]), np.uint8)
    image = np.asarray(resize(to_rgb(img)), np.uint8)
    return image, np.asarray(resize(Image.fromarray(mask), nearest=True), np.uint8)


# ---------------------------------------------------------------------------
# The loader.


def _folders(value: Any, key: str) -> tuple[str, ...]:
    """A folder key given as one string or a tuple/list of strings -> tuple."""
    if value is None or value == "":
        return ()
    items = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(v, str) for v in items):
        raise UserInputError(f"data.{key} must be a folder or a tuple of folders (strings), got {value!r}")
    return items


def _resolve(path: str, base: str) -> str:
    path = os.path.expanduser(path)
    return os.path.join(base, path) if base and not os.path.isabs(path) else path


@dataclasses.dataclass
class _Plan:
    """One split: (image path, label, mask files or None) in order, what was skipped, the class names,
    the defect types without masks, whether masks were given, and the resolved folders (for the name)."""

    items: list[tuple[str, int, tuple[str, ...] | None]]
    skipped: list[str]
    class_names: list[str]
    without: list[str]
    with_masks: bool
    folders: tuple[str, ...]


def _abnormal(s: AnomalyFolderSettings, base: str) -> tuple[list[str], list[str], list[str]]:
    """(abnormal folders, their defect names, their mask folders or '')."""
    dirs = [_resolve(d, base) for d in _folders(s.abnormal_dirs, "abnormal_dirs")]
    if not dirs:
        raise UserInputError(
            "data set 'folder' needs data.abnormal_dirs: the folder(s) of anomalous test images, e.g. "
            "data.abnormal_dirs=('test/crack', 'test/scratch'); each folder's name is a defect type"
        )
    names = [os.path.basename(os.path.normpath(d)) for d in dirs]
    if NORMAL in names:
        raise UserInputError(f"data.abnormal_dirs: a folder named {NORMAL!r} ({dirs[names.index(NORMAL)]}) would be "
                             "a defect type with the normal class's name; rename it")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise UserInputError(f"data.abnormal_dirs has several folders named {dup[0]!r} ("
                             f"{[d for d, n in zip(dirs, names) if n == dup[0]]}); a folder's name is its defect "
                             "type, so they must differ")
    raw = _folders(s.mask_dir, "mask_dir")
    if len(raw) <= 1:
        masks = [_resolve(raw[0], base) if raw and raw[0] else ""] * len(dirs)
    elif len(raw) == len(dirs):
        masks = [_resolve(m, base) if m else "" for m in raw]
    else:
        raise UserInputError(f"data.mask_dir has {len(raw)} folders for {len(dirs)} data.abnormal_dirs; give one "
                             "mask folder, or one per abnormal folder ('' for a folder without masks)")
    for m in sorted(set(masks) - {""}):
        if not os.path.isdir(m):
            raise UserInputError(f"data.mask_dir {m} does not exist or is not a folder")
    return dirs, names, masks


def _plan(s: AnomalyFolderSettings, split: str) -> _Plan:
    """The files of ``split`` and what the split records about them (see :class:`_Plan`)."""
    base = os.path.expanduser(str(s.data_dir or ""))
    if not s.normal_dir:
        raise UserInputError("data set 'folder' needs data.normal_dir: the folder of normal (good) images")
    normal_dir = _resolve(str(s.normal_dir), base)
    dirs, names, mask_dirs = _abnormal(s, base)
    order = sorted(range(len(dirs)), key=lambda i: names[i])
    class_names = [NORMAL] + [names[i] for i in order]
    with_masks = any(mask_dirs)
    without = sorted(names[i] for i in range(len(dirs)) if not mask_dirs[i]) if with_masks else []
    no_mask: tuple[str, ...] | None = () if with_masks else None

    normal, other = folder_images(normal_dir, "data.normal_dir")
    skipped = [os.path.join(normal_dir, f) for f in other]
    if s.normal_test_dir:
        test_dir = _resolve(str(s.normal_test_dir), base)
        test_normal, other = folder_images(test_dir, "data.normal_test_dir")
        train_files = [os.path.join(normal_dir, f) for f in normal]
        test_files = [os.path.join(test_dir, f) for f in test_normal]
        if split == "test":
            skipped = [os.path.join(test_dir, f) for f in other]
    else:
        fraction = float(s.normal_test_fraction)
        if not 0.0 < fraction < 1.0:
            raise UserInputError(f"data.normal_test_fraction must be in (0, 1), got {fraction}")
        train_idx, test_idx = stratified_split(np.zeros(len(normal), np.int64), fraction)
        if not train_idx.size or not test_idx.size:
            raise UserInputError(
                f"data.normal_dir {normal_dir} has {len(normal)} images: holding out data.normal_test_fraction="
                f"{fraction} of them leaves {train_idx.size} for 'train' and {test_idx.size} for 'test'; add "
                "normal images, change the fraction, or give data.normal_test_dir"
            )
        train_files = [os.path.join(normal_dir, normal[i]) for i in train_idx]
        test_files = [os.path.join(normal_dir, normal[i]) for i in test_idx]
    folders = tuple(os.path.abspath(p) if p else "" for p in [normal_dir, *dirs, *mask_dirs,
                                                              _resolve(str(s.normal_test_dir or ""), base)])
    if split == "train":
        return _Plan([(f, 0, no_mask) for f in train_files], skipped, class_names, without, with_masks, folders)

    items: list[tuple[str, int, tuple[str, ...] | None]] = [(f, 0, no_mask) for f in test_files]
    seen: dict[tuple[str, str], str] = {}  # (mask folder, stem) -> image, for one mask folder shared by several
    for label, i in enumerate(order, start=1):
        files, other = folder_images(dirs[i], "data.abnormal_dirs folder")
        skipped += [os.path.join(dirs[i], f) for f in other]
        index = mask_index(mask_dirs[i]) if mask_dirs[i] else None
        for f in files:
            path = os.path.join(dirs[i], f)
            masks = no_mask
            if index is not None:
                stem = os.path.splitext(f)[0]
                key = (mask_dirs[i], stem)
                if key in seen:
                    raise UserInputError(
                        f"images {seen[key]} and {path} share the stem {stem!r} and the mask folder {mask_dirs[i]}, "
                        "so their masks cannot be told apart; give data.mask_dir one folder per abnormal folder"
                    )
                seen[key] = path
                masks = mask_files(index, stem)
                if not masks:
                    raise UserInputError(
                        f"no ground-truth mask for {path} in data.mask_dir {mask_dirs[i]}: expected {stem}.png or "
                        f"{stem}_mask.png (or another image extension, or a folder {stem}/ of masks); for a folder "
                        "without masks give data.mask_dir one entry per abnormal folder, '' for that one"
                    )
            items.append((path, label, masks))
    return _Plan(items, skipped, class_names, without, with_masks, folders)


def load_folder(data_cfg: Any, split: str) -> ImageSplit:
    """The ``folder`` loader: ``split`` ('train' or 'test') as an ImageSplit; see the module doc.

    Raises:
      UserInputError: for an unknown split, a missing or empty folder, images in sub-folders, a missing
        or mis-sized mask, or a ``normal_test_fraction`` that leaves a split without normal images.
    """
    s = AnomalyFolderSettings.from_config(data_cfg)
    if split not in ("train", "test"):
        raise UserInputError(f"data set 'folder' has no split {split!r}; it has ['test', 'train']")
    resize = SquareResizer.from_settings(s)
    max_image_pixels_of(s)  # validated before any decoding
    plan = _plan(s, split)
    what = f"folder data set split {split!r}"
    report_skipped(what, sorted(plan.skipped))
    if split == "test" and plan.without:
        log.warning(
            "%s: defect type(s) %s have no masks: their images are left out of pixel AUROC and PRO "
            "(ImageSplit.mask_valid); image-level metrics use them", what, plan.without,
        )
    images, masks = [], []
    with pixel_limit(s):
        for path, _, mask in plan.items:
            image, m = decode_pair(path, mask, resize)
            images.append(image)
            masks.append(m)
    resize.report(what)
    labels = np.asarray([label for _, label, _ in plan.items], np.int64)
    name = variant_name("folder", *plan.folders, float(s.normal_test_fraction), resize.size,
                        *(() if resize.mode == "crop" else (resize.mode,)))
    return ImageSplit(
        name,
        split,
        stack_same_size(images, what),
        labels,
        plan.class_names,
        is_anomaly=labels > 0,
        masks=stack_same_size([m[..., None] for m in masks], what)[..., 0] if plan.with_masks else None,
        info=dict(resize.info, defects_without_masks=plan.without, skipped_files=len(plan.skipped)),
        mask_valid=(np.asarray([label == 0 or bool(mask) for _, label, mask in plan.items], bool)
                    if plan.with_masks and plan.without else None),
    )
