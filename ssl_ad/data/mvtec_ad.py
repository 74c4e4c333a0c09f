"""MVTec AD, and any defect data set in its layout (MVTec LOCO AD, MPDD, a product of your own).

The layout (MVTec AD, https://www.mvtec.com/company/research/datasets/mvtec-ad;
its licence forbids redistribution; Bergmann et al., "The MVTec Anomaly
Detection Dataset", IJCV 2021)::

    <root>/<category>/train/good/*.png
    <root>/<category>/test/<good or defect type>/*.png
    <root>/<category>/ground_truth/<defect type>/<name>_mask.png

``<root>`` is ``data.mvtec_root``. Categories are the folders of ``<root>`` that
hold ``train/good`` (``data.category``: one of them, or 'all' for every one);
defect types are the category's ``test/*`` folders other than ``good``.

* **The 15 published categories** (``bottle`` ... ``zipper``, :data:`DEFECTS`):
  the published defect lists are a check: a defect folder not in the list is an
  error naming it (a subset is accepted; ``label`` names stay the published
  list), and every defect image needs its mask. Each is one tfds BuilderConfig,
  prepared into ``data.data_dir`` on first use (tfds' ``manual_dir`` is the
  root), with no network. The prepared copy records a listing of
  ``<root>/<category>`` (paths, sizes, mtimes) and is re-prepared when that
  changes (``ssl_ad.data.provenance``); without ``mvtec_root`` the prepared copy
  is used as is.
* **Any other category name** (a product of your own, MVTec LOCO AD's
  ``breakfast_box``, MPDD's ``bracket_black``, ...): whatever is in the layout is
  accepted; ``test/good`` and at least one defect folder are required. It is
  read from ``<root>/<category>`` on every load (decoded into memory like
  ``image_folder``, no tfds copy, so nothing can go stale) and therefore needs
  ``data.mvtec_root``. A defect type has masks when ``ground_truth/<defect>``
  exists (then every image of it needs one); without that folder its images
  get all-zero masks and the split names it in
  ``info['defects_without_masks']`` (``<category>/<defect>`` with 'all'). When
  no defect type of the loaded categories has masks, ``masks`` is None: the
  evaluation then skips pixel maps and reports image-level metrics only. With
  some defect types unmasked, ``mask_valid`` is False for their images: pixel
  AUROC and PRO leave them out (a warning says so, and each pixel row names
  them); image-level metrics use every image.

Masks are matched by file stem (:func:`ssl_ad.data.folder.mask_files`):
``<name>_mask.png`` (MVTec AD, MPDD), ``<name>.png`` (BTAD), another image
extension, or a folder ``<name>/`` of masks whose union is used (MVTec LOCO AD);
they are thresholded at 128. Images may be in any format Pillow decodes (.png as
published, .tif, ...); other files are skipped and counted, images nested deeper
than the layout are refused, and ``data.max_image_pixels`` applies while
decoding.

tfds features: ``image`` (native size, RGB; the grey categories are decoded to
3 channels), ``label`` (defect type index within the category, 'good' = 0, then
the category's defect types sorted), ``is_anomaly``, ``mask`` (H, W, 1) uint8
0/1 (zeros for good images), ``category`` and ``filename``
(``test/<defect>/<name>.png``). Splits: 'train' (good only) and 'test'.

The loader (``data.category``; ``data.mvtec_root``; ``data.load_size``) returns
an ImageSplit with ``is_anomaly`` and ``masks`` (N, H, W) uint8 0/1; images are
made square by ``image_folder.fit_square`` (``data.resize_mode``: crop, pad or
stretch; bicubic) and masks with nearest neighbour by the same geometry. With
'all', every category present (in ``mvtec_root``, or prepared in ``data_dir``
when no root is given: published categories only) is loaded, labels are
category indices and ``class_names`` the categories, so evaluation code can
build the variant where all categories' train/good images are normal and one
category's defects anomalous.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from ssl_ad.data import provenance
from ssl_ad.data.folder import decode_pair, folder_images, mask_files, mask_index, read_mask
from ssl_ad.data.image_folder import (
    ImageSettings,
    SquareResizer,
    max_image_pixels_of,
    open_image,
    pixel_limit,
    report_skipped,
    stack_same_size,
    to_rgb,
)
from ssl_ad.data.split import ImageSplit
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
GOOD = "good"
LAYOUT = "<root>/<category>/train/good/<image>, <root>/<category>/test/<good or defect type>/<image>"


# ---------------------------------------------------------------------------
# One category folder: what is in it, checked.


@dataclasses.dataclass(frozen=True)
class Item:
    """One image of a category: ``rel`` = '<split>/<kind>/<file>', ``kind`` 'good' or a defect type,
    ``masks`` its ground-truth file(s) (() for good images and defect types without masks)."""

    rel: str
    path: str
    kind: str
    masks: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class CategoryTree:
    """A category folder as :func:`scan_category` found it.

    ``defects``: the label names after 'good' (the published list for the 15 published categories,
    else the test folders found, sorted); ``without_masks``: defect types with no
    ``ground_truth/<defect>`` folder; ``items`` / ``skipped``: per split, the images and the
    non-image files.
    """

    name: str
    root: str
    defects: tuple[str, ...]
    without_masks: tuple[str, ...]
    items: dict[str, list[Item]]
    skipped: dict[str, list[str]]

    @property
    def has_masks(self) -> bool:
        return len(self.without_masks) < len(self.defects)


def _subdirs(path: str) -> list[str]:
    return sorted(d for d in os.listdir(path) if not d.startswith(".") and os.path.isdir(os.path.join(path, d)))


def scan_category(root: str, name: str) -> CategoryTree:
    """Lists and checks ``root`` (= ``<mvtec_root>/<name>``); no image is decoded.

    Raises:
      UserInputError: when ``train/`` holds anything but ``good``; for a published category
        (:data:`DEFECTS`), a test folder not in its list or a defect type without
        ``ground_truth/<defect>``; for another name, no ``test/good`` or no defect folder; a
        folder without images or with images nested deeper; a defect image without its mask.
    """
    published = DEFECTS.get(name)
    if not os.path.isdir(root):
        raise UserInputError(f"MVTec AD category folder {root} does not exist")
    items: dict[str, list[Item]] = {}
    skipped: dict[str, list[str]] = {}
    kinds_of: dict[str, list[str]] = {}
    for split in ("train", "test"):
        split_dir = os.path.join(root, split)
        if not os.path.isdir(split_dir):
            raise UserInputError(f"MVTec-layout folder {split_dir} does not exist; expected {LAYOUT}")
        kinds = _subdirs(split_dir)
        if split == "train" and kinds != [GOOD]:
            raise UserInputError(
                f"MVTec-layout folder {split_dir} has folders {kinds}; it must hold exactly one, {GOOD!r} "
                "(training images are all normal)"
            )
        if split == "test":
            if published is not None:
                unknown = [k for k in kinds if k not in (GOOD,) + published]
                if unknown:
                    raise UserInputError(
                        f"MVTec AD folder {split_dir} has unexpected folders {unknown}; the published category "
                        f"{name!r} allows {[GOOD, *published]} (for a data set of your own, give its category "
                        "folder another name: any defect folders are then accepted)"
                    )
            elif GOOD not in kinds or kinds == [GOOD]:
                missing = f"a {GOOD!r} folder" if GOOD not in kinds else "a defect-type folder"
                raise UserInputError(
                    f"MVTec-layout folder {split_dir} has folders {kinds} but needs {missing}: "
                    f"{split_dir}/{GOOD} for normal test images and {split_dir}/<defect type> for anomalous ones"
                )
        kinds_of[split] = sorted(kinds, key=lambda k: (k != GOOD, k))  # label order: 'good' first
        skipped[split] = sorted(f"{split}/{f}" for f in os.listdir(split_dir)
                                if os.path.isfile(os.path.join(split_dir, f)) and not f.startswith("."))
    defects = published if published is not None else tuple(k for k in kinds_of["test"] if k != GOOD)
    without = []
    for split in ("train", "test"):
        items[split] = []
        for kind in kinds_of[split]:
            files, others = folder_images(os.path.join(root, split, kind), "MVTec-layout folder",
                                          f"{root}/{split}/<good or defect type>/<image>")
            skipped[split] += [f"{split}/{kind}/{f}" for f in others]
            index = None
            if kind != GOOD:
                gt = os.path.join(root, "ground_truth", kind)
                if os.path.isdir(gt):
                    index = mask_index(gt)
                elif published is not None:
                    raise UserInputError(
                        f"MVTec AD ground-truth folder {gt} is missing; the published category {name!r} has masks for "
                        "every defect type (a category of your own may lack them: give its folder another name)"
                    )
                else:
                    without.append(kind)
            for fname in files:
                masks: tuple[str, ...] = ()
                if index is not None:
                    stem = os.path.splitext(fname)[0]
                    masks = mask_files(index, stem)
                    if not masks:
                        raise UserInputError(
                            f"MVTec-layout ground-truth mask {index.folder}/{stem}_mask.png is missing (for "
                            f"{split}/{kind}/{fname}; {stem}.png, another image extension or a folder {stem}/ of "
                            f"masks also count); remove {index.folder} to evaluate {kind!r} at image level only"
                        )
                items[split].append(Item(f"{split}/{kind}/{fname}", os.path.join(root, split, kind, fname), kind, masks))
    return CategoryTree(name, root, defects, tuple(without), items, skipped)


# ---------------------------------------------------------------------------
# The tfds builder of the 15 published categories.


@dataclasses.dataclass(eq=False)
class MvtecConfig(tfds.core.BuilderConfig):
    """One MVTec AD category; ``label`` names are 'good' then its defect types."""

    defects: tuple[str, ...] = ()


class MvtecAd(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """MVTec AD, one config per published category, from a local copy of the archive."""

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
                    "label": tfds.features.ClassLabel(names=(GOOD,) + tuple(self.builder_config.defects)),
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
        tree = scan_category(root, self.builder_config.name)
        return {split: self._generate_examples(tree, split) for split in ("train", "test")}

    def _generate_examples(self, tree: CategoryTree, split: str):
        names = (GOOD,) + tuple(tree.defects)
        for item in tree.items[split]:
            image, size = _image(item.path)
            if item.masks:
                mask = read_mask(item.masks, size)[..., None]
            else:
                mask = np.zeros((size[1], size[0], 1), np.uint8)
            yield item.rel, {
                "image": image,
                "label": names.index(item.kind),
                "is_anomaly": item.kind != GOOD,
                "mask": mask,
                "category": tree.name,
                "filename": item.rel,
            }
        report_skipped(f"mvtec_ad/{tree.name} {tree.root}/{split}", tree.skipped[split])


def _image(path: str):
    """(path or RGB array for tfds, (width, height)); only non-RGB/grey or non-PNG files are re-encoded."""
    head = open_image(path, load=False)
    if head.format == "PNG" and head.mode in ("RGB", "L"):
        return path, head.size
    img = open_image(path)
    return np.asarray(to_rgb(img), np.uint8), img.size


# ---------------------------------------------------------------------------
# Loader.


@dataclasses.dataclass(frozen=True)
class MvtecSettings(ImageSettings):
    """The ``data.*`` keys of mvtec_ad and their defaults (plus ``data_dir`` and the image keys)."""

    mvtec_root: str = ""  # the extracted archive / tree; '': use the prepared copies in data_dir as they are
    category: str = ""  # a category folder of mvtec_root (or a published name prepared in data_dir), or 'all'


def _root(s: MvtecSettings) -> str:
    """``data.mvtec_root`` expanded ('' when not set). It may be absent: a published category's
    prepared copy is then used as it is (with a note); whatever needs the tree checks it."""
    return os.path.expanduser(str(s.mvtec_root or ""))


def _tree_root(s: MvtecSettings) -> str:
    """``data.mvtec_root`` where the tree itself is needed; an error when unset or not a folder."""
    root = _root(s)
    if not root or not os.path.isdir(root):
        raise UserInputError(f"data.mvtec_root {root or '(unset)'} does not exist; set it to the folder holding "
                             "the category folders (<category>/train/good, <category>/test/...)")
    return root


def _builder(category: str, s: MvtecSettings) -> MvtecAd:
    """The prepared builder of published ``category``, (re-)prepared from ``data.mvtec_root`` when it changed."""

    def make() -> MvtecAd:
        return MvtecAd(config=category, data_dir=s.tfds_dir)

    root = _root(s)
    src = os.path.join(root, category) if root else ""
    source = None
    if src and os.path.isdir(src):
        scan_category(src, category)  # the layout errors before anything is prepared
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
        with pixel_limit(s):
            builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=root))

    return provenance.ensure_prepared(make, f"mvtec_ad/{category}", source, prepare, where=src)


def discover(root: str) -> tuple[list[str], list[str]]:
    """(categories, other folders) of ``root``: a category is a folder holding ``train/good``, or one
    named like a published category (its layout is then checked when it is loaded)."""
    found, other = [], []
    for d in _subdirs(root):
        is_cat = d in DEFECTS or os.path.isdir(os.path.join(root, d, "train", GOOD))
        (found if is_cat else other).append(d)
    return found, other


def _categories(category: str, s: MvtecSettings) -> list[str]:
    """The categories to load for ``data.category`` (checked; 'all' = every one present)."""
    root = _root(s)
    if category == "all":
        if root:
            found, other = discover(_tree_root(s))
            if other:
                log.info("data.mvtec_root %s: folders %s hold no train/%s, skipped", root, other, GOOD)
            where = root
        else:
            found = [c for c in CATEGORIES if MvtecAd(config=c, data_dir=s.tfds_dir).is_prepared()]
            where = os.path.join(s.tfds_dir, "mvtec_ad")
        if not found:
            raise UserInputError(
                f"no MVTec-layout category found in {where}; expected {LAYOUT} "
                f"(e.g. the published {', '.join(CATEGORIES[:3])}, ...)"
            )
        return found
    if not category or category.startswith(".") or os.sep in category or (os.altsep or os.sep) in category:
        raise UserInputError(
            f"data.category must be a category folder name of data.mvtec_root (e.g. one of the published "
            f"{list(CATEGORIES)}) or 'all', got {category!r}"
        )
    if category in DEFECTS:
        return [category]
    if not root:
        raise UserInputError(
            f"data.category {category!r} is not one of the 15 published MVTec AD categories {list(CATEGORIES)}; "
            "a category of your own is read from data.mvtec_root/<category> on every load: set data.mvtec_root"
        )
    if not os.path.isdir(os.path.join(root, category)):
        found, _ = discover(root)
        raise UserInputError(
            f"data.category {category!r}: there is no folder {os.path.join(root, category)}; categories found in "
            f"{root}: {found} (published names: {list(CATEGORIES)})"
        )
    return [category]


@dataclasses.dataclass
class _Part:
    """One category's share of a split."""

    images: list[np.ndarray]
    labels: list[int]
    anomalous: list[bool]
    masks: list[np.ndarray]
    class_names: list[str]
    without_masks: tuple[str, ...]
    has_masks: bool
    mask_valid: list[bool] = dataclasses.field(default_factory=list)


def _read_prepared(category: str, s: MvtecSettings, split: str, resize: SquareResizer) -> _Part:
    """A published category's ``split`` from its prepared tfds copy, resized by ``resize``."""
    builder = _builder(category, s)
    part = _Part([], [], [], [], list(builder.info.features["label"].names), (), True)
    for ex in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
        part.images.append(np.asarray(resize(Image.fromarray(ex["image"])), np.uint8))
        m = resize(Image.fromarray(ex["mask"][..., 0]), nearest=True)  # same geometry as the image
        part.masks.append(np.asarray(m, np.uint8))
        part.labels.append(int(ex["label"]))
        part.anomalous.append(bool(ex["is_anomaly"]))
        part.mask_valid.append(True)  # every published defect type has masks
    return part


def _read_tree(category: str, s: MvtecSettings, split: str, resize: SquareResizer) -> _Part:
    """Another category's ``split``, decoded from ``<mvtec_root>/<category>``, resized by ``resize``."""
    tree = scan_category(os.path.join(_tree_root(s), category), category)
    names = [GOOD, *tree.defects]
    part = _Part([], [], [], [], names, tree.without_masks, tree.has_masks)
    with pixel_limit(s):
        for item in tree.items[split]:
            image, mask = decode_pair(item.path, item.masks, resize)
            part.images.append(image)
            part.masks.append(mask)
            part.labels.append(names.index(item.kind))
            part.anomalous.append(item.kind != GOOD)
            part.mask_valid.append(item.kind == GOOD or bool(item.masks))
    report_skipped(f"mvtec_ad/{category} {tree.root}/{split}", tree.skipped[split])
    return part


def load_mvtec_ad(data_cfg: Any, split: str) -> ImageSplit:
    """The ``mvtec_ad`` loader: ``split`` ('train' or 'test') as an ImageSplit; see the module docstring.

    Raises:
      UserInputError: for an unknown split or category, a tree not in the layout (see
        :func:`scan_category`), a category neither in ``data.mvtec_root`` nor prepared, or images of
        different sizes with ``data.load_size`` 0.
    """
    s = MvtecSettings.from_config(data_cfg)
    if split not in ("train", "test"):
        raise UserInputError(f"data set 'mvtec_ad' has no split {split!r}; it has ['test', 'train']")
    category = str(s.category or "")
    resize = SquareResizer.from_settings(s)
    max_image_pixels_of(s)  # validated before any decoding
    categories = _categories(category, s)

    images, labels, anomalous, masks, mask_valid = [], [], [], [], []
    class_names: list[str] = []
    without: list[str] = []
    has_masks = False
    for ci, cat in enumerate(categories):
        read = _read_prepared if cat in DEFECTS else _read_tree
        part = read(cat, s, split, resize)
        images += part.images
        anomalous += part.anomalous
        masks += part.masks
        mask_valid += part.mask_valid
        labels += [ci] * len(part.labels) if category == "all" else part.labels
        class_names = categories if category == "all" else part.class_names
        without += [f"{cat}/{d}" if category == "all" else d for d in part.without_masks]
        has_masks |= part.has_masks
    what = f"mvtec_ad/{category} split {split!r}"
    if split == "test" and without and has_masks:
        log.warning(
            "%s: defect type(s) %s have no ground_truth folder: their images are left out of pixel AUROC and PRO "
            "(ImageSplit.mask_valid); image-level metrics use them", what, without,
        )
    elif split == "test" and not has_masks:
        log.warning("%s: no defect type has masks (no ground_truth folders): pixel maps are skipped, image-level "
                    "metrics only", what)
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
        masks=stack_same_size([m[..., None] for m in masks], what)[..., 0] if has_masks else None,
        info=dict(resize.info, defects_without_masks=without),
        mask_valid=np.asarray(mask_valid, bool) if has_masks and without else None,
    )
