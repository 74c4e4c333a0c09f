"""Numbers a researcher can trust: a resume with a changed config is refused (or recorded), DINO
collapse is flagged, and every message counts steps as metrics.jsonl and checkpoints do."""

import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys

import pytest

from ssl_ad.errors import DivergenceError, UserInputError
from ssl_ad.train import config_history
from tests import hooks
from ssl_ad.train.collapse import ONE_DIM_FRACTION, PATIENCE, UNIFORM_FRACTION, CollapseMonitor
from ssl_ad.train.loop import SUMMARY_FILE, train_and_evaluate
from ssl_ad.train.metrics_log import read_metrics
from ssl_ad.train.optim import make_optimizer
from tests.conftest import REPO, tiny_mae_config

ENV = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")
TINY_MAE_FLAGS = ["--config.batch_size=16", "--config.log_every=5", "--config.checkpoint_every=10",
                  "--config.model.variant=", "--config.model.width=32", "--config.model.depth=2", "--config.model.num_heads=2",
                  "--config.mae.decoder_width=32", "--config.mae.decoder_heads=2", "--config.optim.warmup_steps=5"]


def snapshot(workdir):
    out = {}
    for root, _, files in os.walk(workdir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
    return out


def history(workdir):
    with open(os.path.join(workdir, config_history.HISTORY_FILE)) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def finished_mae(tmp_path_factory, data_dir):
    """A finished 10-step tiny MAE workdir (copied by each test that changes it)."""
    workdir = str(tmp_path_factory.mktemp("finished") / "run")
    train_and_evaluate(tiny_mae_config(data_dir, total_steps=10), workdir)
    return workdir


@pytest.fixture
def workdir(tmp_path, finished_mae):
    path = str(tmp_path / "run")
    shutil.copytree(finished_mae, path)
    return path


def train_cli(data_dir, workdir, *flags):
    return subprocess.run(
        [sys.executable, "train.py", "--config=configs/mae_mnist5k.py", f"--workdir={workdir}",
         f"--config.data.data_dir={data_dir}", *TINY_MAE_FLAGS, *flags],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=300, check=False,
    )


# ---------------------------------------------------------------------------------------------
# Case 6: resume with a changed config.


def test_resume_with_a_changed_lr_is_refused_and_nothing_is_written(data_dir, workdir):
    base_lr = tiny_mae_config(data_dir).optim.base_lr
    before = snapshot(workdir)
    proc = train_cli(data_dir, workdir, "--config.total_steps=20", "--config.optim.base_lr=0.003")
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"was trained to step 10 with a different config: optim.base_lr: {base_lr} -> 0.003." in errors[0]
    assert "total_steps" not in errors[0].split("--allow_config_change")[0]  # a longer run is bookkeeping
    assert "--allow_config_change=optim.base_lr (or =all)" in errors[0]
    assert snapshot(workdir) == before  # config.json, checkpoints, metrics, history: untouched


def test_override_resumes_and_is_recorded(data_dir, workdir, caplog):
    c = tiny_mae_config(data_dir, **{"total_steps": 20, "optim.base_lr": 0.003})
    with caplog.at_level(logging.INFO):  # train.py --allow_config_change=optim.base_lr passes this list
        train_and_evaluate(c, workdir, allow_config_change=["optim.base_lr"])
    assert "Resuming with optim.base_lr changed: 0.0015 -> 0.003 (allowed by --allow_config_change" in caplog.text
    rows = history(workdir)
    assert [r["event"] for r in rows] == ["start", "resume"]
    assert rows[1]["step"] == 10 and rows[1]["allow_config_change"] == "optim.base_lr"
    assert rows[1]["changes"] == {"optim.base_lr": {"old": 0.0015, "new": 0.003}, "total_steps": {"old": 10, "new": 20}}
    assert rows[1]["allowed_by_flag"] == ["optim.base_lr"] and rows[1]["bookkeeping"] == ["total_steps"]
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["optim"]["base_lr"] == 0.003
    assert [r["step"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))] == [5, 10, 15, 20]


def test_a_longer_run_and_bookkeeping_changes_resume_with_a_log(data_dir, workdir, caplog):
    with caplog.at_level(logging.INFO):
        train_and_evaluate(tiny_mae_config(data_dir, total_steps=20, log_every=2, keep_checkpoints=1), workdir)
    assert "Resumed from step 10 " in caplog.text
    assert "total_steps grew from 10 to 20: the cosine schedules" in caplog.text
    assert "Resuming with log_every changed: 5 -> 2 (bookkeeping)" in caplog.text
    steps = [r["step"] for r in read_metrics(os.path.join(workdir, "metrics.jsonl"))]
    assert steps == [5, 10, 12, 14, 16, 18, 20]
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["20"]
    last = history(workdir)[-1]
    assert last["changes"]["total_steps"] == {"old": 10, "new": 20}
    assert last["bookkeeping"] == ["keep_checkpoints", "log_every", "total_steps"] and last["allowed_by_flag"] == []
    with open(os.path.join(workdir, SUMMARY_FILE)) as f:
        summary = json.load(f)
    assert summary["status"] == "complete" and summary["step"] == 20 and summary["final_metrics"]["step"] == 20
    assert "collapse" not in summary  # MAE logs no teacher statistics


def test_shorter_run_or_other_change_on_a_finished_workdir_is_refused(data_dir, workdir):
    before = snapshot(workdir)
    for overrides, text in [({"total_steps": 8}, "total_steps: 10 -> 8"),
                            ({"seed": 1, "mae.mask_ratio": 0.5}, "mae.mask_ratio: 0.75 -> 0.5; seed: 0 -> 1")]:
        with pytest.raises(UserInputError, match="with a different config: " + text.replace(".", r"\.")):
            train_and_evaluate(tiny_mae_config(data_dir, **{"total_steps": 10, **overrides}), workdir)
    assert snapshot(workdir) == before
    train_and_evaluate(tiny_mae_config(data_dir, total_steps=10, seed=1), workdir, allow_config_change="all")
    assert snapshot(workdir) == before  # allowed, but complete: nothing to do, nothing written


def test_keys_an_old_run_lacks():
    new = {"total_steps": 10, "data": {"crop_sampler": "tf_bounding_box", "hflip": True}, "model": {"remat": True}}
    old = {"total_steps": 10, "data": {"hflip": True}, "model": {"remat": False}}
    check = config_history.ResumeCheck(config_history.flat_config(old), config_history.flat_config(new), 10, set())
    assert check.new_keys == {"data.crop_sampler": "tf_bounding_box"}  # what the run did before the key existed
    assert check.refused == [] and check.bookkeeping == ["model.remat"]
    new["data"]["crop_sampler"] = "torchvision"
    check = config_history.ResumeCheck(config_history.flat_config(old), config_history.flat_config(new), 10, set())
    assert check.refused == ["data.crop_sampler"]
    with pytest.raises(UserInputError, match=r'data.crop_sampler: \(absent\) -> "torchvision"'):
        check.raise_if_refused("w")


def test_logged_schedules_are_those_the_step_used(data_dir, finished_mae):
    c = tiny_mae_config(data_dir, total_steps=10)
    _, schedules = make_optimizer(c.optim, c.total_steps, c.batch_size, method=c.method)
    for row in read_metrics(os.path.join(finished_mae, "metrics.jsonl")):
        # row N = the update from step N-1 to N: the learning rate of optimiser count N-1
        assert row["lr"] == pytest.approx(float(schedules["lr"](row["step"] - 1)), rel=1e-6)
    assert row["step"] == 10 and row["lr"] > 0


# ---------------------------------------------------------------------------------------------
# Case 9: one step convention (completed optimiser updates) everywhere.


def test_divergence_names_the_step_metrics_would_log(tmp_path, data_dir, monkeypatch):
    workdir = str(tmp_path / "nan")
    hooks.install(monkeypatch.setattr, nan_from_step=4)
    c = tiny_mae_config(data_dir, total_steps=10, log_every=1, checkpoint_every=2)
    with pytest.raises(DivergenceError) as e:
        train_and_evaluate(c, workdir)
    assert str(e.value).startswith(
        "training diverged: non-finite loss in step 4 (the update from step 3 to 4; loss=nan")
    assert str(e.value).endswith("the last good one (step 2) is kept")
    rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3] and all(math.isfinite(r["loss"]) for r in rows)
    with open(os.path.join(workdir, SUMMARY_FILE)) as f:
        summary = json.load(f)
    assert summary["status"] == "diverged" and summary["error"] == str(e.value)
    assert summary["final_metrics"]["step"] == 3


# ---------------------------------------------------------------------------------------------
# Case 8: DINO collapse is flagged.


def tiny_dino(data_dir, **overrides):
    from tests.test_dino import tiny_dino_config

    return tiny_dino_config(data_dir, total_steps=20, log_every=2, checkpoint_every=20, **overrides)


def test_collapse_monitor_rules():
    log_k = math.log(256)

    def row(per_sample, mean):
        return {"teacher_entropy": per_sample * log_k, "teacher_mean_entropy": mean * log_k,
                "kl_mean_teacher": log_k - mean * log_k}

    m = CollapseMonitor()
    healthy = [m.update(s, row(0.4, 0.7)) for s in range(1, 6)]
    assert healthy == [{"collapse": 0}] * 5
    near = [m.update(s, row(UNIFORM_FRACTION + 0.01, 1.0)) for s in range(6, 6 + PATIENCE)]
    assert [r["collapse"] for r in near] == [0] * (PATIENCE - 1) + [1] and near[-1]["collapse_kind"] == "uniform"
    assert m.update(20, row(0.4, 0.7)) == {"collapse": 0}
    assert m.summary()["collapse"] == 1 and m.summary()["collapse_first_step"] == 5 + PATIENCE
    assert m.summary()["collapse_at_end"] == 0
    m = CollapseMonitor()
    flags = [m.update(s, row(0.01, ONE_DIM_FRACTION / 2)) for s in range(1, 4)]
    assert flags[-1] == {"collapse": 1, "collapse_kind": "one_dimension"}
    assert CollapseMonitor().update(1, {"loss": 1.0}) == {} and CollapseMonitor().summary() == {}


def test_dino_at_temperature_1_is_flagged(tmp_path, data_dir, caplog):
    workdir = str(tmp_path / "hot")
    c = tiny_dino(data_dir, **{"dino.teacher_temp": 1.0, "dino.warmup_teacher_temp": 1.0, "dino.student_temp": 1.0})
    with caplog.at_level(logging.WARNING, logger="ssl_ad.train.collapse"):
        train_and_evaluate(c, workdir)
    rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    log_k = math.log(c.dino.out_dim)
    assert all(r["teacher_entropy"] > 0.99 * log_k for r in rows)  # it sits at log K
    assert [r["collapse"] for r in rows[:PATIENCE]] == [0] * (PATIENCE - 1) + [1]
    assert all(r["collapse"] == 1 and r["collapse_kind"] == "uniform" for r in rows[PATIENCE - 1:])
    assert caplog.text.count("Collapse (uniform) at step 6") == 1
    with open(os.path.join(workdir, SUMMARY_FILE)) as f:
        summary = json.load(f)
    assert summary["collapse"] == 1 and summary["collapse_kind"] == "uniform" and summary["collapse_first_step"] == 6


def test_healthy_dino_is_not_flagged(tmp_path, data_dir):
    workdir = str(tmp_path / "ok")
    # measured: per-sample teacher entropy 0.32-0.39 log K, mean-distribution entropy 0.67-0.74 log K
    train_and_evaluate(tiny_dino(data_dir), workdir)
    rows = read_metrics(os.path.join(workdir, "metrics.jsonl"))
    summary = [(r["step"], round(r["teacher_entropy"], 3), round(r["teacher_mean_entropy"], 3)) for r in rows]
    assert all(r["collapse"] == 0 for r in rows), summary
    with open(os.path.join(workdir, SUMMARY_FILE)) as f:
        assert json.load(f)["collapse"] == 0
