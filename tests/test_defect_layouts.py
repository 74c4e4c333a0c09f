"""Defect data sets beyond the 15 published MVTec AD categories.

* ``mvtec_ad`` with categories and defect types discovered from the folders (a product of
  one's own, MVTec LOCO AD / MPDD / BTAD-like trees), defect folders without masks;
* the published names keep their defect lists as a check;
* ``folder``: anomalib's Folder-style keys (normal_dir, abnormal_dirs, mask_dir,
  normal_test_dir, normal_test_fraction);
* an end-to-end evaluation on a custom MVTec-layout tree.

Every tree is written with PIL in tmp_path: 32x32 (or 24x24) images of dark noise in which a
defect is a bright rectangle painted exactly where its mask is set.
"""

from __future__ import annotations

import json
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from configs import eval_mvtec
from ssl_ad.config_check import violations
from ssl_ad.data.sources import LOADERS, load_split
from ssl_ad.errors import UserInputError
from ssl_ad.evaluation.runner import run_evaluation
from tests.conftest import apply_overrides

SIZE = 32


def cfg(**kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(kw)


def _region(i: int, size: int = SIZE) -> np.ndarray:
    """A 0/255 mask with one rectangle whose place depends on ``i``."""
    m = np.zeros((size, size), np.uint8)
    y, x = 2 + 3 * (i % 4), 3 + 2 * (i % 5)
    m[y:y + size // 3, x:x + size // 4] = 255
    return m


def _image(seed: int, mask: np.ndarray | None = None, size: int = SIZE) -> Image.Image:
    arr = np.random.default_rng(seed).integers(10, 60, (size, size, 3), dtype=np.uint8)
    if mask is not None:
        arr[mask > 0] = 230
    return Image.fromarray(arr, mode="RGB")


def _save(path: str, img: Image.Image) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path)


def write_category(root, name: str, test: dict[str, int], masked=(), n_train: int = 3, size: int = SIZE,
                   mask_style: str = "mvtec", seed: int = 0) -> str:
    """``root/name`` in the MVTec layout; defect types in ``masked`` get ground_truth masks named by
    ``mask_style``: 'mvtec' (<stem>_mask.png), 'btad' (<stem>.png) or 'loco' (<stem>/000.png + 001.png)."""
    base = os.path.join(str(root), name)
    for i in range(n_train):
        _save(os.path.join(base, "train", "good", f"{i:03d}.png"), _image(seed + i, size=size))
    for k, (kind, n) in enumerate(test.items()):
        for i in range(n):
            s = seed + 100 * (k + 1) + i
            if kind == "good":
                _save(os.path.join(base, "test", kind, f"{i:03d}.png"), _image(s, size=size))
                continue
            mask = _region(i + k, size)
            _save(os.path.join(base, "test", kind, f"{i:03d}.png"), _image(s, mask, size))
            if kind in masked:
                gt = os.path.join(base, "ground_truth", kind)
                if mask_style == "mvtec":
                    _save(os.path.join(gt, f"{i:03d}_mask.png"), Image.fromarray(mask))
                elif mask_style == "btad":
                    _save(os.path.join(gt, f"{i:03d}.png"), Image.fromarray(mask))
                else:  # LOCO: one file per region, the mask is their union
                    top, bottom = mask.copy(), mask.copy()
                    top[size // 2:], bottom[:size // 2] = 0, 0
                    _save(os.path.join(gt, f"{i:03d}", "000.png"), Image.fromarray(top))
                    _save(os.path.join(gt, f"{i:03d}", "001.png"), Image.fromarray(bottom))
    return str(root)


def bright(images: np.ndarray) -> np.ndarray:
    """Where the defect was painted: (N, H, W) 0/1."""
    return (images[..., 0] > 128).astype(np.uint8)


# ---------------------------------------------------------------------------
# mvtec_ad: discovered categories and defect types


def test_a_custom_category_discovers_its_defect_types_and_names_those_without_masks(tmp_path):
    root = write_category(tmp_path / "data", "widget", {"good": 2, "dent": 2, "scratch": 1}, masked=("dent",))
    c = cfg(name="mvtec_ad", category="widget", mvtec_root=root, data_dir=str(tmp_path / "tfds"))
    train, test = load_split(c, "train"), load_split(c, "test")
    assert train.class_names == test.class_names == ["good", "dent", "scratch"]
    assert train.images.shape == (3, SIZE, SIZE, 3) and (train.labels == 0).all() and not train.is_anomaly.any()
    assert train.masks.shape == (3, SIZE, SIZE) and not train.masks.any()
    assert test.labels.tolist() == [0, 0, 1, 1, 2]
    np.testing.assert_array_equal(test.is_anomaly, test.labels > 0)
    assert test.info["defects_without_masks"] == ["scratch"]
    assert test.mask_valid.tolist() == [True, True, True, True, False]  # pixel metrics leave 'scratch' out
    dent = test.labels == 1
    np.testing.assert_array_equal(test.masks[dent], bright(test.images[dent]))  # masks where the defect is
    assert not test.masks[~dent].any()  # good images, and the mask-less defect type: all zero
    assert bright(test.images[test.labels == 2]).any()  # ... although that image has a defect
    assert not (tmp_path / "tfds").exists()  # read in memory: no prepared copy to go stale


def test_a_custom_category_without_any_masks_has_no_masks_and_image_metrics_only(tmp_path):
    root = write_category(tmp_path, "part", {"good": 1, "bad": 2})
    test = load_split(cfg(name="mvtec_ad", category="part", mvtec_root=root), "test")
    assert test.masks is None and test.info["defects_without_masks"] == ["bad"]
    assert test.class_names == ["good", "bad"] and test.is_anomaly.tolist() == [False, True, True]


@pytest.mark.parametrize("style", ["btad", "loco"])
def test_mask_naming_of_btad_and_loco(tmp_path, style):
    root = write_category(tmp_path, "thing", {"good": 1, "ko": 2}, masked=("ko",), mask_style=style)
    test = load_split(cfg(name="mvtec_ad", category="thing", mvtec_root=root), "test")
    assert test.info["defects_without_masks"] == []
    np.testing.assert_array_equal(test.masks, bright(test.images))


def test_all_loads_every_discovered_category(tmp_path):
    root = tmp_path / "data"
    write_category(root, "alpha", {"good": 1, "crack": 2}, masked=("crack",), n_train=2)
    write_category(root, "beta", {"good": 2, "hole": 1, "stain": 1}, masked=("hole",), n_train=3, size=24, seed=50)
    os.makedirs(root / "docs")  # no train/good: not a category
    (root / "readme.txt").write_text("not a category")
    c = cfg(name="mvtec_ad", category="all", mvtec_root=str(root), load_size=16)
    train, test = load_split(c, "train"), load_split(c, "test")
    assert train.class_names == test.class_names == ["alpha", "beta"]
    assert train.labels.tolist() == [0, 0, 1, 1, 1] and train.images.shape == (5, 16, 16, 3)
    assert test.labels.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert test.is_anomaly.tolist() == [False, True, True, False, False, True, True]
    assert test.masks.shape == (7, 16, 16) and test.info["defects_without_masks"] == ["beta/stain"]
    assert test.mask_valid.tolist() == [True] * 6 + [False]
    assert test.masks[[1, 2, 5]].all(axis=(1, 2)).sum() == 0 and test.masks[[1, 2, 5]].any(axis=(1, 2)).all()
    assert not test.masks[[0, 3, 4, 6]].any()
    with pytest.raises(UserInputError, match="mvtec_root"):  # a category of one's own is never prepared
        load_split(cfg(name="mvtec_ad", category="alpha"), "test")
    with pytest.raises(UserInputError, match=r"\['alpha', 'beta'\]"):  # a typo names what was found
        load_split(cfg(name="mvtec_ad", category="alpah", mvtec_root=str(root)), "test")


def test_a_published_name_keeps_its_defect_list_as_a_check(tmp_path):
    root = write_category(tmp_path / "a", "bottle", {"good": 1, "broken_large": 1, "dent": 1},
                          masked=("broken_large", "dent"))
    c = cfg(name="mvtec_ad", category="bottle", mvtec_root=root, data_dir=str(tmp_path / "tfds"))
    with pytest.raises(UserInputError, match=r"unexpected folders \['dent'\].*bottle") as err:
        load_split(c, "test")
    assert "another name" in str(err.value)
    # A published category's defect types need their masks; the same tree under another name is fine.
    root = write_category(tmp_path / "b", "bottle", {"good": 1, "broken_large": 1, "contamination": 1},
                          masked=("broken_large",))
    with pytest.raises(UserInputError, match=os.path.join("ground_truth", "contamination")):
        load_split(cfg(name="mvtec_ad", category="bottle", mvtec_root=root, data_dir=str(tmp_path / "t2")), "test")
    os.rename(os.path.join(root, "bottle"), os.path.join(root, "my_bottle"))
    test = load_split(cfg(name="mvtec_ad", category="my_bottle", mvtec_root=root), "test")
    assert test.class_names == ["good", "broken_large", "contamination"]
    assert test.info["defects_without_masks"] == ["contamination"]


def test_custom_layout_errors_name_what_is_wrong(tmp_path):
    root = write_category(tmp_path / "a", "widget", {"dent": 1}, masked=("dent",))
    with pytest.raises(UserInputError, match="'good' folder"):
        load_split(cfg(name="mvtec_ad", category="widget", mvtec_root=root), "test")
    root = write_category(tmp_path / "b", "widget", {"good": 1, "dent": 2}, masked=("dent",))
    os.remove(os.path.join(root, "widget", "ground_truth", "dent", "001_mask.png"))
    with pytest.raises(UserInputError, match="001_mask.png"):
        load_split(cfg(name="mvtec_ad", category="widget", mvtec_root=root), "test")
    with pytest.raises(UserInputError, match="data.category"):
        load_split(cfg(name="mvtec_ad", category="../widget", mvtec_root=root), "test")


# ---------------------------------------------------------------------------
# folder: anomalib Folder-style keys


def write_folders(root, n_normal: int = 10) -> dict[str, str]:
    """normal/ (n_normal), crack/ (c0-c2), hole/ (h0-h1), masks/ (c*_mask.png and h*.png), good_test/ (2)."""
    root = str(root)
    for i in range(n_normal):
        _save(os.path.join(root, "normal", f"n{i:02d}.png"), _image(i))
    for i in range(2):
        _save(os.path.join(root, "good_test", f"t{i}.png"), _image(500 + i))
    for kind, n, mask_name in (("crack", 3, "{}_mask.png"), ("hole", 2, "{}.png")):
        for i in range(n):
            stem, mask = f"{kind[0]}{i}", _region(i + len(kind))
            _save(os.path.join(root, kind, f"{stem}.png"), _image(300 + 10 * n + i, mask))
            _save(os.path.join(root, "masks", mask_name.format(stem)), Image.fromarray(mask))
    return {"root": root}


def test_folder_with_masks_holds_out_normals_for_test(tmp_path):
    write_folders(tmp_path)
    c = cfg(name="folder", data_dir=str(tmp_path), normal_dir="normal", abnormal_dirs=("hole", "crack"),
            mask_dir="masks")
    train, test = load_split(c, "train"), load_split(c, "test")
    assert train.class_names == test.class_names == ["good", "crack", "hole"]
    assert len(train) == 8 and (train.labels == 0).all() and not train.is_anomaly.any() and not train.masks.any()
    assert test.labels.tolist() == [0, 0, 1, 1, 1, 2, 2]  # round(10 * 0.2) = 2 held-out normals
    np.testing.assert_array_equal(test.is_anomaly, test.labels > 0)
    np.testing.assert_array_equal(test.masks, bright(test.images))
    assert test.info["defects_without_masks"] == []
    normals = {img.tobytes() for img in train.images} | {img.tobytes() for img in test.images[:2]}
    assert len(normals) == 10  # the hold-out is disjoint from train and together they are all normals
    again = load_split(c, "test")
    np.testing.assert_array_equal(again.images, test.images)  # seeded: the same hold-out every time
    assert LOADERS["folder"] is not None and test.name == again.name


def test_folder_without_masks_and_with_a_normal_test_dir(tmp_path):
    write_folders(tmp_path)
    base = dict(name="folder", normal_dir=str(tmp_path / "normal"), abnormal_dirs=str(tmp_path / "crack"))
    test = load_split(cfg(**base), "test")
    assert test.masks is None and test.class_names == ["good", "crack"] and test.labels.tolist() == [0, 0, 1, 1, 1]
    c = cfg(**base, normal_test_dir=str(tmp_path / "good_test"), load_size=16)
    train, test = load_split(c, "train"), load_split(c, "test")
    assert len(train) == 10 and test.labels.tolist() == [0, 0, 1, 1, 1] and test.images.shape[1:] == (16, 16, 3)
    # One mask folder per abnormal folder, '' for one without masks.
    c = cfg(name="folder", data_dir=str(tmp_path), normal_dir="normal", abnormal_dirs=("crack", "hole"),
            mask_dir=("", "masks"))
    test = load_split(c, "test")
    assert test.info["defects_without_masks"] == ["crack"]
    assert not test.masks[test.labels != 2].any() and test.masks[test.labels == 2].any(axis=(1, 2)).all()
    np.testing.assert_array_equal(test.mask_valid, test.labels != 1)  # 'crack' (no masks) is left out of pixel metrics


def test_folder_errors_name_what_is_wrong(tmp_path):
    write_folders(tmp_path, n_normal=2)
    base = dict(name="folder", data_dir=str(tmp_path), normal_dir="normal", abnormal_dirs=("crack",))
    with pytest.raises(UserInputError, match="abnormal_dirs"):
        load_split(cfg(name="folder", normal_dir=str(tmp_path / "normal")), "test")
    with pytest.raises(UserInputError, match="normal_dir"):
        load_split(cfg(name="folder", abnormal_dirs=str(tmp_path / "crack")), "train")
    with pytest.raises(UserInputError, match="normal_test_fraction"):  # round(2 * 0.2) = 0 held out
        load_split(cfg(**base), "test")
    os.remove(tmp_path / "masks" / "c1_mask.png")
    with pytest.raises(UserInputError, match="c1.png"):
        load_split(cfg(**base, normal_test_fraction=0.5, mask_dir="masks"), "test")
    with pytest.raises(UserInputError, match="no split 'val'"):
        load_split(cfg(**base), "val")
    assert any("data.normal_test_fraction=1.0" in v
               for v in violations(ml_collections.ConfigDict({"data": {"normal_test_fraction": 1.0}})))


# ---------------------------------------------------------------------------
# End to end: the evaluation on a custom MVTec-layout tree


def test_evaluation_on_a_custom_mvtec_layout_tree(tmp_path):
    root = write_category(tmp_path / "data", "widget", {"good": 3, "dent": 3, "scratch": 2}, masked=("dent",),
                          n_train=4)
    c = eval_mvtec.get_config()
    apply_overrides(c, {"data.mvtec_root": root, "data.category": "widget", "data.data_dir": str(tmp_path / "tfds"),
                        "data.load_size": SIZE, "checkpoint": (), "sources": ("pixels",), "scorers": ("knn",),
                        "protocols": ("mvtec",), "tsne_points": 0, "pca_dims": 0, "max_train_per_round": 0})
    out = tmp_path / "out"
    rows = run_evaluation(c, str(out))
    (row,) = [r for r in rows if r["scorer"] == "knn"]
    assert row["protocol"] == "mvtec" and set(row["per_round"]) == {"widget"}
    assert 0.5 < row["mean_auroc"] <= 1.0  # bright defects lie far from the dark normals in pixel space
    results = json.loads((out / "results.json").read_text())
    assert results["results"] and (out / "report.md").stat().st_size > 0
