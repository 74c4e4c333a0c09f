"""Single-label images of chosen COCO 2017 categories, as a tfds builder prepared offline.

Reads the files users download from cocodataset.org::

    <root>/annotations/instances_train2017.json   <root>/train2017/*.jpg
    <root>/annotations/instances_val2017.json     <root>/val2017/*.jpg

``<root>`` is ``data.coco_root`` (tfds' ``manual_dir``); the set is prepared
into ``data.data_dir`` with no network. The prepared copy records a listing of the
two annotation files and the two image folders (paths, sizes, mtimes) and is
re-prepared when that changes (``ssl_ad.data.provenance``); without ``coco_root``
the prepared copy is used as is. Split 'train' comes from train2017,
'test' from val2017.

Classes are either categories (``data.categories``, default the study's
'bicycle', 'tv', 'banana', 'traffic light', 'pizza') or, when
``data.supercategories`` is non-empty, supercategories (e.g. 'vehicle',
'food'); label i is the i-th name in the order given.

Single-label rule: an instance *counts* when its category is in the chosen set,
it is not a crowd annotation (iscrowd 0) and its (segmentation) area is at
least ``data.min_area`` pixels (default 1024 = 32x32). An image is kept only
when all its counting instances belong to ONE class; images with counting
instances of two or more classes are dropped, and so are images with none
(all chosen-set objects crowd or smaller than ``min_area``). Crowd and tiny
instances of another chosen class do not disqualify an image, so they may still
be visible in it. (The original study labelled an image by its first matching
annotation, which mislabelled images showing several chosen classes.)

Each BuilderConfig carries the class list, whether it names categories or
supercategories, and ``min_area`` (which decide which images are kept); the
config name is derived from them. Per example the builder stores the original
JPEG, ``label``, ``bbox`` (x, y, w, h in pixels of the largest counting
instance) and ``image_id``.

Loader keys: ``data.coco_root``, ``data.categories``, ``data.supercategories``,
``data.min_area``, ``data.crop_to_box`` (crop to a square around ``bbox`` with
``data.box_margin`` of the box's longer side added on every side, see
``image_folder.crop_box``), ``data.load_size`` and ``data.resize_mode``
(``image_folder.fit_square``; COCO images differ in size, so 0 only works when they
happen to agree), ``data.max_image_pixels`` (Pillow's limit while preparing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import re
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ssl_ad.data import provenance
from ssl_ad.data.image_folder import (
    ImageSettings,
    SquareResizer,
    crop_box,
    max_image_pixels_of,
    open_image,
    pixel_limit,
    stack_same_size,
    to_rgb,
    variant_name,
)
from ssl_ad.data.split import ImageSplit
from ssl_ad.errors import UserInputError

log = logging.getLogger(__name__)

STUDY_CATEGORIES: tuple[str, ...] = ("bicycle", "tv", "banana", "traffic light", "pizza")
DEFAULT_MIN_AREA = 1024
PARTS = {"train": "train2017", "test": "val2017"}


@dataclasses.dataclass(eq=False)
class CocoConfig(tfds.core.BuilderConfig):
    """Which images are kept: ``classes`` at ``level`` ('category' or 'supercategory'), ``min_area``."""

    classes: tuple[str, ...] = STUDY_CATEGORIES
    level: str = "category"
    min_area: int = DEFAULT_MIN_AREA


def config_name(classes: tuple[str, ...], level: str, min_area: int) -> str:
    """Readable, folder-safe name, e.g. 'cat-bicycle_tv_banana_traffic_light_pizza-min1024'."""
    body = "_".join(re.sub(r"[^a-z0-9]+", "_", c.lower()).strip("_") for c in classes)
    if len(body) > 60:
        body = body[:50] + "_" + hashlib.sha1("|".join(classes).encode()).hexdigest()[:8]
    return f"{level[:3]}-{body}-min{int(min_area)}"


def make_config(classes: tuple[str, ...], level: str = "category", min_area: int = DEFAULT_MIN_AREA) -> CocoConfig:
    name = config_name(classes, level, min_area)
    for c in Coco2017.BUILDER_CONFIGS:  # tfds refuses a new object named like a registered config
        if c.name == name:
            return c
    return CocoConfig(
        name=name,
        description=f"COCO 2017 single-label images of {level}s {list(classes)}, instances >= {min_area} px",
        classes=tuple(classes),
        level=level,
        min_area=int(min_area),
    )


class Coco2017(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Single-label COCO 2017 images of a chosen class set, from a local copy."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "Single-label rule over non-crowd instances >= min_area."}
    BUILDER_CONFIGS = [
        CocoConfig(
            name=config_name(STUDY_CATEGORIES, "category", DEFAULT_MIN_AREA),
            description="The study's five categories, single-label images, instances >= 1024 px",
        )
    ]
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        "Download train2017.zip, val2017.zip and annotations_trainval2017.zip from cocodataset.org, "
        "extract them into one folder (annotations/, train2017/, val2017/) and pass it as manual_dir "
        "(data.coco_root)."
    )

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(None, None, 3), encoding_format="jpeg"),
                    "label": tfds.features.ClassLabel(names=list(self.builder_config.classes)),
                    "bbox": tfds.features.Tensor(shape=(4,), dtype=np.float32),
                    "image_id": tfds.features.Scalar(np.int64),
                }
            ),
            supervised_keys=("image", "label"),
        )

    def _split_generators(self, dl_manager):
        root = os.fspath(dl_manager.manual_dir)
        return {split: self._generate_examples(root, part) for split, part in PARTS.items()}

    def _generate_examples(self, root: str, part: str):
        cfg = self.builder_config
        for image_id, file_name, label, bbox in select_images(root, part, cfg.classes, cfg.level, cfg.min_area):
            path = os.path.join(root, part, file_name)
            yield image_id, {
                "image": _image(path),
                "label": label,
                "bbox": np.asarray(bbox, np.float32),
                "image_id": image_id,
            }


def select_images(root: str, part: str, classes, level: str, min_area: int):
    """(image_id, file_name, label, bbox) of the kept images of ``part``, by image id (see module doc)."""
    ann_path = os.path.join(root, "annotations", f"instances_{part}.json")
    if not os.path.isfile(ann_path):
        raise UserInputError(f"COCO annotation file {ann_path} is missing")
    try:
        with open(ann_path, "rb") as f:
            coco = json.load(f)
    except (OSError, ValueError) as e:
        raise UserInputError(f"cannot read COCO annotation file {ann_path}: {e}") from None
    key = "name" if level == "category" else "supercategory"
    available = sorted({c[key] for c in coco["categories"]})
    missing = [c for c in classes if c not in available]
    if missing:
        raise UserInputError(f"COCO has no {level} {missing}; available: {available}")
    class_of = {c["id"]: classes.index(c[key]) for c in coco["categories"] if c[key] in classes}

    counting: dict[int, list[tuple[int, float, list[float]]]] = {}
    for a in coco["annotations"]:
        cls = class_of.get(a["category_id"])
        if cls is None or a.get("iscrowd", 0) or float(a.get("area", 0.0)) < min_area:
            continue
        counting.setdefault(a["image_id"], []).append((cls, float(a["area"]), a["bbox"]))
    files = {im["id"]: im["file_name"] for im in coco["images"]}
    kept = 0
    for image_id in sorted(counting):
        instances = counting[image_id]
        if len({cls for cls, _, _ in instances}) != 1:
            continue
        cls, _, bbox = max(instances, key=lambda t: t[1])
        if image_id not in files:
            raise UserInputError(f"{ann_path}: annotation for image id {image_id}, which is not listed in 'images'")
        kept += 1
        yield int(image_id), files[image_id], cls, bbox
    log.info("COCO %s: kept %d single-label images of %s", part, kept, list(classes))


def _image(path: str):
    """The file path (stored as is) or, for files TF would not decode to RGB, an RGB array."""
    if not os.path.isfile(path):
        raise UserInputError(f"COCO image {path} is missing")
    head = open_image(path, load=False)
    if head.format in ("JPEG", "PNG") and head.mode in ("RGB", "L"):
        return path
    return np.asarray(to_rgb(open_image(path)), np.uint8)


# ---------------------------------------------------------------------------
# Loader.


@dataclasses.dataclass(frozen=True)
class CocoSettings(ImageSettings):
    """The ``data.*`` keys of coco2017 and their defaults (plus ``data_dir`` and the image keys)."""

    coco_root: str = ""  # holds annotations/, train2017/, val2017/; '': use the prepared copy as it is
    categories: tuple[str, ...] = STUDY_CATEGORIES  # empty: STUDY_CATEGORIES
    supercategories: tuple[str, ...] = ()  # non-empty: classes are these supercategories (categories ignored)
    min_area: int = DEFAULT_MIN_AREA  # pixels; smaller instances do not count
    crop_to_box: bool = False  # crop to a square around the largest counting instance
    box_margin: float = 0.1  # with crop_to_box: added on every side, as a fraction of the box's longer side


def _as_tuple(value) -> tuple[str, ...]:
    if not value:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


def config_from(s: CocoSettings) -> CocoConfig:
    """The builder config (classes, level, min_area) that ``s`` selects."""
    supercats = _as_tuple(s.supercategories)
    cats = _as_tuple(s.categories) or STUDY_CATEGORIES
    classes, level = (supercats, "supercategory") if supercats else (cats, "category")
    if len(set(classes)) != len(classes):
        raise UserInputError(f"data.{level.replace('category', 'categories')} has duplicates: {list(classes)}")
    min_area = int(s.min_area)
    if min_area < 0:
        raise UserInputError(f"data.min_area must be >= 0, got {min_area}")
    return make_config(classes, level, min_area)


def load_coco2017(data_cfg: Any, split: str) -> ImageSplit:
    """The ``coco2017`` loader: see the module docstring."""
    s = CocoSettings.from_config(data_cfg)
    if split not in PARTS:
        raise UserInputError(f"data set 'coco2017' has no split {split!r}; it has {sorted(PARTS)}")
    cfg = config_from(s)
    resize = SquareResizer.from_settings(s)  # keys validated before any preparation
    max_image_pixels_of(s)
    crop = bool(s.crop_to_box)
    margin = float(s.box_margin)
    if margin < 0:
        raise UserInputError(f"data.box_margin must be >= 0, got {margin}")

    builder = _builder(cfg, s)
    images, labels = [], []
    for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
        img = Image.fromarray(ex["image"])
        if crop:
            img = crop_box(img, tuple(ex["bbox"]), margin)
        images.append(np.asarray(resize(img), np.uint8))
        labels.append(int(ex["label"]))
    what = f"coco2017/{cfg.name} split {split!r}"
    resize.report(what)
    name = variant_name(
        "coco2017", cfg.name, crop, margin if crop else None, resize.size,
        *(() if resize.mode == "crop" else (resize.mode,)),
    )
    return ImageSplit(
        name,
        split,
        stack_same_size(images, what),
        np.asarray(labels, np.int64),
        list(cfg.classes),
        info=dict(resize.info, crop_to_box=crop),
    )


def _builder(cfg: CocoConfig, s: CocoSettings) -> Coco2017:
    """The prepared builder of ``cfg``, (re-)prepared from ``data.coco_root`` when its files changed."""

    def make() -> Coco2017:
        return Coco2017(config=cfg, data_dir=s.tfds_dir)

    root = os.path.expanduser(str(s.coco_root or ""))
    needed = [os.path.join("annotations", f"instances_{part}.json") for part in PARTS.values()] + list(PARTS.values())
    if not root or not os.path.isdir(root) or any(not os.path.exists(os.path.join(root, n)) for n in needed):
        if make().is_prepared():
            return provenance.ensure_prepared(make, f"coco2017/{cfg.name}", None, lambda b: None)
        if not root:
            raise UserInputError(
                f"coco2017 config {cfg.name} is not prepared in {make().data_dir}; set data.coco_root to the "
                "folder holding annotations/, train2017/ and val2017/ to prepare it offline"
            )
        if not os.path.isdir(root):
            raise UserInputError(f"data.coco_root {root} does not exist")
        missing = next(os.path.join(root, n) for n in needed if not os.path.exists(os.path.join(root, n)))
        raise UserInputError(f"COCO file or folder {missing} is missing")
    source = {
        "config": {"builder": "coco2017", "name": cfg.name, "classes": list(cfg.classes), "level": cfg.level,
                   "min_area": cfg.min_area, "version": str(Coco2017.VERSION)},
        "files": provenance.file_listing(root, subdirs=list(PARTS.values()), files=needed[:2]),
    }

    def prepare(builder: Coco2017) -> None:
        with pixel_limit(s):
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))

    return provenance.ensure_prepared(make, f"coco2017/{cfg.name}", source, prepare, where=root)
