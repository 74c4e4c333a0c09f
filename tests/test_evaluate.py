"""End-to-end evaluation on a tiny MAE checkpoint: every output file, its schema, caching, errors."""

import json
import os
import subprocess
import sys

import ml_collections
import pytest

from configs import dino_mnist5k, eval_mnist5k, mae_mnist5k
from ssl_ad.config_check import validate_train_config
from ssl_ad.errors import UserInputError
from ssl_ad.evaluation.features import random_init_baselines
from ssl_ad.evaluation.report import REQUIRED_KEYS
from ssl_ad.evaluation.runner import run_evaluation
from ssl_ad.event_files import read_scalars
from ssl_ad.models.vit import vit_from_config
from ssl_ad.train.loop import train_and_evaluate
from tests.conftest import REPO, tiny_mae_config


@pytest.fixture(scope="module")
def mae_run(tmp_path_factory, data_dir):
    workdir = str(tmp_path_factory.mktemp("mae_run"))
    train_and_evaluate(tiny_mae_config(data_dir, total_steps=10, checkpoint_every=10), workdir)
    return workdir


def tiny_eval_config(data_dir, checkpoint):
    c = eval_mnist5k.get_config()
    c.data.data_dir = data_dir
    c.checkpoint = checkpoint
    c.max_train_per_round = 60
    c.tsne_points = 80
    c.pca_dims = 16
    c.mae_recon.num_masks = 2
    c.protocols = "leave_one_class_out,one_class"
    c.scorer_args.kmeans.k_range = (1, 4)
    c.scorer_args.gmm_kmeans.k_range = (1, 4)
    c.scorer_args.gmm.k_range = (1, 3)
    return c


def test_evaluation_writes_every_output_with_schema(tmp_path, data_dir, mae_run):
    out = tmp_path / "report"
    rows = run_evaluation(tiny_eval_config(data_dir, mae_run), str(out), command="python evaluate.py ...")
    for name in ("results.json", "results.csv", "report.md"):
        assert (out / name).stat().st_size > 0
    data = json.loads((out / "results.json").read_text())
    results = data["results"]
    assert len(results) == len(rows)
    for row in results:
        assert set(REQUIRED_KEYS) <= set(row)
        assert set(row["per_round"]) == {str(i) for i in range(10)}
        assert 0.0 <= row["mean_auroc"] <= 1.0
    # The AUROC table is also a TensorBoard event file: one scalar per row, at the checkpoint's step.
    events = read_scalars(str(out))
    name = os.path.basename(mae_run)
    for row in results:
        (step, value), = events[f"auroc/{row['protocol']}/{row['scorer']}/{row['feature']}"]
        assert value == pytest.approx(row["mean_auroc"], rel=1e-6) and step == (10 if row["feature"] == name else 0)
    got = {(r["feature"], r["scorer"], r["protocol"]) for r in results}
    feature_scorers = ["knn", "mahalanobis", "kmeans", "gmm_kmeans", "gmm"]
    for protocol in ("leave_one_class_out", "one_class"):
        # the random-init baseline of the checkpoint's architecture is named after it
        for feature in ("pixels", f"random_init[{os.path.basename(mae_run)}]", os.path.basename(mae_run)):
            assert all((feature, s, protocol) in got for s in feature_scorers)
        assert (os.path.basename(mae_run), "mae_recon", protocol) in got
        assert ("pixels", "mae_recon", protocol) not in got
    meta = data["meta"]
    assert meta["checkpoints"][0]["step"] == 10 and meta["seed"] == 0 and meta["version"]
    assert meta["config"]["checkpoint"] == mae_run
    plots = set(os.listdir(out / "plots"))
    assert {"auroc_leave_one_class_out.png", "auroc_one_class.png", "tsne_pixels.png", "elbow_pixels.png"} <= plots
    assert any(p.startswith("recon_") for p in plots) and any(p.startswith("roc_") for p in plots)
    assert "| pixels |" in (out / "report.md").read_text()
    csv_header = (out / "results.csv").read_text().splitlines()[0]
    assert "mean_auroc" in csv_header and "auroc_0" in csv_header

    # A second run reuses the cached features instead of recomputing them.
    features = sorted(os.listdir(out / "features"))
    mtimes = {f: os.path.getmtime(out / "features" / f) for f in features}
    again = tiny_eval_config(data_dir, mae_run)
    again.scorers, again.tsne_points = "knn", 0
    run_evaluation(again, str(out))
    assert {f: os.path.getmtime(out / "features" / f) for f in features} == mtimes


def test_missing_checkpoint_is_a_clear_error(tmp_path, data_dir):
    with pytest.raises(UserInputError, match="no checkpoint"):
        run_evaluation(tiny_eval_config(data_dir, str(tmp_path / "nothing")), str(tmp_path / "out"))


def test_evaluate_cli_exits_nonzero_with_one_message(tmp_path, data_dir):
    proc = subprocess.run(
        [sys.executable, "evaluate.py", "--config=configs/eval_mnist5k.py",
         f"--config.checkpoint={tmp_path / 'missing'}", f"--outdir={tmp_path / 'out'}",
         f"--config.data.data_dir={data_dir}"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 2
    assert "error: no checkpoint in" in proc.stderr and "Traceback" not in proc.stderr


def test_one_random_init_baseline_per_architecture():
    """DINO's patch-7 and MAE's patch-4 demo models each get their own 'before SSL' row, built as the
    method builds them; two checkpoints of one architecture share one."""
    class Loaded:  # the part of LoadedCheckpoint the baselines read
        def __init__(self, name, config):
            self.name, self.config = name, config

        def encoder(self):
            return vit_from_config(self.config.model, method=self.config.method, drop_path_rate=0.0)

    mae, dino = mae_mnist5k.get_config(), dino_mnist5k.get_config()
    for c in (mae, dino):
        validate_train_config(c)
    found = random_init_baselines([Loaded("mae", mae), Loaded("dino", dino), Loaded("mae2", mae)], None)
    assert [b.name for b in found] == ["random_init[mae+mae2]", "random_init[dino]"]
    assert (found[0].model.patch_size, found[1].model.patch_size) == (4, 7)
    assert found[1].model.init_style == "dino" and found[0].model.init_style == "mae"
    plain = ml_collections.ConfigDict({"model": mae.model, "data": mae.data})
    (alone,) = random_init_baselines([], plain)
    assert alone.name == "random_init" and alone.model.patch_size == 4
