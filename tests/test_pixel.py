"""Pixel-level evaluation: pixel AUROC and PRO against brute force, MVTec rounds, maps, end to end."""

from __future__ import annotations

import json
import os
from bisect import bisect_right

import numpy as np
import pytest

from ssl_ad.evaluation import protocols as pr
from ssl_ad.evaluation.pixel_maps import bank_indices, patch_knn_maps, upsample_maps
from ssl_ad.evaluation.pixel_metrics import pixel_auroc, pro_curve, pro_score

# ---------------------------------------------------------------------------
# Brute force, written independently of pixel_metrics.


def _components(mask: np.ndarray) -> list[list[tuple[int, int]]]:
    """8-connected components of a 2-D 0/1 mask by flood fill."""
    seen = np.zeros(mask.shape, bool)
    out = []
    for y0, x0 in zip(*np.nonzero(mask)):
        if seen[y0, x0]:
            continue
        stack, comp = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            comp.append((y, x))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    v, u = y + dy, x + dx
                    if 0 <= v < mask.shape[0] and 0 <= u < mask.shape[1] and mask[v, u] and not seen[v, u]:
                        seen[v, u] = True
                        stack.append((v, u))
        out.append(comp)
    return out


def _brute_pro(masks, maps, max_fpr=0.3):
    regions = [(i, comp) for i in range(masks.shape[0]) for comp in _components(masks[i])]
    normal = masks == 0
    xs, ys = [0.0], [0.0]
    for t in sorted(set(maps.ravel().tolist()), reverse=True):
        above = maps >= t
        xs.append(above[normal].sum() / normal.sum())
        ys.append(np.mean([np.mean([above[i, y, x] for y, x in comp]) for i, comp in regions]))
    # Trapezoid up to max_fpr, interpolating the curve at exactly max_fpr (MVTec's reference rule).
    area = 0.0
    for j in range(1, len(xs)):
        if xs[j] <= max_fpr:
            area += 0.5 * (ys[j] + ys[j - 1]) * (xs[j] - xs[j - 1])
    ins = bisect_right(xs, max_fpr)
    if ins < len(xs) and xs[ins - 1] < max_fpr:
        y_at = ys[ins - 1] + (ys[ins] - ys[ins - 1]) * (max_fpr - xs[ins - 1]) / (xs[ins] - xs[ins - 1])
        area += 0.5 * (ys[ins - 1] + y_at) * (max_fpr - xs[ins - 1])
    return area / max_fpr


def _brute_auroc(masks, maps):
    pos, neg = maps[masks == 1], maps[masks == 0]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (pos.size * neg.size)


def _fixture_masks() -> np.ndarray:
    """3 images 6x6: a 2x3 and a 1-pixel region (image 0), an L-shaped 4-pixel region made of
    two diagonal-touching parts (8-connected: one region; image 1), nothing (image 2)."""
    m = np.zeros((3, 6, 6), np.uint8)
    m[0, 1:3, 1:4] = 1
    m[0, 5, 5] = 1
    m[1, 2, 2] = m[1, 3, 3] = m[1, 4, 3] = m[1, 4, 4] = 1
    return m


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("levels", [5, 1000])  # 5 levels: many ties across normal and anomalous pixels
def test_pro_and_pixel_auroc_equal_brute_force(seed, levels):
    masks = _fixture_masks()
    rng = np.random.default_rng(seed)
    maps = np.floor(rng.random(masks.shape) * levels) / levels + 0.3 * masks * rng.random(masks.shape)
    for max_fpr in (0.3, 0.05, 1.0):
        assert pro_score(masks, maps, max_fpr) == pytest.approx(_brute_pro(masks, maps, max_fpr), abs=1e-12)
    assert pixel_auroc(masks, maps) == pytest.approx(_brute_auroc(masks, maps), abs=1e-12)
    fpr, pro = pro_curve(masks, maps)
    assert fpr[0] == pro[0] == 0.0 and fpr[-1] == pro[-1] == 1.0
    assert np.all(np.diff(fpr) >= 0) and np.all(np.diff(pro) >= -1e-15)
    assert fpr.size == np.unique(maps).size + 1


def test_pro_hand_checkable_cases():
    masks = np.zeros((2, 6, 6), np.uint8)
    masks[0, 0:2, 0:2] = 1  # region A, 4 pixels
    masks[1, 3:6, 3:6] = 1  # region B, 9 pixels
    perfect = masks.astype(np.float64) + 0.01 * np.arange(72).reshape(2, 6, 6) / 72
    assert pro_score(masks, perfect) == pytest.approx(1.0)
    assert pixel_auroc(masks, perfect) == pytest.approx(1.0)
    # A scored above every normal pixel, B below everything: PRO = 1/2 for every FPR in (0, 1).
    half = np.full((2, 6, 6), 0.5)
    half[0, 0:2, 0:2] = 1.0
    half[1, 3:6, 3:6] = 0.0
    assert pro_score(masks, half) == pytest.approx(0.5)
    assert pro_score(masks, half, max_fpr=1.0) == pytest.approx(0.5)
    # Regions weigh equally whatever their size; pixel AUROC weighs pixels (4 of 13 ranked first).
    assert pixel_auroc(masks, half) == pytest.approx(4 / 13)


def test_metric_inputs_fail_loudly():
    masks = _fixture_masks()
    with pytest.raises(ValueError, match="shape"):
        pro_score(masks, np.zeros((3, 6, 5)))
    with pytest.raises(ValueError, match="both normal and anomalous"):
        pixel_auroc(np.zeros_like(masks), np.zeros(masks.shape))
    with pytest.raises(ValueError, match="NaN"):
        pro_score(masks, np.full(masks.shape, np.nan))
    with pytest.raises(ValueError, match="max_fpr"):
        pro_score(masks, np.zeros(masks.shape), max_fpr=0.0)


# ---------------------------------------------------------------------------
# Rounds.

CATS = ["bottle", "cable", "grid"]
TRAIN = np.array([0, 0, 1, 2, 1, 0, 2, 2, 1, 1])  # 3 / 4 / 3 train images
TEST = np.array([0, 1, 2, 0, 1, 2, 0, 1, 2, 2, 0])
BAD = np.array([0, 0, 0, 1, 1, 1, 1, 0, 1, 0, 1], bool)  # good test: 0:[0], 1:[1, 7], 2:[2, 9]


def test_mvtec_rounds_standard():
    rounds = pr.mvtec_rounds(TRAIN, TEST, BAD, CATS, categories_as_labels=True, variant="mvtec")
    assert [r.name for r in rounds] == CATS
    for c, r in enumerate(rounds):
        np.testing.assert_array_equal(r.train_idx, np.flatnonzero(TRAIN == c))
        np.testing.assert_array_equal(r.test_idx, np.flatnonzero(TEST == c))
        np.testing.assert_array_equal(r.test_is_anomaly, BAD[TEST == c])
    assert [len(r.test_idx) for r in rounds] == [4, 3, 4]
    assert [int(r.test_is_anomaly.sum()) for r in rounds] == [3, 1, 2]
    # One category: labels are defect types ('good' = 0); one round over everything.
    defects = np.array([0, 1, 2, 1, 0])
    (single,) = pr.mvtec_rounds(np.zeros(4, int), defects, defects > 0, ["good", "crack", "cut"],
                                categories_as_labels=False, variant="mvtec", name="bottle")
    assert single.name == "bottle"
    np.testing.assert_array_equal(single.train_idx, np.arange(4))
    np.testing.assert_array_equal(single.test_idx, np.arange(5))
    np.testing.assert_array_equal(single.test_is_anomaly, defects > 0)


def test_mvtec_rounds_study_variant():
    rounds = pr.mvtec_rounds(TRAIN, TEST, BAD, CATS, categories_as_labels=True, variant="mvtec_study")
    good = np.flatnonzero(~BAD)
    for c, r in enumerate(rounds):
        np.testing.assert_array_equal(r.train_idx, np.arange(TRAIN.size))
        np.testing.assert_array_equal(r.test_idx, np.sort(np.concatenate([good, np.flatnonzero(BAD & (TEST == c))])))
        np.testing.assert_array_equal(r.test_is_anomaly, BAD[r.test_idx])
    assert [len(r.test_idx) for r in rounds] == [5 + 3, 5 + 1, 5 + 2]
    with pytest.raises(ValueError, match="categories as labels"):
        pr.mvtec_rounds(TRAIN, TEST, BAD, CATS, categories_as_labels=False, variant="mvtec_study")
    with pytest.raises(ValueError, match="variant"):
        pr.mvtec_rounds(TRAIN, TEST, BAD, CATS, categories_as_labels=True, variant="leave_one_out")


# ---------------------------------------------------------------------------
# Map making.


def test_upsample_matches_jax_bilinear_and_smooths():
    import jax

    rng = np.random.default_rng(0)
    low = rng.random((2, 4, 4)).astype(np.float32)
    up = upsample_maps(low, (32, 32))
    ref = np.asarray(jax.image.resize(low, (2, 32, 32), method="linear"))
    np.testing.assert_allclose(up, ref, atol=1e-5)
    assert upsample_maps(np.full((1, 3, 3), 2.0), (20, 12), sigma=2.0) == pytest.approx(np.full((1, 20, 12), 2.0))
    smooth = upsample_maps(low, (32, 32), sigma=4.0)
    assert smooth.std() < up.std() and smooth.mean() == pytest.approx(up.mean(), rel=0.05)


def test_patch_knn_maps_and_bank():
    rng = np.random.default_rng(0)
    bank = rng.normal(size=(50, 8)).astype(np.float32)
    test = bank[:16].reshape(1, 16, 8).copy()
    test[0, 5] += 10.0  # one patch far from the bank
    maps = patch_knn_maps(bank, test, k=1)
    assert maps.shape == (1, 4, 4)
    assert np.argmax(maps) == 5 and np.delete(maps.ravel(), 5).max() < 1e-3
    img, tok = bank_indices(3, 16, 20, seed=1)
    img2, tok2 = bank_indices(3, 16, 20, seed=1)
    assert img.size == 20 and np.array_equal(img, img2) and np.array_equal(tok, tok2)
    assert len(set(zip(img.tolist(), tok.tolist()))) == 20 and img.max() < 3 and tok.max() < 16
    assert bank_indices(2, 16, 0, seed=1)[0].size == 32


def test_pixel_metrics_leave_out_images_whose_defect_type_has_no_masks():
    """A defect type without ground-truth masks has all-zero mask rows (ImageSplit.mask_valid False):
    its images count for image AUROC but not for pixel AUROC / PRO, and the row says so."""
    import ml_collections
    from sklearn.metrics import roc_auc_score

    from ssl_ad.data.split import ImageSplit
    from ssl_ad.evaluation.pixel_eval import PixelEvaluator
    from ssl_ad.evaluation.pixel_maps import MapSource
    from ssl_ad.evaluation.protocols import Round

    rng = np.random.default_rng(0)
    n, size = 6, 8
    masks = np.zeros((n, size, size), np.uint8)
    masks[2, 2:5, 2:5] = masks[3, 4:8, 0:3] = 1  # 'dent': masked
    low = rng.uniform(0.0, 0.3, (n, size, size)).astype(np.float32)  # maps at mask size: upsampling is exact
    low[masks > 0] += 1.0
    low[4:6] += 1.5  # 'scratch' (no masks): anomalous everywhere, so counting its pixels as normal would hurt
    test = ImageSplit("t", "test", np.zeros((n, size, size, 3), np.uint8), np.array([0, 0, 1, 1, 2, 2]),
                      ["good", "dent", "scratch"], is_anomaly=np.array([0, 0, 1, 1, 1, 1], bool), masks=masks,
                      info={"defects_without_masks": ["scratch"]},
                      mask_valid=np.array([1, 1, 1, 1, 0, 0], bool))
    train = ImageSplit("t", "train", np.zeros((2, size, size, 3), np.uint8), np.zeros(2, np.int64), ["good"])
    config = ml_collections.ConfigDict({"seed": 0, "batch_size": 4, "mae_recon": {"num_masks": 1}, "pixel": {
        "k": 1, "max_bank": 0, "sigma": 0.0, "overlays": 0, "metric": "l2", "max_fpr": 0.3}})
    ev = PixelEvaluator(config, train, test, ["mae_recon"])
    rnd = Round("all", np.arange(2), np.arange(n), test.is_anomaly)
    row, _ = ev._rows(MapSource("m", 0, None, None, None), "mae_recon", "mvtec", [rnd], None, low, "")

    valid = test.mask_valid
    assert row["per_round_pixel_auroc"]["all"] == pytest.approx(
        roc_auc_score(masks[valid].ravel(), low[valid].ravel()), abs=1e-9)
    assert row["per_round_pixel_auroc"]["all"] > roc_auc_score(masks.ravel(), low.ravel()) + 0.05
    assert row["per_round"]["all"] == pytest.approx(  # image AUROC (map maximum) keeps every image
        roc_auc_score(test.is_anomaly, low.reshape(n, -1).max(axis=1)), abs=1e-9)
    assert ("pixel AUROC and PRO leave out 2 test image(s) of defect type(s) without ground-truth masks "
            "['scratch']; image AUROC uses them.") in row["warnings"]


# ---------------------------------------------------------------------------
# End to end on an MVTec AD tree.


@pytest.fixture(scope="module")
def mvtec_run(tmp_path_factory):
    from configs import mae_mvtec
    from ssl_ad.train.loop import train_and_evaluate
    from tests.test_datasets import _write_mvtec

    root = str(tmp_path_factory.mktemp("mvtec"))
    _write_mvtec(root)  # bottle (24 px RGB) and hazelnut (32 px grey), masks for every defect
    data_dir = str(tmp_path_factory.mktemp("mvtec_tfds"))
    c = mae_mvtec.get_config()
    c.data.mvtec_root, c.data.data_dir, c.data.load_size = root, data_dir, 32
    c.total_steps, c.batch_size, c.log_every, c.checkpoint_every = 2, 4, 1, 2
    c.model.variant = ""  # the sizes below instead of the config's "S/16"
    c.model.image_size, c.model.patch_size, c.model.width, c.model.depth, c.model.num_heads = 32, 8, 32, 1, 2
    c.mae.decoder_width, c.mae.decoder_depth, c.mae.decoder_heads = 32, 1, 2
    c.optim.warmup_steps = 1
    workdir = str(tmp_path_factory.mktemp("mae_mvtec"))
    train_and_evaluate(c, workdir)
    return root, data_dir, workdir


def test_mvtec_evaluation_with_pixel_maps(mvtec_run, tmp_path):
    from configs import eval_mvtec
    from ssl_ad.evaluation.report import REQUIRED_KEYS
    from ssl_ad.evaluation.runner import run_evaluation

    root, data_dir, workdir = mvtec_run
    c = eval_mvtec.get_config()
    c.data.mvtec_root, c.data.data_dir, c.data.load_size = root, data_dir, 32
    c.checkpoint = workdir
    c.sources = "random_init"
    c.protocols = "mvtec,mvtec_study"
    c.scorers = "knn,mae_recon"
    c.pixel_maps = "patch_knn,mae_recon"
    c.mae_recon.num_masks = 2
    c.pca_dims = 4
    c.tsne_points = 0
    c.pixel.max_bank = 40  # hazelnut's 2 train images have 32 tokens, bottle's 3 have 48, all 5: 80
    c.pixel.sigma = 1.0
    c.pixel.overlays = 2
    out = tmp_path / "report"
    rows = run_evaluation(c, str(out))

    name = os.path.basename(workdir)
    rand = f"random_init[{name}]"
    pixel = {(r["feature"], r["scorer"], r["protocol"]): r for r in rows if r["scorer"].startswith("pixel_")}
    assert set(pixel) == {
        (f, f"pixel_{m}", p)
        for p in ("mvtec", "mvtec_study")
        for f, m in ((rand, "patch_knn"), (name, "patch_knn"), (name, "mae_recon"))
    }
    for row in pixel.values():
        assert set(REQUIRED_KEYS) <= set(row)
        assert set(row["per_round"]) == set(row["per_round_pixel_auroc"]) == set(row["per_round_pro"]) == {
            "bottle", "hazelnut"}
        for key in ("mean_auroc", "mean_pixel_auroc", "mean_pro"):
            assert 0.0 <= row[key] <= 1.0
        assert all(0.0 <= v <= 1.0 for v in [*row["per_round_pixel_auroc"].values(), *row["per_round_pro"].values()])
    assert pixel[(rand, "pixel_patch_knn", "mvtec")]["bank_tokens"] == 40  # bottle: 48 -> 40
    assert pixel[(rand, "pixel_patch_knn", "mvtec_study")]["bank_tokens_before_subsampling"] == 80
    # Image-level rows of both protocols are there too, fit/tested on the right rounds.
    assert {(r["feature"], r["scorer"], r["protocol"]) for r in rows if not r["scorer"].startswith("pixel_")} >= {
        (rand, "knn", "mvtec"), (name, "mae_recon", "mvtec_study")}

    for protocol in ("mvtec", "mvtec_study"):
        overlays = sorted(os.listdir(out / "plots" / "pixel" / protocol))
        assert len(overlays) == 3 * 2 and all(f.endswith(".png") for f in overlays)
        assert (out / "plots" / f"pro_{protocol}.png").stat().st_size > 0
    data = json.loads((out / "results.json").read_text())
    assert any("mean_pro" in r for r in data["results"])
    assert "mean_pixel_auroc" in (out / "results.csv").read_text().splitlines()[0]


def test_mvtec_protocol_errors(tmp_path, data_dir):
    from configs import eval_mnist5k
    from ssl_ad.errors import UserInputError
    from ssl_ad.evaluation.runner import run_evaluation

    c = eval_mnist5k.get_config()
    c.data.data_dir = data_dir
    c.sources = "pixels"
    c.protocols = "mvtec"
    with pytest.raises(UserInputError, match="anomaly labels"):
        run_evaluation(c, str(tmp_path / "a"))
    c.protocols = "one_class"
    c.pixel_maps = "patch_knn,gradcam"
    with pytest.raises(UserInputError, match="gradcam"):
        run_evaluation(c, str(tmp_path / "b"))
