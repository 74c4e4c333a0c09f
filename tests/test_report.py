"""Tests for ssl_ad.evaluation.report and ssl_ad.evaluation.plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

import ssl_ad
from ssl_ad import figures
from ssl_ad.evaluation import plots, report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _row(feature: str, scorer: str, protocol: str = "leave_one_class_out", **extra) -> dict:
    return {
        "feature": feature,
        "scorer": scorer,
        "protocol": protocol,
        "mean_auroc": 0.81234,
        "std_auroc": 0.0456,
        "mean_aupr": 0.7,
        "per_round": {"cat": np.float64(0.8), "dog": 0.82},
        "fit_seconds": 1.5,
        "score_seconds": 0.25,
        "warnings": ["pca_dims clamped", "k_range clamped"],
        **extra,
    }


ROWS = [
    _row("dino_vits16", "kmeans", k=np.int64(3)),
    _row("dino_vits16", "knn"),
    _row("mae_vitb16", "kmeans"),
    _row("mae_vitb16", "knn", protocol="one_class"),
]
META = {"seed": 0, "checkpoints": {"dino": {"path": Path("runs/dino/ckpt"), "step": 1000}}, "config": {"k": 2}}


def test_atomic_write_complete_and_no_temp_files(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"
    text = "line\n" * 10_000
    report.atomic_write_text(target, text)
    report.atomic_write_text(target, text + "more\n")  # overwrite in place
    assert target.read_text() == text + "more\n"
    assert [p.name for p in target.parent.iterdir()] == ["out.txt"]


def test_atomic_write_failure_keeps_old_file(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    report.atomic_write_text(target, "old")

    with pytest.raises(TypeError):
        report.atomic_write_text(target, 123)  # type: ignore[arg-type]
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out.txt"]


def test_results_json_schema(tmp_path: Path) -> None:
    path = report.write_results_json(tmp_path / "results.json", ROWS, META)
    data = json.loads(path.read_text())
    assert data["schema_version"] == report.SCHEMA_VERSION
    assert data["meta"]["ssl_ad_version"] == ssl_ad.__version__
    assert data["meta"]["checkpoints"]["dino"] == {"path": "runs/dino/ckpt", "step": 1000}
    assert len(data["results"]) == 4
    for row in data["results"]:
        assert set(report.REQUIRED_KEYS) <= set(row)
    assert data["results"][0]["per_round"] == {"cat": 0.8, "dog": 0.82}
    assert data["results"][0]["k"] == 3


def test_missing_keys_rejected(tmp_path: Path) -> None:
    bad = {k: v for k, v in ROWS[0].items() if k != "mean_aupr"}
    with pytest.raises(ValueError, match="mean_aupr"):
        report.write_results_json(tmp_path / "r.json", [bad], META)


def test_results_csv_flattens_per_round(tmp_path: Path) -> None:
    rows = ROWS + [_row("raw_pixels", "gmm") | {"per_round": {"fox": 0.5}}]
    path = report.write_results_csv(tmp_path / "results.csv", rows)
    with path.open() as f:
        lines = list(csv.DictReader(f))
    assert len(lines) == 5
    header = list(lines[0])
    for key in report.REQUIRED_KEYS:
        if key != "per_round":
            assert key in header
    assert "per_round" not in header
    assert header[-3:] == ["auroc_cat", "auroc_dog", "auroc_fox"]
    assert lines[0]["auroc_cat"] == "0.8" and lines[0]["auroc_fox"] == ""
    assert lines[4]["auroc_fox"] == "0.5"
    assert lines[0]["warnings"] == "pca_dims clamped; k_range clamped"
    assert lines[0]["k"] == "3"


def test_markdown_table() -> None:
    md = report.markdown_table(ROWS)
    assert "### Protocol: leave_one_class_out" in md and "### Protocol: one_class" in md
    assert "| feature | kmeans | knn |" in md
    assert "| dino_vits16 | 0.812 ± 0.046 | 0.812 ± 0.046 |" in md
    assert "| mae_vitb16 | 0.812 ± 0.046 | – |" in md
    with pytest.raises(ValueError, match="duplicate"):
        report.markdown_table(ROWS + [ROWS[0]])


def test_report_md(tmp_path: Path) -> None:
    cmd = "python -m ssl_ad.evaluate --config configs/eval.yaml"
    path = report.write_report_md(tmp_path / "report.md", ROWS, META, ["plots/roc.png"], cmd)
    md = path.read_text()
    assert cmd in md
    assert "![roc](plots/roc.png)" in md
    assert "0.812 ± 0.046" in md
    assert "pca_dims clamped" in md
    assert ssl_ad.__version__ in md


def test_failed_and_skipped_rounds_and_nan_means_in_every_writer(tmp_path: Path) -> None:
    partly = _row("pixels", "knn", per_round={"cat": 0.9}, mean_auroc=0.9, std_auroc=0.0,
                  failed_rounds={"dog": "LinAlgError: singular"}, skipped_rounds={"fox": "Round 'fox': no test images"})
    none = _row("pixels", "gmm", per_round={}, mean_auroc=float("nan"), std_auroc=np.float64("nan"),
                mean_aupr=float("nan"), failed_rounds={"cat": "ValueError: a", "dog": "ValueError: b"})
    rows = [partly, none]
    meta = {**META, "failures": [{"stage": "plot", "what": "tsne_pixels", "reason": "ValueError: too few"}],
            "skipped_rounds": {"leave_one_class_out": {"fox": "Round 'fox': no test images"}},
            "warnings": ["t-SNE of pixels: perplexity clamped from 30 to 1 (4 points)."]}

    text = report.write_results_json(tmp_path / "results.json", rows, meta).read_text()
    assert "NaN" not in text
    data = json.loads(text)
    assert data["results"][1]["mean_auroc"] is None and data["results"][1]["std_auroc"] is None
    assert data["results"][0]["failed_rounds"] == {"dog": "LinAlgError: singular"}

    with report.write_results_csv(tmp_path / "results.csv", rows).open() as f:
        lines = list(csv.DictReader(f))
    assert lines[0]["failed_rounds"] == "dog: LinAlgError: singular"
    assert lines[0]["skipped_rounds"] == "fox: Round 'fox': no test images"
    assert lines[1]["mean_auroc"] == "" and lines[1]["mean_aupr"] == "" and lines[1]["auroc_cat"] == ""

    table = report.markdown_table(rows)
    assert "| pixels | 0.900 ± 0.000 (1 of 2 rounds failed) | failed |" in table
    md = report.write_report_md(tmp_path / "report.md", rows, meta, [], "cmd").read_text()
    assert "## Failures" in md and "plot `tsne_pixels`: ValueError: too few" in md
    assert "## Skipped rounds" in md and "`leave_one_class_out` / `fox`: Round 'fox': no test images" in md
    assert "- t-SNE of pixels: perplexity clamped from 30 to 1 (4 points)." in md
    assert "NaN" not in md


# --- plots -----------------------------------------------------------------------


def _is_png(path: Path) -> bool:
    return path.stat().st_size > 1000 and path.read_bytes()[:8] == PNG_MAGIC


def test_plot_roc_bars_elbow(tmp_path: Path) -> None:
    curves = {
        "cat": (np.array([0, 0.2, 1]), np.array([0, 0.7, 1]), 0.75),
        "dog": (np.array([0, 1]), np.array([0, 1]), 0.5),
    }
    assert _is_png(plots.plot_roc_curves(curves, "ROC", tmp_path / "roc.png"))
    table = {("dino", "kmeans"): (0.8, 0.05), ("dino", "knn"): (0.9, 0.02), ("mae", "knn"): (0.7, 0.1)}
    assert _is_png(plots.plot_auroc_bars(table, tmp_path / "bars.png"))
    assert _is_png(plots.plot_elbow({1: 10.0, 2: 4.0, 3: 1.0, 4: 0.8}, 3, tmp_path / "deep" / "elbow.png"))


def test_plot_tsne_clamps_perplexity_with_a_note_and_refuses_two_points(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    notes: list[str] = []
    path = plots.plot_tsne(rng.standard_normal((5, 8)), np.array([0, 0, 1, 1, 1]), ["a", "b"], tmp_path / "t.png",
                           notes=notes)
    assert _is_png(path) and notes == ["perplexity clamped from 30 to 1.33333 (5 points)."]
    with pytest.raises(ValueError, match="at least 3 points; got 2"):
        plots.plot_tsne(rng.standard_normal((2, 8)), np.array([0, 1]), ["a", "b"], tmp_path / "t2.png")


def test_plot_tsne(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    labels = np.repeat([0, 1, 2], 30)
    feats = rng.standard_normal((90, 20)) + 3.0 * labels[:, None]
    out = plots.plot_tsne(
        feats, labels, ["a", "b", "c"], tmp_path / "tsne.png", is_anomaly=labels == 2, max_points=60, seed=0
    )
    assert _is_png(out)


def test_stratified_sample_keeps_proportions() -> None:
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    idx = plots.stratified_sample(labels, 10, seed=0)
    assert np.bincount(labels[idx]).tolist() == [5, 3, 2]
    np.testing.assert_array_equal(idx, plots.stratified_sample(labels, 10, seed=0))


def test_plot_image_grid(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    imgs = rng.random((3, 8, 8, 3))
    err = rng.random((3, 8, 8))
    titles = ["masked", "recon", "original", "error"]
    out = figures.plot_image_grid([imgs, imgs, imgs, err], titles, tmp_path / "g.png")
    assert _is_png(out)
    with pytest.raises(ValueError):
        figures.plot_image_grid([imgs, err[:2]], ["a", "b"], tmp_path / "bad.png")
