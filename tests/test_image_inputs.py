"""Image folders (and MVTec AD / COCO trees) as users have them (issue 12, case 7).

(a) every format Pillow decodes is read (.tif incl. 16-bit, .webp, .ppm, ...), other files are
skipped and reported with a count; (b) images one folder deeper than the layout are refused with
a message naming where they were found and the layout expected; (c) ``data.resize_mode``
(crop / pad / stretch) for non-square images, recorded in the split, warned about when cropping
loses much; (d) ``data.max_image_pixels`` sets Pillow's decompression-bomb limit.
"""

from __future__ import annotations

import json
import logging
import os

import ml_collections
import numpy as np
import pytest
from PIL import Image

from ssl_ad.data.sources import load_split
from ssl_ad.errors import UserInputError


def cfg(**kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(kw)


def _save(path, img: Image.Image, **kw) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, **kw)


# ---------------------------------------------------------------------------
# (a) formats and skipped files


def test_every_pillow_format_is_read_and_skipped_files_are_counted(tmp_path, caplog):
    root = tmp_path / "formats"
    _save(root / "a" / "rgb.tif", Image.new("RGB", (6, 6), (10, 20, 30)))
    sixteen = Image.fromarray(np.full((6, 6), 32896, np.uint16))  # mode I;16: 32896 / 65535 * 255 = 128
    assert sixteen.mode == "I;16"
    _save(root / "a" / "grey16.tiff", sixteen)
    _save(root / "a" / "pic.webp", Image.new("RGB", (6, 6), (200, 0, 0)), lossless=True)
    _save(root / "b" / "pic.ppm", Image.new("RGB", (6, 6), (0, 0, 250)))
    _save(root / "b" / "pic.PNG", Image.new("RGB", (6, 6), (0, 250, 0)))
    (root / "a" / "notes.txt").write_text("not an image")
    (root / "b" / "labels.csv").write_text("x,y")
    (root / "b" / "model.pdf").write_bytes(b"%PDF-1.4")  # Pillow only writes PDF: skipped
    (root / "README.md").write_text("about")
    (root / "b" / ".DS_Store").write_bytes(b"\0")

    c = cfg(name="image_folder", data_dir=str(root), test_fraction=0.4)
    with caplog.at_level(logging.INFO, logger="ssl_ad.data.image_folder"):
        train, test = load_split(c, "train"), load_split(c, "test")
    assert len(train) + len(test) == 5 and train.class_names == ["a", "b"]
    images = np.concatenate([train.images, test.images])
    colours = sorted(tuple(int(v) for v in img[3, 3]) for img in images)
    assert colours == sorted([(10, 20, 30), (128, 128, 128), (200, 0, 0), (0, 0, 250), (0, 250, 0)])
    skipped = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert len(skipped) == 2  # one line per split
    assert "skipped 4 file(s)" in skipped[0] and "notes.txt" in skipped[0] and "1 hidden file(s)" in skipped[0]
    assert train.info["skipped_files"] == 4


# ---------------------------------------------------------------------------
# (b) images one folder deeper than the layout


def test_images_one_folder_too_deep_are_refused_with_where_and_layout(tmp_path):
    root = tmp_path / "deep"
    for cls in ("good", "bad"):
        for batch in ("batch1", "batch2"):
            _save(root / "test" / cls / batch / "000.png", Image.new("RGB", (4, 4)))
    with pytest.raises(UserInputError) as err:
        load_split(cfg(name="image_folder", data_dir=str(root)), "test")
    msg = str(err.value)
    assert os.path.join("test", "bad", "batch1", "000.png") in msg  # where images were found
    assert "<split>/<class>/<image>" in msg and "<class>/<image>" in msg  # what is expected
    assert "class folder" in msg and "test has no images" not in msg  # the split is not called a class

    # Also when the other split has the right depth: the deep one is named.
    _save(root / "train" / "good" / "000.png", Image.new("RGB", (4, 4)))
    with pytest.raises(UserInputError, match="deeper than expected"):
        load_split(cfg(name="image_folder", data_dir=str(root)), "train")


def test_mvtec_images_one_folder_too_deep_are_refused(tmp_path):
    root = tmp_path / "mvtec"
    _save(root / "bottle" / "train" / "good" / "000.png", Image.new("RGB", (8, 8)))
    _save(root / "bottle" / "test" / "good" / "lot7" / "000.png", Image.new("RGB", (8, 8)))
    c = cfg(name="mvtec_ad", category="bottle", mvtec_root=str(root), data_dir=str(tmp_path / "tfds"))
    with pytest.raises(UserInputError) as err:
        load_split(c, "test")
    assert os.path.join("good", "lot7", "000.png") in str(err.value)
    assert "test/<good or defect type>/<image>" in str(err.value)


# ---------------------------------------------------------------------------
# (c) non-square images: data.resize_mode


def _edge_folder(root, width: int = 64, edge: int = 6, n: int = 12, seed: int = 0) -> None:
    """width x width/2 images: the same noise in the middle, classes differ only in their left/right edges."""
    rng = np.random.default_rng(seed)
    for split in ("train", "test"):
        for cls, value in (("dark", 30), ("bright", 225)):
            for i in range(n):
                a = rng.integers(60, 196, (width // 2, width, 3), dtype=np.uint8)
                a[:, :edge] = value
                a[:, -edge:] = value
                _save(root / split / cls / f"{i:02d}.png", Image.fromarray(a))


@pytest.fixture(scope="module")
def edges(tmp_path_factory):
    """The issue's folder: 64x32 images, 6-px edges (evaluated at load_size=32)."""
    root = tmp_path_factory.mktemp("edges")
    _edge_folder(root)
    return root


@pytest.fixture(scope="module")
def small_edges(tmp_path_factory):
    """The same at half scale (32x16, 3-px edges, load_size=16): a 768-d Mahalanobis fits in a second, 3072-d
    takes a minute on a small CPU."""
    root = tmp_path_factory.mktemp("small_edges")
    _edge_folder(root, width=32, edge=3)
    return root


def _edge_eval_config(root, mode: str, load_size: int):
    from configs import eval_mnist5k

    c = eval_mnist5k.get_config()
    c.data.name, c.data.data_dir, c.data.load_size, c.data.resize_mode = "image_folder", str(root), load_size, mode
    c.sources, c.scorers, c.protocols, c.tsne_points = "pixels", "mahalanobis", "one_class", 0
    c.pca_dims = 0  # PCA fit on normals would drop the (constant) edge direction
    return c


@pytest.mark.parametrize("mode", ["pad", "stretch"])
def test_pad_and_stretch_keep_the_edges_and_detect_them(edges, small_edges, tmp_path, mode, caplog):
    from ssl_ad.evaluation.runner import run_evaluation

    split = load_split(cfg(name="image_folder", data_dir=str(edges), load_size=32, resize_mode=mode), "test")
    assert split.images.shape[1:] == (32, 32, 3) and split.info["resize_mode"] == mode
    dark = split.images[split.class_names.index("dark") == split.labels]
    if mode == "pad":  # 64x32 -> 32x16 centred on black: rows 8..23 hold the image, edges intact
        assert (split.images[:, :8] == 0).all() and (split.images[:, 24:] == 0).all()
        assert (np.abs(dark[:, 8:24, [0, -1]].astype(int) - 30) <= 1).all()
    else:  # 64x32 -> 32x32: the 6-px edges become 3 px
        assert (np.abs(dark[:, :, [0, -1]].astype(int) - 30) <= 1).all()
    with caplog.at_level(logging.WARNING):
        rows = run_evaluation(_edge_eval_config(small_edges, mode, 16), str(tmp_path / "out"))
    assert not [r for r in caplog.records if "centre crop" in r.getMessage()]
    (row,) = [r for r in rows if r["feature"] == "pixels" and r["scorer"] == "mahalanobis"]
    assert row["mean_auroc"] == 1.0
    meta = json.loads((tmp_path / "out" / "results.json").read_text())["meta"]
    assert meta["config"]["data"]["resize_mode"] == mode  # the choice is recorded in the results


def test_crop_drops_the_edges_and_warns_with_a_count(edges, small_edges, tmp_path, caplog):
    c = cfg(name="image_folder", data_dir=str(edges), load_size=32)  # resize_mode default: crop
    with caplog.at_level(logging.WARNING, logger="ssl_ad.data.image_folder"):
        split = load_split(c, "test")
    (line,) = [r.getMessage() for r in caplog.records if "centre crop" in r.getMessage()]
    assert "24 of 24 images" in line and "50%" in line and "resize_mode=pad" in line
    # The edges are gone: both classes now show only the shared middle noise (values 60..195).
    assert split.images.min() >= 55 and split.images.max() <= 200
    assert split.info["resize_mode"] == "crop"
    pad = load_split(cfg(name="image_folder", data_dir=str(edges), load_size=32, resize_mode="pad"), "test")
    assert pad.name != split.name  # feature caches and results tell the variants apart
    from ssl_ad.evaluation.runner import run_evaluation

    (row,) = run_evaluation(_edge_eval_config(small_edges, "crop", 16), str(tmp_path / "out"))
    assert row["mean_auroc"] < 0.75  # the 0.417: what told the classes apart was cropped away
    with pytest.raises(UserInputError, match=r"\['crop', 'pad', 'stretch'\]"):
        load_split(cfg(name="image_folder", data_dir=str(edges), load_size=32, resize_mode="fit"), "test")


def test_mvtec_masks_follow_the_padded_geometry(tmp_path):
    root = tmp_path / "mvtec"
    _save(root / "bottle" / "train" / "good" / "000.png", Image.new("RGB", (48, 24), (20, 20, 20)))
    img = np.full((24, 48, 3), 20, np.uint8)
    mask = np.zeros((24, 48), np.uint8)
    mask[4:12, 2:10] = 255  # a defect near the left edge, which a centre crop would cut away
    img[mask > 0] = 230
    _save(root / "bottle" / "test" / "broken_large" / "000.png", Image.fromarray(img))
    _save(root / "bottle" / "ground_truth" / "broken_large" / "000_mask.png", Image.fromarray(mask))
    _save(root / "bottle" / "test" / "good" / "000.png", Image.new("RGB", (48, 24), (20, 20, 20)))
    c = cfg(name="mvtec_ad", category="bottle", mvtec_root=str(root), data_dir=str(tmp_path / "tfds"),
            load_size=24, resize_mode="pad")
    test = load_split(c, "test")
    assert test.images.shape == (2, 24, 24, 3) and test.masks.shape == (2, 24, 24)
    assert test.info["resize_mode"] == "pad" and test.name.endswith("_pad")
    bad = int(np.flatnonzero(test.is_anomaly)[0])
    m, v = test.masks[bad], test.images[bad][..., 0].astype(float)
    assert m.sum() == 16  # 8x8 defect halved to 4x4, nothing cropped away
    assert v[m == 1].mean() > 150 and v[m == 0].mean() < 60
    assert (test.images[:, :6] == 0).all() and (test.masks[:, :6] == 0).all()  # letterbox rows


# ---------------------------------------------------------------------------
# (d) Pillow's decompression-bomb limit


def test_max_image_pixels_is_a_config_key_and_is_restored(tmp_path):
    root = tmp_path / "big"
    for cls in ("a", "b"):
        for i in range(3):
            _save(root / cls / f"{i}.png", Image.new("RGB", (8, 8), (i, i, i)))
    before = Image.MAX_IMAGE_PIXELS
    with pytest.raises(UserInputError) as err:  # 64 pixels > 2 x 10: refused, as a 182-MP PNG is by default
        load_split(cfg(name="image_folder", data_dir=str(root), max_image_pixels=10), "train")
    assert "data.max_image_pixels" in str(err.value) and "0 for no limit" in str(err.value)
    assert Image.MAX_IMAGE_PIXELS == before
    split = load_split(cfg(name="image_folder", data_dir=str(root), max_image_pixels=0), "train")
    assert split.images.shape == (4, 8, 8, 3) and Image.MAX_IMAGE_PIXELS == before
    with pytest.raises(UserInputError, match=">= 0"):
        load_split(cfg(name="image_folder", data_dir=str(root), max_image_pixels=-1), "train")

    mvtec = tmp_path / "mvtec"
    _save(mvtec / "bottle" / "train" / "good" / "000.png", Image.new("RGB", (8, 8)))
    _save(mvtec / "bottle" / "test" / "good" / "000.png", Image.new("RGB", (8, 8)))
    with pytest.raises(UserInputError, match="data.max_image_pixels"):
        load_split(cfg(name="mvtec_ad", category="bottle", mvtec_root=str(mvtec), data_dir=str(tmp_path / "t"),
                       max_image_pixels=10), "train")
    assert Image.MAX_IMAGE_PIXELS == before
