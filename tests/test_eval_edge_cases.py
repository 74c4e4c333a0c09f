"""Issue 12: numbers a researcher can trust on tiny and unusual image folders.

Each test builds the folder from the issue with PIL in tmp_path (64x32 grey images: seeded noise
plus one bright vertical bar whose position depends on the class) and runs the real evaluation on
raw pixels (no ViT), then checks the numbers, not just that nothing raised.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from configs import eval_mnist5k
from ssl_ad.errors import UserInputError
from ssl_ad.evaluation import scorers as sc
from ssl_ad.evaluation.runner import failures_in, run_evaluation
from tests.conftest import REPO, apply_overrides

FEATURE_SCORERS = ("knn", "mahalanobis", "kmeans", "gmm_kmeans", "gmm")
BAR_X = {"left": 2, "good": 2, "right": 58, "scratch": 58, "mid": 30}  # bar column per class (4 px wide)


def bar_image(rng: np.random.Generator, cls: str) -> np.ndarray:
    """64 wide x 32 high grey: uniform noise, plus a bright 4-px bar near the class's edge (x jitters by 0-3)."""
    img = rng.integers(0, 256, size=(32, 64)).astype(np.uint8)
    x = BAR_X[cls] + (int(rng.integers(0, 4)) * (1 if BAR_X[cls] < 32 else -1))
    img[:, x : x + 4] = 255
    return img


def make_folder(root, spec: dict[str, dict[str, int]], seed: int = 0) -> str:
    """root/<split>/<class>/<i>.png with spec = {split: {class: count}}."""
    rng = np.random.default_rng(seed)
    for split, classes in spec.items():
        for cls, n in classes.items():
            folder = os.path.join(root, split, cls)
            os.makedirs(folder, exist_ok=True)
            for i in range(n):
                Image.fromarray(bar_image(rng, cls), mode="L").save(os.path.join(folder, f"{i}.png"))
    return str(root)


def folder_config(root: str, **overrides):
    c = eval_mnist5k.get_config()
    apply_overrides(c, {"data.name": "image_folder", "data.data_dir": root, "sources": "pixels", "checkpoint": "",
                        "protocols": "one_class", "scorers": "knn", "tsne_points": 0, "max_train_per_round": 0,
                        **overrides})
    return c


def load_results(out) -> dict:
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


LEFT_RIGHT = {"train": {"left": 6, "right": 6}, "test": {"left": 6, "right": 6}}


# --------------------------------------------------------------------------------------------
# Case 1: a projection fit on a few normals must not throw away where the anomaly lives.


def test_every_feature_scorer_keeps_what_lies_outside_the_normals_span(tmp_path):
    root = make_folder(tmp_path / "data", LEFT_RIGHT)
    out = tmp_path / "out"
    rows = run_evaluation(folder_config(root, scorers=",".join(FEATURE_SCORERS)), str(out))  # pca_dims=100
    assert {r["scorer"]: r["per_round"] for r in rows} == {s: {"left": 1.0, "right": 1.0} for s in FEATURE_SCORERS}
    for row in rows:
        assert row["failed_rounds"] == {} and row["skipped_rounds"] == {}
        assert "pca_dims clamped from 100 to 5 (n_samples=6, n_features=6144)." in row["warnings"]
        assert any("residual" in w and "6 training normals span only 5" in w for w in row["warnings"]), row
    assert load_results(out)["meta"]["failures"] == []


def test_plain_pca_on_this_folder_loses_the_bar(tmp_path):
    """The same features without the residual ('never', the old behaviour) rank the rounds wrongly,
    so the test above really exercises the fault; with 5 normals Mahalanobis fails the same way."""
    from ssl_ad.data.sources import load_split
    from ssl_ad.evaluation.embedding import pixel_features
    from sklearn.metrics import roc_auc_score

    for n_train in (6, 5):
        root = make_folder(tmp_path / f"data{n_train}", {"train": {"left": n_train, "right": n_train},
                                                         "test": {"left": 6, "right": 6}})
        c = folder_config(root)
        train, test = (load_split(c.data, s) for s in ("train", "test"))
        x_tr, x_te = pixel_features(train.images), pixel_features(test.images)
        fit_on, is_anomaly = x_tr[train.labels == 0], test.labels != 0  # round 'left'
        auc = {}
        for mode in ("never", "auto"):
            for name, kwargs in (("knn", {"k": 2, "metric": "cosine"}), ("mahalanobis", {})):
                s = sc.build_scorer(name, pca_dims=100, pca_residual=mode, **kwargs).fit(fit_on).score(x_te)
                auc[name, mode] = roc_auc_score(is_anomaly, s)
        assert auc["mahalanobis", "never"] < 0.5 and auc["mahalanobis", "auto"] == 1.0, (n_train, auc)
        assert auc["knn", "auto"] == 1.0, (n_train, auc)
        if n_train == 6:
            assert auc["knn", "never"] < 0.5, auc


# --------------------------------------------------------------------------------------------
# Case 3: one optional part fails, the run goes on and says so.


def test_tsne_on_two_test_images_is_a_recorded_failure_and_every_result_is_written(tmp_path):
    root = make_folder(tmp_path / "data", {"train": {"left": 6, "right": 6}, "test": {"left": 1, "right": 1}})
    out = tmp_path / "out"
    rows = run_evaluation(folder_config(root, tsne_points=1000), str(out))
    assert rows[0]["per_round"] == {"left": 1.0, "right": 1.0}
    for name in ("results.json", "results.csv", "report.md"):
        assert (out / name).stat().st_size > 0
    failures = failures_in(str(out))
    assert failures == [{"stage": "plot", "what": "tsne_pixels",
                         "reason": "ValueError: t-SNE needs at least 3 points; got 2."}]
    assert "## Failures" in (out / "report.md").read_text() and "t-SNE needs at least 3 points" in (out / "report.md").read_text()
    assert not (out / "plots" / "tsne_pixels.png").exists() and (out / "plots" / "auroc_one_class.png").exists()

    # 4 test images: t-SNE runs with its perplexity clamped, noted in the run's warnings.
    root4 = make_folder(tmp_path / "data4", {"train": {"left": 6, "right": 6}, "test": {"left": 2, "right": 2}})
    run_evaluation(folder_config(root4, tsne_points=1000, scorers="knn"), str(tmp_path / "out4"))
    meta = load_results(tmp_path / "out4")["meta"]
    assert meta["failures"] == [] and meta["warnings"] == ["t-SNE of pixels: perplexity clamped from 30 to 1 (4 points)."]
    assert (tmp_path / "out4" / "plots" / "tsne_pixels.png").exists()


def test_knn_k_above_the_training_normals_is_clamped_and_noted(tmp_path):
    root = make_folder(tmp_path / "data", {"train": {"left": 5, "right": 5}, "test": {"left": 3, "right": 3}})
    rows = run_evaluation(folder_config(root, **{"scorer_args.knn.k": 10}), str(tmp_path / "out"))
    (row,) = rows
    assert row["per_round"] == {"left": 1.0, "right": 1.0} and row["k_first_round"] == 5
    assert "k clamped from 10 to n_samples=5." in row["warnings"]


class _FailsOnRight(sc.KNNScorer):
    """kNN that raises when fit on the 'right' normals (bar on the right: high mean of the last columns)."""

    def _fit(self, x):
        if x.reshape(x.shape[0], 32, 64, 3)[:, :, 56:, :].mean() > 0.6:
            raise np.linalg.LinAlgError("boom on right")
        super()._fit(x)


def test_a_scorer_failing_on_a_round_keeps_the_other_rounds_and_rows(tmp_path, monkeypatch):
    monkeypatch.setitem(sc.SCORERS, "knn", _FailsOnRight)
    root = make_folder(tmp_path / "data", LEFT_RIGHT)
    out = tmp_path / "out"
    rows = run_evaluation(folder_config(root, scorers="knn,kmeans"), str(out))
    knn, kmeans = rows
    assert knn["per_round"] == {"left": 1.0} and knn["mean_auroc"] == 1.0
    assert knn["failed_rounds"] == {"right": "LinAlgError: boom on right"}
    assert kmeans["per_round"] == {"left": 1.0, "right": 1.0} and kmeans["failed_rounds"] == {}
    assert failures_in(str(out)) == [{"stage": "score", "what": "pixels / knn / one_class / right",
                                      "reason": "LinAlgError: boom on right"}]
    md = (out / "report.md").read_text()
    assert "| pixels | 1.000 ± 0.000 (1 of 2 rounds failed) | 1.000 ± 0.000 |" in md
    with open(out / "results.csv") as f:
        lines = list(csv.DictReader(f))
    assert lines[0]["failed_rounds"] == "right: LinAlgError: boom on right" and lines[0]["auroc_right"] == ""


def test_a_scorer_failing_on_every_round_is_null_empty_and_failed_and_exit_code_4(tmp_path, monkeypatch):
    class AlwaysFails(sc.KNNScorer):
        def _fit(self, x):
            raise ValueError("no way")

    root = make_folder(tmp_path / "data", LEFT_RIGHT)
    out = tmp_path / "out"
    monkeypatch.setitem(sc.SCORERS, "knn", AlwaysFails)
    (row,) = run_evaluation(folder_config(root), str(out))
    assert np.isnan(row["mean_auroc"]) and row["per_round"] == {}
    text = (out / "results.json").read_text()
    assert "NaN" not in text and json.loads(text)["results"][0]["mean_auroc"] is None
    assert "| pixels | failed |" in (out / "report.md").read_text()
    with open(out / "results.csv") as f:
        assert next(csv.DictReader(f))["mean_auroc"] == ""
    assert len(failures_in(str(out))) == 2


def test_evaluate_cli_writes_the_results_and_exits_4_when_a_part_failed(tmp_path):
    """(Exit 0 when nothing failed: evaluate.py exits 4 only when failures_in(outdir), checked above, is non-empty.)"""
    root = make_folder(tmp_path / "data", {"train": {"left": 6, "right": 6}, "test": {"left": 1, "right": 1}})
    proc = subprocess.run(
        [sys.executable, "evaluate.py", "--config=configs/eval_mnist5k.py", "--config.data.name=image_folder",
         f"--config.data.data_dir={root}", "--config.sources=pixels", "--config.protocols=one_class",
         "--config.scorers=knn", "--config.tsne_points=1000", f"--outdir={tmp_path / 'out'}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 4, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "1 part(s) of the evaluation failed" in proc.stderr
    assert "| pixels | 1.000 ± 0.000 |" in proc.stdout
    assert load_results(tmp_path / "out")["results"][0]["per_round"] == {"left": 1.0, "right": 1.0}


# --------------------------------------------------------------------------------------------
# Case 4: protocol edge cases.


def test_a_class_without_test_images_is_a_skipped_round_naming_it(tmp_path):
    root = make_folder(tmp_path / "data", {"train": {"left": 6, "mid": 6, "right": 6},
                                           "test": {"left": 4, "right": 4}})
    out = tmp_path / "out"
    rows = run_evaluation(folder_config(root, protocols="one_class,leave_one_class_out"), str(out))
    by_protocol = {r["protocol"]: r for r in rows}
    assert by_protocol["one_class"]["per_round"] == {"left": 1.0, "right": 1.0}
    assert by_protocol["leave_one_class_out"]["per_round"] == {"left": 1.0, "right": 1.0}
    skipped = load_results(out)["meta"]["skipped_rounds"]
    assert skipped == {
        "one_class": {"mid": "Round 'mid': the test split needs both normal and anomalous images; it has 0 normal and 8 anomalous."},
        "leave_one_class_out": {"mid": "Round 'mid': the test split needs both normal and anomalous images; it has 8 normal and 0 anomalous."},
    }
    assert by_protocol["one_class"]["skipped_rounds"] == skipped["one_class"]
    assert "## Skipped rounds" in (out / "report.md").read_text()


def test_train_good_test_good_and_scratch_evaluates_good_vs_defect(tmp_path):
    root = make_folder(tmp_path / "data", {"train": {"good": 6}, "test": {"good": 4, "scratch": 4}})
    out = tmp_path / "out"
    rows = run_evaluation(folder_config(root, protocols="good_vs_defect,one_class,leave_one_class_out"), str(out))
    assert {r["protocol"]: r["per_round"] for r in rows} == {
        "good_vs_defect": {"good": 1.0}, "one_class": {"good": 1.0}, "leave_one_class_out": {"scratch": 1.0}}
    skipped = load_results(out)["meta"]["skipped_rounds"]
    assert set(skipped) == {"one_class", "leave_one_class_out"}
    assert "no training normals" in skipped["one_class"]["scratch"]
    assert "no training normals" in skipped["leave_one_class_out"]["good"]


def test_good_vs_defect_needs_the_normal_class_and_a_protocol_with_no_round_is_one_error(tmp_path):
    root = make_folder(tmp_path / "data", {"train": {"left": 3, "right": 3}, "test": {"left": 2, "right": 2}})
    with pytest.raises(UserInputError, match=r"good_vs_defect.*class named 'good'.*\['left', 'right'\]"):
        run_evaluation(folder_config(root, protocols="good_vs_defect"), str(tmp_path / "out"))
    rows = run_evaluation(folder_config(root, protocols="good_vs_defect", normal_class="left"), str(tmp_path / "out"))
    assert rows[0]["per_round"] == {"left": 1.0}
    only_good = make_folder(tmp_path / "good", {"train": {"good": 3}, "test": {"good": 2}})
    with pytest.raises(UserInputError, match="no round of protocol 'one_class' can be scored.*0 anomalous"):
        run_evaluation(folder_config(only_good), str(tmp_path / "out2"))
