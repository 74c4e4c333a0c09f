"""MVTec AD as a tfds builder prepared offline from the extracted archive.

The archive (https://www.mvtec.com/company/research/datasets/mvtec-ad, its
licence forbids redistribution) extracts to::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<good or defect type>/*.png
    <root>/<category>/ground_truth/<defect type>/<name>_mask.png

``<root>`` is ``data.mvtec_root`` (tfds' ``manual_dir``); each category is one
BuilderConfig, prepared into ``data.data_dir`` on first use, with no network. The
prepared copy records a listing of ``<root>/<category>`` (paths, sizes, mtimes) and is
re-prepared when that changes (``ssl_ad.data.provenance``); without ``mvtec_root`` the
prepared copy is used as is. Images may be in any format Pillow decodes (.png as
published, .tif, ...; masks ``<name>_mask.png`` or another image extension); other
files are skipped and counted, images nested deeper than the layout are refused, and
``data.max_image_pixels`` applies while decoding.

Features: ``image`` (native size, RGB; the grey categories are decoded to 3
channels), ``label`` (defect type index within the category, 'good' = 0, then
the category's defect types sorted), ``is_anomaly``, ``mask`` (H, W, 1) uint8
0/1 (zeros for good images; ground-truth PNGs are thresholded at 128),
``category`` and ``filename`` (``test/<defect>/<name>.png``). Splits: 'train'
(good only) and 'test'.

The loader (``data.category``: a name or 'all'; ``data.mvtec_root``;
``data.load_size``) returns an ImageSplit with ``is_anomaly`` and ``masks``
(N, H, W) uint8 0/1; images are made square by ``image_folder.fit_square``
(``data.resize_mode``: crop, pad or stretch; bicubic) and masks with nearest
neighbour by the same geometry. With 'all',
every category present (in ``mvtec_root``, or prepared in ``data_dir`` when no
root is given) is loaded, labels are category indices and ``class_names`` the
categories, so evaluation code can build the variant where all categories'
train/good images are normal and one category's defects anomalous.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds

from ssl_ad.errors import UserInputError

log = logging.getLogger(__name__)

# Defect types of each category, as in the published archive.
DEFECTS: dict[str, tuple[str, ...]] = {
    "bottle": ("broken_large", "broken_small", "contamination"),
    "cable": (
        "bent_wire", "cable_swap", "combined", "cut_inner_insulation", "cut_outer_insulation",
        "missing_cable", "missing_wire", "poke_insulation",
    ),
    "capsule": ("crack", "faulty_imprint", "poke", "scratch", "squeeze"),
    "carpet": ("color", "cut", "hole", "metal_contamination", "thread"),
    "grid": ("bent", "broken", "glue", "metal_contamination", "thread"),
    "hazelnut": ("crack", "cut", "hole", "print"),
    "leather": ("color", "cut", "fold", "glue", "poke"),
    "metal_nut": ("bent", "color", "flip", "scratch"),
    "pill": ("color", "combined", "contamination", "crack", "faulty_imprint", "pill_type", "scratch"),
    "screw": ("manipulated_front", "scratch_head", "scratch_neck", "thread_side", "thread_top"),
    "tile": ("crack", "glue_strip", "gray_stroke", "oil", "rough"),
    "toothbrush": ("defective",),
    "transistor": ("bent_lead", "cut_lead", "damaged_case", "misplaced"),
    "wood": ("color", "combined", "hole", "liquid", "scratch"),
    "zipper": ("broken_teeth", "combined", "fabric_border", "fabric_interior", "rough", "split_teeth", "squeezed_teeth"),
}
CATEGORIES: tuple[str, ...] = tuple(DEFECTS)


@dataclasses.dataclass(eq=False)
class MvtecConfig(tfds.core.BuilderConfig):
    """One MVTec AD category; ``label`` names are 'good' then its defect types."""

    defects: tuple[str, ...] = ()


class MvtecAd(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """MVTec AD, one config per category, from a local copy of the archive."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Images, defect labels and 0/1 masks of the 15 categories."}
    BUILDER_CONFIGS = [MvtecConfig(name=c, description=f"MVTec AD category {c}", defects=DEFECTS[c]) for c in CATEGORIES]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download mvtec_anomaly_detection.tar.xz from MVTec, extract it, and pass the folder holding "
        "the category folders (bottle/, cable/, ...) as manual_dir (data.mvtec_root)."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=("good",) + tuple(self.builder_config.defects)),
                    "is_anomaly": tfds.features.Scalar(np.bool_),
                    "mask": tfds.features.Image(shape=(None, None, 1), encoding_format="png"),
                    "category": tfds.features.ClassLabel(names=CATEGORIES),
                    "filename": tfds.features.Text(),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        root = os.path.join(os.fspath(dl_manager.manual_dir), self.builder_config.name)
        if not os.path.isdir(root):
            raise UserInputError(f"MVTec AD category folder {root} does not exist")
        return {"train": self._generate_examples(root, "train"), "test": self._generate_examples(root, "test")}

    def _generate_examples(self, root: str, split: str):
        cfg = self.builder_config
        names = ("good",) + tuple(cfg.defects)
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise UserInputError(f"MVTec AD folder {split_dir} does not exist")
        kinds = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
        unknown = [k for k in kinds if k not in names]
        if unknown or (split == "train" and kinds != ["good"]):
            allowed = ["good"] if split == "train" else list(names)
            raise UserInputError(
                f"MVTec AD folder {split_dir} has unexpected folders {unknown or kinds}; {cfg.name} allows {allowed}"
            )
        from ssl_ad.data.image_folder import image_extensions, report_skipped

        exts = set(image_extensions())
        skipped = sorted(f"{split}/{f}" for f in os.listdir(split_dir)
                         if os.path.isfile(os.path.join(split_dir, f)) and not f.startswith("."))
        for kind in kinds:
            folder = os.path.join(split_dir, kind)
            entries = sorted(f for f in os.listdir(folder) if not f.startswith("."))
            files = [f for f in entries if os.path.splitext(f)[1].lower() in exts and os.path.isfile(os.path.join(folder, f))]
            skipped += [f"{split}/{kind}/{f}" for f in entries if f not in files and os.path.isfile(os.path.join(folder, f))]
            deeper = _images_below(folder, exts)
            if deeper:
                raise UserInputError(
                    f"MVTec AD images lie deeper than expected, e.g. {deeper}; expected "
                    f"{root}/{split}/<good or defect type>/<image> (a defect-type folder holds its images directly)"
                )
            if not files:
                raise UserInputError(f"MVTec AD folder {folder} has no images (.png, or any format Pillow decodes)")
            for fname in files:
                rel = f"{split}/{kind}/{fname}"
                image, size = _image(os.path.join(folder, fname))
                if kind == "good":
                    mask = np.zeros((size[1], size[0], 1), np.uint8)
                else:
                    stem = os.path.splitext(fname)[0]
                    mask = _mask(_mask_path(os.path.join(root, "ground_truth", kind), stem, exts), size)
                yield rel, {
                    "image": image,
                    "label": names.index(kind),
                    "is_anomaly": kind != "good",
                    "mask": mask,
                    "category": cfg.name,
                    "filename": rel,
                }
        report_skipped(f"mvtec_ad/{cfg.name} {split_dir}", skipped)


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


def _mask_path(folder: str, stem: str, exts: set[str]) -> str:
    """``<stem>_mask.png``, or the same name with another image extension when only that exists."""
    png = os.path.join(folder, f"{stem}_mask.png")
    if os.path.isfile(png) or not os.path.isdir(folder):
        return png
    for f in sorted(os.listdir(folder)):
        base, ext = os.path.splitext(f)
        if base == f"{stem}_mask" and ext.lower() in exts:
            return os.path.join(folder, f)
    return png


def _image(path: str):
    """(path or RGB array for tfds, (width, height)); only non-RGB/grey or non-PNG files are re-encoded."""
    from ssl_ad.data.image_folder import open_image, to_rgb

    head = open_image(path, load=False)
    if head.format == "PNG" and head.mode in ("RGB", "L"):
        return path, head.size
    img = open_image(path)
    return np.asarray(to_rgb(img), np.uint8), img.size


def _mask(path: str, size: tuple[int, int]) -> np.ndarray:
    from ssl_ad.data.image_folder import open_image

    if not os.path.isfile(path):
        raise UserInputError(f"MVTec AD ground-truth mask {path} is missing")
    img = open_image(path, "mask")
    arr = np.asarray(img.convert("L"))
    if (arr.shape[1], arr.shape[0]) != tuple(size):
        raise UserInputError(f"mask {path} is {arr.shape[1]}x{arr.shape[0]}, its image {size[0]}x{size[1]}")
    return (arr >= 128).astype(np.uint8)[..., None]


# ---------------------------------------------------------------------------
# Loader.


def _builder(category: str, data_cfg: Any) -> MvtecAd:
    """The prepared builder of ``category``, (re-)prepared from ``data.mvtec_root`` when it changed."""
    from ssl_ad.data import provenance
    from ssl_ad.data.image_folder import pixel_limit
    from ssl_ad.data.sources import data_dir_of

    def make() -> MvtecAd:
        return MvtecAd(config=category, data_dir=data_dir_of(data_cfg))

    root = os.path.expanduser(str(data_cfg.get("mvtec_root", "") or ""))
    src = os.path.join(root, category) if root else ""
    source = None
    if src and os.path.isdir(src):
        source = {
            "config": {"builder": "mvtec_ad", "category": category, "version": str(MvtecAd.VERSION)},
            "files": provenance.file_listing(src),
        }
    elif not make().is_prepared():
        if not root:
            raise UserInputError(
                f"MVTec AD category {category!r} is not prepared in {make().data_dir}; set data.mvtec_root "
                "to the extracted archive (the folder holding bottle/, cable/, ...) to prepare it offline"
            )
        raise UserInputError(f"MVTec AD category folder {src} does not exist")

    def prepare(builder: MvtecAd) -> None:
        with pixel_limit(data_cfg):
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))

    return provenance.ensure_prepared(make, f"mvtec_ad/{category}", source, prepare, where=src)


def _present(data_cfg: Any) -> list[str]:
    from ssl_ad.data.sources import data_dir_of

    root = os.path.expanduser(str(data_cfg.get("mvtec_root", "") or ""))
    if root:
        if not os.path.isdir(root):
            raise UserInputError(f"data.mvtec_root {root} does not exist")
        found = [c for c in CATEGORIES if os.path.isdir(os.path.join(root, c))]
        where = root
    else:
        base = os.path.join(data_dir_of(data_cfg), "mvtec_ad")
        found = [c for c in CATEGORIES if MvtecAd(config=c, data_dir=data_dir_of(data_cfg)).is_prepared()]
        where = base
    if not found:
        raise UserInputError(f"no MVTec AD category found in {where}; expected folders among {list(CATEGORIES)}")
    return found


def _read(builder: MvtecAd, split: str, resize):
    """Images, labels, anomaly flags and masks of ``split``, resized by ``resize`` (a SquareResizer)."""
    from PIL import Image

    images, labels, anomalous, masks = [], [], [], []
    ds = builder.as_dataset(split=split, shuffle_files=False)
    for ex in tfds.as_numpy(ds):
        images.append(np.asarray(resize(Image.fromarray(ex["image"])), np.uint8))
        m = resize(Image.fromarray(ex["mask"][..., 0]), nearest=True)  # same geometry as the image
        masks.append(np.asarray(m, np.uint8))
        labels.append(int(ex["label"]))
        anomalous.append(bool(ex["is_anomaly"]))
    return images, labels, anomalous, masks


def load_mvtec_ad(data_cfg: Any, split: str):
    """The ``mvtec_ad`` loader: see the module docstring."""
    from ssl_ad.data.image_folder import (
        SquareResizer,
        max_image_pixels_of,
        stack_same_size,
    )
    from ssl_ad.data.sources import ImageSplit

    if split not in ("train", "test"):
        raise UserInputError(f"data set 'mvtec_ad' has no split {split!r}; it has ['test', 'train']")
    category = str(data_cfg.get("category", "") or "")
    if category != "all" and category not in DEFECTS:
        raise UserInputError(f"data.category must be one of {list(CATEGORIES)} or 'all', got {category!r}")
    resize = SquareResizer.from_config(data_cfg)
    max_image_pixels_of(data_cfg)  # validated before any decoding
    categories = _present(data_cfg) if category == "all" else [category]

    images, labels, anomalous, masks = [], [], [], []
    class_names: list[str] = []
    for ci, cat in enumerate(categories):
        builder = _builder(cat, data_cfg)
        im, lab, an, ma = _read(builder, split, resize)
        images += im
        anomalous += an
        masks += ma
        labels += [ci] * len(lab) if category == "all" else lab
        if category != "all":
            class_names = list(builder.info.features["label"].names)
    if category == "all":
        class_names = categories
    what = f"mvtec_ad/{category} split {split!r}"
    resize.report(what)
    name = f"mvtec_ad_{category}" + (f"_{resize.size}px" if resize.size else "")
    if resize.size and resize.mode != "crop":
        name += f"_{resize.mode}"
    return ImageSplit(
        name,
        split,
        stack_same_size(images, what),
        np.asarray(labels, np.int64),
        class_names,
        is_anomaly=np.asarray(anomalous, bool),
        masks=stack_same_size([m[..., None] for m in masks], what)[..., 0] if masks else np.zeros((0, 0, 0), np.uint8),
        info=resize.info,
    )
