"""The validation split carved from a training split, and the AD monitor logged during training."""

from __future__ import annotations

import os

import ml_collections
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from ssl_ad.data.pipeline import preprocess_eval
from ssl_ad.data.sources import load_split
from ssl_ad.data.split import stratified_subset, validation_indices
from ssl_ad.errors import UserInputError
from ssl_ad.evaluation import embedding
from ssl_ad.event_files import read_scalars
from ssl_ad.methods import build_method
from ssl_ad.models.vit import vit_from_config
from ssl_ad.train.loop import train_and_evaluate
from ssl_ad.train.metrics_log import read_metrics
from tests.conftest import tiny_mae_config


def test_validation_indices_are_stratified_fixed_and_never_a_whole_class():
    labels = np.repeat(np.arange(4), [50, 30, 2, 1])
    idx = validation_indices(labels, 0.1)
    assert np.array_equal(idx, validation_indices(labels, 0.1))  # fixed seed: every run the same images
    assert np.all(np.diff(idx) > 0)
    counts = np.bincount(labels[idx], minlength=4)
    assert counts.tolist() == [5, 3, 1, 0]  # round(0.1 n), at least 1 if n >= 2, never the whole class
    with pytest.raises(UserInputError, match=r"data.val_fraction=1.0; expected a fraction in \(0, 1\)"):
        validation_indices(labels, 1.0)


def test_val_and_fit_splits_partition_the_training_split(data_dir):
    cfg = ml_collections.ConfigDict({"name": "mnist5k", "data_dir": data_dir, "val_fraction": 0.1})
    train = load_split(cfg, "train")
    val, fit = load_split(cfg, "train:val"), load_split(cfg, "train:fit")
    assert (val.split, fit.split) == ("train:val", "train:fit")
    assert len(val) + len(fit) == len(train) and len(val) == 400  # 4,000 training images, 10 classes
    assert np.bincount(val.labels).tolist() == [40] * 10
    rows = {r.tobytes() for r in train.images.reshape(len(train), -1)}
    val_rows = {r.tobytes() for r in val.images.reshape(len(val), -1)}
    fit_rows = {r.tobytes() for r in fit.images.reshape(len(fit), -1)}
    assert val_rows | fit_rows <= rows and not (val_rows & fit_rows)
    bank = stratified_subset(fit, 360)
    assert len(bank) == 360 and np.bincount(bank.labels).tolist() == [36] * 10


def _knn_auroc(bank, bank_labels, val, val_labels, normal_fn, k=2):
    """Cosine kNN (mean distance to the k nearest normals), AUROC per round, mean over rounds."""
    aucs = []
    for c in np.unique(val_labels):
        normal = normal_fn(bank_labels, c)
        nn = NearestNeighbors(n_neighbors=k, metric="cosine").fit(bank[normal])
        dist, _ = nn.kneighbors(val)
        is_anomaly = ~normal_fn(val_labels, c)
        aucs.append(roc_auc_score(is_anomaly, dist.mean(axis=1)))
    return float(np.mean(aucs))


def test_monitor_logs_the_validation_auroc_an_independent_knn_gives(tmp_path, data_dir):
    c = tiny_mae_config(data_dir, total_steps=6, log_every=4, checkpoint_every=6)
    c.data.train_split = "train:fit"
    c.monitor.every_steps = 3
    c.monitor.max_bank = 300
    c.monitor.pca_dims = 0
    workdir = str(tmp_path / "run")
    state = train_and_evaluate(c, workdir)
    rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [3, 4, 6]  # monitor steps are logged even between log steps
    for r in (rows[0], rows[2]):
        for p in ("one_class", "leave_one_class_out"):
            assert 0.0 <= r[f"val_auroc/{p}"] <= 1.0
    assert "val_auroc/one_class" not in rows[1]

    # The last row, recomputed independently from the final parameters.
    data = c.data
    fit, val = load_split(data, "train:fit"), load_split(data, "train:val")
    bank = stratified_subset(fit, 300)
    model = vit_from_config(c.model, method="mae", drop_path_rate=0.0)
    enc = build_method(c).encoder_params(state.params, state.extra)
    embed = lambda s: embedding.embed_images(model, enc, preprocess_eval(s.images, 28, data.mean, data.std), "cls")  # noqa: E731
    fb, fv = embed(bank), embed(val)
    one_class = _knn_auroc(fb, bank.labels, fv, val.labels, lambda y, c: y == c)
    loco = _knn_auroc(fb, bank.labels, fv, val.labels, lambda y, c: y != c)
    assert rows[2]["val_auroc/one_class"] == pytest.approx(one_class, abs=1e-4)
    assert rows[2]["val_auroc/leave_one_class_out"] == pytest.approx(loco, abs=1e-4)
    assert rows[2]["val_seconds"] > 0

    # The same scalars are in the run's TensorBoard event file, at the same steps.
    events = read_scalars(workdir)
    assert [s for s, _ in events["loss"]] == [3, 4, 6]
    for key in ("loss", "lr", "images_per_s", "val_auroc/one_class", "val_auroc/leave_one_class_out"):
        logged = [(r["step"], r[key]) for r in rows if key in r]
        assert [s for s, _ in events[key]] == [s for s, _ in logged]
        np.testing.assert_allclose([v for _, v in events[key]], [v for _, v in logged], rtol=1e-6)
