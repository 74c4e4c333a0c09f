"""predict.py: fit on normal images, score new ones, threshold at a false-positive rate."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image
from sklearn.neighbors import NearestNeighbors

from ssl_ad.config_defaults import predict_config
from ssl_ad.errors import UserInputError
from ssl_ad.evaluation.predict import list_images, run_prediction, threshold_at_fpr
from ssl_ad.train.loop import train_and_evaluate
from tests.conftest import REPO, tiny_mae_config
from tests.test_eval_edge_cases import bar_image

ENV = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")


def write_images(folder, classes: list[str], seed: int) -> list[str]:
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i, cls in enumerate(classes):
        path = os.path.join(folder, f"{i:02d}_{cls}.png")
        Image.fromarray(bar_image(rng, cls), mode="L").save(path)
        paths.append(path)
    return paths


@pytest.fixture()
def folders(tmp_path):
    normal = write_images(tmp_path / "good", ["left"] * 20, seed=0)
    new = write_images(tmp_path / "new", ["left", "right"] * 4, seed=1)
    return str(tmp_path / "good"), str(tmp_path / "new"), normal, new


def pixel_config(good, new, **kw):
    c = predict_config()
    c.normal_dir, c.images, c.pixel_size, c.pca_dims, c.resize_mode = good, new, 16, 0, "stretch"
    for k, v in kw.items():
        c[k] = v
    return c


def cosine_knn(fit, x, k=2):
    return NearestNeighbors(n_neighbors=k, metric="cosine").fit(fit).kneighbors(x)[0].mean(axis=1)


def test_pixels_scores_threshold_and_csv(tmp_path, folders):
    good, new, normal_files, new_files = folders
    out = tmp_path / "out"
    summary = run_prediction(pixel_config(good, new, fpr=0.1, folds=4), str(out))
    with open(out / "scores.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["file"] for r in rows] == sorted(new_files)
    flagged = {os.path.basename(r["file"]).split("_")[1][:-4] for r in rows if r["anomalous"] == "1"}
    assert flagged == {"right"} and summary["anomalous"] == 4

    # Independent recomputation: 16x16 grey-as-RGB pixels in [0, 1], cosine kNN (k=2) mean distance
    # (resize_mode='stretch': the 64x32 images are resized to 16x16 as they are)
    def load(paths):
        out = []
        for p in paths:
            out.append(np.asarray(Image.open(p).convert("RGB").resize((16, 16), Image.BICUBIC)))
        return np.stack(out).reshape(len(paths), -1) / 255.0

    fit, x = load(sorted(normal_files)), load(sorted(new_files))
    scores = np.array([float(r["score"]) for r in rows])
    np.testing.assert_allclose(scores, cosine_knn(fit, x), rtol=1e-4, atol=1e-6)
    order = np.random.default_rng(0).permutation(20)
    oof = np.empty(20)
    for part in np.array_split(order, 4):
        rest = np.setdiff1d(order, part)
        oof[part] = cosine_knn(fit[rest], fit[part])
    assert summary["threshold"] == pytest.approx(float(np.quantile(oof, 0.9, method="higher")), rel=1e-4)
    saved = json.loads((out / "prediction.json").read_text())
    assert saved["normal_images"] == 20 and saved["new_images"] == 8 and saved["new_images_per_second"] > 0


def test_threshold_calls_fpr_of_normals_anomalous():
    s = np.arange(100, dtype=float)
    t = threshold_at_fpr(s, 0.05)
    assert t == 95.0 and (s > t).mean() == pytest.approx(0.04)  # 'higher': at most fpr above it


def test_glob_and_errors(tmp_path, folders):
    good, new, _, _ = folders
    assert len(list_images(os.path.join(new, "*_right.png"), "images")) == 4
    with pytest.raises(UserInputError, match=r"config.images=.*holds no image file"):
        list_images(str(tmp_path / "nothing*.png"), "images")
    with pytest.raises(UserInputError, match=r"config.normal_dir is empty"):
        list_images("", "normal_dir")
    few = write_images(tmp_path / "few", ["left"] * 3, seed=2)
    with pytest.raises(UserInputError, match=r"3 normal images are too few"):
        run_prediction(pixel_config(os.path.dirname(few[0]), new), str(tmp_path / "o"))
    with pytest.raises(UserInputError, match=r"config.scorer='mae_recon'; choose a feature scorer"):
        run_prediction(pixel_config(good, new, scorer="mae_recon"), str(tmp_path / "o2"))


def test_checkpoint_with_overlays(tmp_path, folders, data_dir):
    good, new, _, _ = folders
    workdir = str(tmp_path / "mae")
    train_and_evaluate(tiny_mae_config(data_dir, total_steps=4, log_every=2, checkpoint_every=4), workdir)
    c = pixel_config(good, new, checkpoint=workdir, overlays=3)
    summary = run_prediction(c, str(tmp_path / "out"))
    assert summary["source"] == "mae" and os.path.getsize(summary["overlays"]) > 0
    # Features are cached with a fingerprint: a second run reuses them and gives the same scores.
    again = run_prediction(c, str(tmp_path / "out"))
    assert again["threshold"] == summary["threshold"]


def test_cli_bad_input_is_exit_2(tmp_path, folders):
    good, _, _, _ = folders
    proc = subprocess.run([sys.executable, "predict.py", f"--config.normal_dir={good}",
                           f"--config.images={tmp_path / 'none'}", "--config.fpr=1.5", f"--outdir={tmp_path / 'o'}"],
                          cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "fpr=1.5" in proc.stderr and not (tmp_path / "o").exists()
