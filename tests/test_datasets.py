"""Real-data loaders on tiny fixtures written in their exact on-disk layouts (no network).

COCO 2017 (annotations JSON + JPEGs), MVTec AD (PNG tree with ground-truth
masks), image folders (with and without split folders), CIFAR-10 through
``tfds.testing.mock_data``, and the errors users see.
"""

from __future__ import annotations

import json
import os
import time

import ml_collections
import numpy as np
import pytest
from PIL import Image

from ssl_ad.data.sources import LOADERS, load_split
from ssl_ad.errors import UserInputError


def cfg(**kw) -> ml_collections.ConfigDict:
    return ml_collections.ConfigDict(kw)


# ---------------------------------------------------------------------------
# COCO 2017

COCO_CATEGORIES = [
    {"id": 1, "name": "person", "supercategory": "person"},
    {"id": 2, "name": "bicycle", "supercategory": "vehicle"},
    {"id": 10, "name": "traffic light", "supercategory": "outdoor"},
    {"id": 52, "name": "banana", "supercategory": "food"},
    {"id": 59, "name": "pizza", "supercategory": "food"},
    {"id": 72, "name": "tv", "supercategory": "electronic"},
]
W, H = 64, 48
# image id -> [(category id, area, bbox, iscrowd)]; the first chosen instance
# listed with the largest area is painted white in the image.
COCO_TRAIN = {
    1: [(2, 2000, [4, 4, 40, 30], 0)],  # bicycle -> kept
    2: [(2, 2000, [4, 4, 40, 30], 0), (59, 1500, [30, 20, 30, 20], 0)],  # bicycle + pizza -> dropped
    3: [(52, 3000, [40, 10, 20, 20], 0), (52, 1200, [2, 2, 10, 10], 0)],  # two bananas -> kept, box of largest
    4: [(72, 2000, [10, 10, 30, 30], 0), (1, 5000, [0, 0, 60, 40], 0)],  # tv + person (not chosen) -> kept
    5: [(59, 5000, [0, 0, 60, 40], 1)],  # crowd pizza only -> dropped
    6: [(10, 100, [5, 5, 10, 10], 0)],  # tiny traffic light only -> dropped
    7: [(59, 2000, [20, 8, 24, 24], 0), (2, 4000, [0, 0, 60, 40], 1), (52, 50, [1, 1, 5, 5], 0)],  # pizza (+crowd, tiny) -> kept
    8: [(1, 3000, [0, 0, 50, 40], 0)],  # person only -> dropped
    9: [],  # no annotations -> dropped
    10: [(52, 2000, [2, 2, 20, 20], 0), (59, 2000, [30, 20, 30, 20], 0)],  # banana + pizza -> dropped (kept as 'food')
}
COCO_VAL = {
    101: [(10, 1100, [8, 8, 20, 40], 0)],  # traffic light -> kept
    102: [(72, 1500, [1, 1, 30, 30], 0), (10, 1500, [30, 10, 20, 30], 0)],  # tv + traffic light -> dropped
    103: [(52, 1024, [10, 10, 32, 32], 0)],  # banana, area exactly min_area -> kept
}
STUDY = ["bicycle", "tv", "banana", "traffic light", "pizza"]


def _coco_color(image_id: int) -> tuple[int, int, int]:
    return (image_id * 23) % 200, (image_id * 57) % 200, (image_id * 101) % 200


def _write_coco(root: str) -> None:
    os.makedirs(os.path.join(root, "annotations"))
    ann_id = 0
    for part, table in (("train2017", COCO_TRAIN), ("val2017", COCO_VAL)):
        os.makedirs(os.path.join(root, part))
        images, annotations = [], []
        for image_id, anns in table.items():
            name = f"{image_id:012d}.jpg"
            arr = np.zeros((H, W, 3), np.uint8) + np.array(_coco_color(image_id), np.uint8)
            chosen = [a for a in anns if a[0] != 1 and not a[3]]
            if chosen:
                x, y, w, h = max(chosen, key=lambda a: a[1])[2]
                arr[y:y + h, x:x + w] = 255
            Image.fromarray(arr).save(os.path.join(root, part, name), quality=95)
            images.append({"id": image_id, "file_name": name, "width": W, "height": H})
            for cat, area, bbox, crowd in anns:
                ann_id += 1
                annotations.append(
                    {"id": ann_id, "image_id": image_id, "category_id": cat, "area": area, "bbox": bbox,
                     "iscrowd": crowd, "segmentation": []}
                )
        with open(os.path.join(root, "annotations", f"instances_{part}.json"), "w") as f:
            json.dump({"images": images, "annotations": annotations, "categories": COCO_CATEGORIES}, f)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("coco"))
    _write_coco(root)
    return root, str(tmp_path_factory.mktemp("coco_tfds"))


def _image_ids(images: np.ndarray, candidates) -> list[int]:
    """Identifies each (uncropped) image by its background colour (corner pixel)."""
    out = []
    for img in images:
        corner = img[-1, 0].astype(int)
        out.append(min(candidates, key=lambda i: np.abs(corner - _coco_color(i)).sum()))
    return out


def test_coco_single_label_rule(coco):
    root, data_dir = coco
    c = cfg(name="coco2017", coco_root=root, data_dir=data_dir, load_size=0)
    train, test = load_split(c, "train"), load_split(c, "test")
    assert train.class_names == STUDY and test.class_names == STUDY
    assert train.images.shape == (4, H, W, 3) and train.images.dtype == np.uint8
    got = dict(zip(_image_ids(train.images, COCO_TRAIN), train.labels.tolist()))
    assert got == {1: 0, 3: 2, 4: 1, 7: 4}
    got = dict(zip(_image_ids(test.images, COCO_VAL), test.labels.tolist()))
    assert got == {101: 3, 103: 2}


def test_coco_crop_to_box_and_supercategories(coco):
    root, data_dir = coco
    c = cfg(name="coco2017", coco_root=root, data_dir=data_dir, load_size=16, crop_to_box=True, box_margin=0.0)
    train = load_split(c, "train")
    assert train.images.shape == (4, 16, 16, 3)
    # The largest chosen instance's box is painted white: the square crop is centred on it.
    assert (train.images[:, 3:13, 3:13].reshape(4, -1).mean(1) > 240).all()
    square_boxes = [v for v in COCO_TRAIN.values() if v and v[0][2][2] == v[0][2][3]]  # w == h: crop is the box
    assert len(square_boxes) >= 2 and (np.sort(train.images.reshape(4, -1).mean(1))[-3:] > 240).all()
    plain = load_split(cfg(name="coco2017", data_dir=data_dir, load_size=16), "train")  # prepared: no root needed
    assert plain.images.shape == (4, 16, 16, 3) and (plain.images.reshape(4, -1).mean(1) < 225).all()
    assert plain.name != train.name  # feature caches key on the name

    food = load_split(cfg(name="coco2017", coco_root=root, data_dir=data_dir, supercategories=["food"], load_size=0), "train")
    assert food.class_names == ["food"]
    assert sorted(_image_ids(food.images, COCO_TRAIN)) == [2, 3, 7, 10] and (food.labels == 0).all()
    two = load_split(
        cfg(name="coco2017", coco_root=root, data_dir=data_dir, supercategories=["vehicle", "food"], load_size=0), "train"
    )
    got = dict(zip(_image_ids(two.images, COCO_TRAIN), two.labels.tolist()))
    assert got == {1: 0, 3: 1, 7: 1, 10: 1}


def test_coco_errors(coco, tmp_path):
    root, _ = coco
    with pytest.raises(UserInputError, match="available"):
        load_split(cfg(name="coco2017", coco_root=root, data_dir=str(tmp_path), categories=["unicorn"]), "train")
    with pytest.raises(UserInputError, match="coco_root"):
        load_split(cfg(name="coco2017", data_dir=str(tmp_path)), "train")
    with pytest.raises(UserInputError, match="no split 'val'"):
        load_split(cfg(name="coco2017", coco_root=root, data_dir=str(tmp_path)), "val")


# ---------------------------------------------------------------------------
# MVTec AD

# category -> (size, grey?, {folder under test: count}, train count)
MVTEC = {
    "bottle": (24, False, {"good": 1, "broken_large": 2, "contamination": 1}, 3),
    "hazelnut": (32, True, {"good": 1, "crack": 1, "print": 1}, 2),
}


def _mvtec_image(size: int, grey: bool, mask: np.ndarray | None, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    arr = rng.integers(10, 60, (size, size, 3), dtype=np.uint8)  # dark background
    if mask is not None:
        arr[mask > 0] = 230  # the defect is bright, exactly where the mask is set
    if grey:
        return Image.fromarray(arr[..., 0], mode="L")
    return Image.fromarray(arr, mode="RGB")


def _write_mvtec(root: str) -> None:
    seed = 0
    for cat, (size, grey, test, n_train) in MVTEC.items():
        os.makedirs(os.path.join(root, cat, "train", "good"))
        for i in range(n_train):
            seed += 1
            _mvtec_image(size, grey, None, seed).save(os.path.join(root, cat, "train", "good", f"{i:03d}.png"))
        for kind, n in test.items():
            os.makedirs(os.path.join(root, cat, "test", kind))
            if kind != "good":
                os.makedirs(os.path.join(root, cat, "ground_truth", kind))
            for i in range(n):
                seed += 1
                mask = None
                if kind != "good":
                    mask = np.zeros((size, size), np.uint8)
                    y, x = 2 + 3 * i, 4 + 2 * i
                    mask[y:y + size // 2, x:x + size // 3] = 255
                    Image.fromarray(mask).save(os.path.join(root, cat, "ground_truth", kind, f"{i:03d}_mask.png"))
                _mvtec_image(size, grey, mask, seed).save(os.path.join(root, cat, "test", kind, f"{i:03d}.png"))


@pytest.fixture(scope="module")
def mvtec(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("mvtec"))
    _write_mvtec(root)
    return root, str(tmp_path_factory.mktemp("mvtec_tfds"))


def test_mvtec_one_category(mvtec):
    root, data_dir = mvtec
    c = cfg(name="mvtec_ad", category="bottle", mvtec_root=root, data_dir=data_dir, load_size=0)
    train, test = load_split(c, "train"), load_split(c, "test")
    assert train.class_names == ["good", "broken_large", "broken_small", "contamination"]
    assert train.images.shape == (3, 24, 24, 3) and (train.labels == 0).all()
    assert not train.is_anomaly.any() and train.masks.shape == (3, 24, 24) and not train.masks.any()
    assert test.images.shape == (4, 24, 24, 3)
    assert sorted(test.labels.tolist()) == [0, 1, 1, 3]
    np.testing.assert_array_equal(test.is_anomaly, test.labels > 0)
    assert test.masks.dtype == np.uint8 and set(np.unique(test.masks)) <= {0, 1}
    for img, mask, bad in zip(test.images, test.masks, test.is_anomaly):
        assert mask.any() == bad
        # Native size: the mask is set exactly where the defect was painted.
        np.testing.assert_array_equal(mask, (img[..., 0] > 128).astype(np.uint8))


def test_mvtec_all_and_resized_masks(mvtec):
    root, data_dir = mvtec
    with pytest.raises(UserInputError, match="load_size"):  # bottle 24 px, hazelnut 32 px
        load_split(cfg(name="mvtec_ad", category="all", mvtec_root=root, data_dir=data_dir), "test")
    c = cfg(name="mvtec_ad", category="all", mvtec_root=root, data_dir=data_dir, load_size=16)
    train, test = load_split(c, "train"), load_split(c, "test")
    assert train.class_names == ["bottle", "hazelnut"] == test.class_names
    assert train.images.shape == (5, 16, 16, 3) and sorted(train.labels.tolist()) == [0, 0, 0, 1, 1]
    assert not train.is_anomaly.any()
    assert test.images.shape == (7, 16, 16, 3) and test.masks.shape == (7, 16, 16)
    assert sorted(test.labels.tolist()) == [0, 0, 0, 0, 1, 1, 1] and int(test.is_anomaly.sum()) == 5
    grey = test.images[test.labels == 1]
    assert (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()  # grey PNG -> RGB
    for img, mask, bad in zip(test.images, test.masks, test.is_anomaly):
        assert mask.any() == bad
        if bad:  # resized with the same geometry: masked pixels are the bright ones
            v = img[..., 0].astype(float)
            assert v[mask == 1].mean() > 180 and v[mask == 0].mean() < 110
    prepared_only = load_split(cfg(name="mvtec_ad", category="all", data_dir=data_dir, load_size=16), "test")
    assert prepared_only.class_names == ["bottle", "hazelnut"] and len(prepared_only) == 7


def test_mvtec_errors(mvtec, tmp_path):
    root, _ = mvtec
    with pytest.raises(UserInputError, match="bottle"):
        load_split(cfg(name="mvtec_ad", category="botle", mvtec_root=root, data_dir=str(tmp_path)), "train")
    with pytest.raises(UserInputError, match="mvtec_root"):
        load_split(cfg(name="mvtec_ad", category="bottle", data_dir=str(tmp_path)), "train")
    broken = tmp_path / "broken"
    _write_mvtec(str(broken))
    os.remove(broken / "bottle" / "ground_truth" / "contamination" / "000_mask.png")
    with pytest.raises(UserInputError, match="000_mask.png"):
        load_split(cfg(name="mvtec_ad", category="bottle", mvtec_root=str(broken), data_dir=str(tmp_path / "t")), "test")


# ---------------------------------------------------------------------------
# Image folders


def _save(path, img: Image.Image, fmt: str | None = None) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    img.save(path, format=fmt)


def test_image_folder_modes_and_corrupt_file(tmp_path):
    root = tmp_path / "split_tree"
    _save(root / "train" / "cat" / "grey.png", Image.new("L", (8, 8), 100))
    _save(root / "train" / "cat" / "rgba.png", Image.new("RGBA", (8, 8), (10, 20, 30, 0)))
    pal = Image.new("P", (8, 8), 1)
    pal.putpalette([0, 0, 0, 200, 0, 0] + [0] * 762)
    _save(root / "train" / "dog" / "palette.png", pal)
    _save(root / "train" / "dog" / "photo.jpg", Image.new("RGB", (8, 8), (0, 0, 250)))
    _save(root / "train" / "dog" / "bitmap.bmp", Image.new("RGB", (8, 8), (0, 250, 0)))
    (root / "train" / "dog" / "notes.txt").write_text("not an image, ignored")
    _save(root / "test" / "dog" / "x.png", Image.new("RGB", (8, 8), (1, 2, 3)))
    _save(root / "test" / "bird" / "y.png", Image.new("RGB", (8, 8), (4, 5, 6)))

    train = load_split(cfg(name="image_folder", data_dir=str(root)), "train")
    assert train.class_names == ["bird", "cat", "dog"]  # union over splits, sorted
    assert train.images.shape == (5, 8, 8, 3) and train.labels.tolist() == [1, 1, 2, 2, 2]
    centre = [tuple(int(v) for v in img[4, 4]) for img in train.images]
    assert centre[0] == (100, 100, 100)  # grey.png
    assert centre[1] == (10, 20, 30)  # rgba.png: alpha dropped
    # dog's files sorted: bitmap.bmp, palette.png, photo.jpg
    assert centre[2] == (0, 250, 0) and centre[3] == (200, 0, 0) and abs(centre[4][2] - 250) < 4
    test = load_split(cfg(name="image_folder", data_dir=str(root)), "test")
    assert test.labels.tolist() == [0, 2] and test.class_names == train.class_names

    with pytest.raises(UserInputError, match=r"\['test', 'train'\]"):
        load_split(cfg(name="image_folder", data_dir=str(root)), "validation")

    bad = root / "train" / "cat" / "zz_bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    with pytest.raises(UserInputError, match="zz_bad.png"):
        load_split(cfg(name="image_folder", data_dir=str(root)), "train")


def test_image_folder_sizes(tmp_path):
    root = tmp_path / "sizes"
    wide = np.zeros((20, 40, 3), np.uint8)
    wide[:, :10] = (255, 0, 0)
    wide[:, 10:30] = (0, 0, 255)
    wide[:, 30:] = (0, 255, 0)
    _save(root / "a" / "wide.png", Image.fromarray(wide))
    _save(root / "a" / "small.png", Image.new("RGB", (12, 12), (0, 0, 255)))
    with pytest.raises(UserInputError, match="load_size"):  # round(2 * 0.2) = 0 test images
        load_split(cfg(name="image_folder", data_dir=str(root)), "train")
    split = load_split(cfg(name="image_folder", data_dir=str(root), load_size=10), "train")
    assert split.images.shape == (2, 10, 10, 3)
    # Shorter side resized, centre cropped: only the blue middle of the wide image remains.
    assert (split.images[..., 2] > 200).all() and (split.images[..., :2] < 50).all()


def test_image_folder_stratified_split(tmp_path):
    root = tmp_path / "flat"
    counts = {"a": 10, "b": 7, "c": 3}
    value = 0
    for cls, n in counts.items():
        for i in range(n):
            value += 1
            _save(root / cls / f"{i:02d}.png", Image.new("L", (4, 4), value * 10))
    c = cfg(name="image_folder", data_dir=str(root))  # test_fraction 0.2: round(2), round(1.4), round(0.6)
    train, test = load_split(c, "train"), load_split(c, "test")
    assert len(train) == 16 and len(test) == 4
    assert np.bincount(train.labels).tolist() == [8, 6, 2] and np.bincount(test.labels).tolist() == [2, 1, 1]
    ids_train, ids_test = set(train.images[:, 0, 0, 0].tolist()), set(test.images[:, 0, 0, 0].tolist())
    assert not ids_train & ids_test and len(ids_train | ids_test) == 20
    again = load_split(c, "test")
    np.testing.assert_array_equal(again.images, test.images)
    np.testing.assert_array_equal(again.labels, test.labels)
    half = load_split(cfg(name="image_folder", data_dir=str(root), test_fraction=0.5), "test")
    assert np.bincount(half.labels).tolist() == [5, 4, 2]  # 3.5 and 1.5 round half up
    with pytest.raises(UserInputError, match="no split 'val'"):
        load_split(c, "val")


def test_image_folder_errors(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserInputError, match=str(missing)):
        load_split(cfg(name="image_folder", data_dir=str(missing)), "train")
    root = tmp_path / "empty_class"
    _save(root / "a" / "x.png", Image.new("RGB", (4, 4)))
    os.makedirs(root / "b")
    with pytest.raises(UserInputError, match=os.path.join("empty_class", "b")):
        load_split(cfg(name="image_folder", data_dir=str(root)), "train")
    split_root = tmp_path / "split_empty"
    _save(split_root / "train" / "a" / "x.png", Image.new("RGB", (4, 4)))
    os.makedirs(split_root / "train" / "b")
    with pytest.raises(UserInputError, match=os.path.join("train", "b")):
        load_split(cfg(name="image_folder", data_dir=str(split_root)), "train")


# ---------------------------------------------------------------------------
# CIFAR-10 and the registry


def test_cifar10_mock(tmp_path):
    import tensorflow_datasets as tfds

    data_dir = str(tmp_path)
    builder = tfds.builder("cifar10", data_dir=data_dir)
    template = tfds.core.ShardedFileTemplate(
        data_dir=builder.data_path, template="{DATASET}-{SPLIT}.{FILEFORMAT}-{SHARD_X_OF_Y}",
        dataset_name="cifar10", filetype_suffix="tfrecord",
    )
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0, filename_template=template.replace(split=s))
        for s, n in (("train", 50000), ("test", 10000))
    ]))
    os.makedirs(builder.data_path, exist_ok=True)
    builder.info.write_to_directory(builder.data_path)  # metadata only: the set counts as prepared
    with tfds.testing.mock_data(num_examples=12, policy=tfds.testing.MockPolicy.USE_FILES, data_dir=data_dir):
        split = load_split(cfg(name="cifar10", data_dir=data_dir), "test")
        assert split.images.shape == (12, 32, 32, 3) and split.images.dtype == np.uint8
        assert split.labels.shape == (12,) and len(split.class_names) == 10
        capped = load_split(cfg(name="cifar10", data_dir=data_dir, max_per_class=1), "train")
        assert np.bincount(capped.labels).max() == 1 and len(capped) == len(np.unique(capped.labels))


def test_cifar10_not_prepared_fails_fast(tmp_path):
    t0 = time.perf_counter()
    with pytest.raises(UserInputError, match="data_dir") as err:
        load_split(cfg(name="cifar10", data_dir=str(tmp_path)), "train")
    assert time.perf_counter() - t0 < 5
    assert str(tmp_path) in str(err.value)


def test_unknown_data_set_lists_names():
    with pytest.raises(UserInputError) as err:
        load_split(cfg(name="imagenet"), "train")
    for name in ("mnist5k", "cifar10", "image_folder", "mvtec_ad", "coco2017"):
        assert name in LOADERS and name in str(err.value)


# ---------------------------------------------------------------------------
# The accelerator configs run on these loaders (shrunk to a few CPU seconds).


def _shrink(c, **data):
    c.total_steps, c.batch_size, c.log_every, c.checkpoint_every = 2, 4, 1, 2
    c.model.variant = ""  # the sizes below instead of the config's "S/16"
    c.model.image_size, c.model.patch_size, c.model.width, c.model.depth, c.model.num_heads = 16, 4, 32, 1, 2
    c.mae.decoder_width, c.mae.decoder_depth, c.mae.decoder_heads = 32, 1, 2
    c.optim.warmup_steps = 1
    for k, v in data.items():
        c.data[k] = v
    return c


def test_mae_mvtec_config_trains(mvtec, tmp_path):
    from configs import mae_image_folder, mae_mvtec
    from ssl_ad.data.pipeline import train_batches
    from ssl_ad.train.loop import train_and_evaluate

    root, data_dir = mvtec
    c = _shrink(mae_mvtec.get_config(), mvtec_root=root, data_dir=data_dir, load_size=20)
    state = train_and_evaluate(c, str(tmp_path / "run"))
    assert int(state.step) == 2
    assert os.path.exists(tmp_path / "run" / "metrics.jsonl")

    folder = tmp_path / "folder"
    for i in range(6):
        _save(folder / ("a" if i % 2 else "b") / f"{i}.jpg", Image.new("RGB", (30 + i, 24), (i * 40, 0, 0)))
    c = _shrink(mae_image_folder.get_config(), data_dir=str(folder), load_size=20)
    batch = next(train_batches(c, load_split(c.data, c.data.train_split), 0))
    assert batch["image"].shape == (4, 16, 16, 3)
