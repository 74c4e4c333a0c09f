"""Faults a long run meets: SIGKILL and SIGTERM mid-run, half-written checkpoints, divergence,
bad input (one clear message, nothing overwritten), atomic reports, no unpickling of user files.

Real processes (``python train.py ...``) only where the fault needs one: kill -9, SIGTERM, the
exit code of a divergence, flag parsing. Everything else runs in this process.
"""

import hashlib
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from ssl_ad.cli import run_guarded
from ssl_ad.data.sources import ImageSplit
from ssl_ad.errors import UserInputError
from ssl_ad.evaluation import report
from ssl_ad.evaluation.embedding import load_checkpoint
from ssl_ad.evaluation.features import FeatureBuilder
from ssl_ad.evaluation.runner import run_evaluation
from ssl_ad.checkpointing import Checkpointer
from ssl_ad.train.loop import train_and_evaluate
from tests.hooks import NAN_FROM_STEP_ENV, STEP_DELAY_ENV
from ssl_ad.train.metrics_log import read_metrics
from tests.conftest import REPO, logged_steps, tiny_config, tiny_train_argv

TOTAL = 30
# The schedules of these tests, on top of conftest's TINY_SIZES.
TINY = {
    "mae": {"total_steps": TOTAL, "log_every": 5, "checkpoint_every": 10, "optim.warmup_steps": 5},
    "dino": {
        "total_steps": TOTAL, "log_every": 5, "checkpoint_every": 10,
        "optim.warmup_steps": 5, "optim.freeze_steps": 5, "dino.warmup_teacher_temp_steps": 10,
    },
}
METHODS = ["mae", "dino"]
# The same compiler settings as this process (conftest), so results are bit-comparable.
ENV = dict(os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="1", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2")


def make_config(method, data_dir, **extra):
    return tiny_config(method, data_dir, **{**TINY[method], **extra})


def train_cmd(method, data_dir, workdir, **extra):
    return tiny_train_argv(method, data_dir, workdir, {**TINY[method], **extra})


def with_hooks(cmd):
    """The same train.py command run through tests/train_with_hooks.py (fault injection from the env)."""
    return [cmd[0], "tests/train_with_hooks.py", *cmd[2:]] if cmd[1] == "train.py" else cmd


def start(cmd, log_path):
    """Starts a training process that sleeps 0.15 s after each step (tiny steps take milliseconds),
    so that the test can signal it at a step it has seen, with seconds to spare."""
    out = open(log_path, "w")
    env = dict(ENV, **{STEP_DELAY_ENV: "0.15"})
    proc = subprocess.Popen(with_hooks(cmd), cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    out.close()
    return proc


def run_cli(cmd, timeout=300):
    return subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=timeout)


def committed_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.exists(os.path.join(d, n, "commit_success.txt")))


def wait_until(proc, cond, log_path, what, timeout=240):
    t0 = time.time()
    while time.time() - t0 < timeout:
        if cond():
            return
        if proc.poll() is not None:
            pytest.fail(f"training exited ({proc.returncode}) before {what}:\n{open(log_path).read()[-3000:]}")
        time.sleep(0.02)
    proc.kill()
    pytest.fail(f"timed out waiting for {what}")


def final_state(workdir):
    """(step, state) of the latest checkpoint, restored with orbax (no template)."""
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    step = ckpt.latest_step()
    state = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    ckpt.close()
    return step, state


def assert_same_state(a, b):
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb
    assert len(la) > 10
    for (path, x), (_, y) in zip(la, lb):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=jax.tree_util.keystr(path))


def snapshot(workdir):
    """Every file under ``workdir`` with its hash: proves nothing was written over."""
    out = {}
    for root, dirs, files in os.walk(workdir):
        dirs.sort()
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, workdir)] = hashlib.sha256(f.read()).hexdigest()
    return out


_REFERENCES = {}


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
    """method -> workdir of an uninterrupted in-process run of TINY[method] (computed once)."""

    def get(method):
        if method not in _REFERENCES:
            workdir = str(tmp_path_factory.mktemp(f"ref_{method}"))
            train_and_evaluate(make_config(method, data_dir), workdir)
            _REFERENCES[method] = workdir
        return _REFERENCES[method]

    return get


# ---------------------------------------------------------------------------------------------
# Crash, preemption, half-written checkpoints.


@pytest.mark.parametrize("method", METHODS)
def test_sigkill_mid_run_then_same_command_resumes_bit_identically(tmp_path, data_dir, reference, method):
    workdir, log_path = str(tmp_path / "run"), str(tmp_path / "first.log")
    cmd = train_cmd(method, data_dir, workdir)
    proc = start(cmd, log_path)
    # Kill once a checkpoint is complete and a later step has been logged.
    wait_until(proc, lambda: committed_steps(workdir) and max(logged_steps(workdir) or [0]) > committed_steps(workdir)[-1],
               log_path, "a checkpoint and a later logged step")
    proc.send_signal(signal.SIGKILL)
    assert proc.wait(timeout=60) == -signal.SIGKILL
    killed_at = max(logged_steps(workdir))
    last_good = committed_steps(workdir)[-1]
    assert 0 < last_good <= killed_at < TOTAL  # (a save may have completed as the kill landed)

    again = run_cli(cmd)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"Resumed from step {last_good} " in again.stderr
    ref = reference(method)
    step, state = final_state(workdir)
    ref_step, ref_state = final_state(ref)
    assert step == ref_step == TOTAL
    assert_same_state(state, ref_state)
    rows, ref_rows = read_metrics(os.path.join(workdir, "metrics.jsonl")), read_metrics(os.path.join(ref, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows] == list(range(5, TOTAL + 1, 5))
    assert [r["loss"] for r in rows] == [r["loss"] for r in ref_rows]


def test_sigterm_saves_at_the_current_step_exits_0_and_resume_continues(tmp_path, data_dir, reference, caplog):
    # log every step and no periodic checkpoint before the end: the only early checkpoint is SIGTERM's.
    extra = {"log_every": 1, "checkpoint_every": 1000}
    workdir, log_path = str(tmp_path / "run"), str(tmp_path / "run.log")
    proc = start(train_cmd("mae", data_dir, workdir, **extra), log_path)
    wait_until(proc, lambda: len(logged_steps(workdir)) >= 2, log_path, "two logged steps")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0, open(log_path).read()[-3000:]
    assert "SIGTERM received: saved a checkpoint at step" in open(log_path).read()
    stopped_at = committed_steps(workdir)
    assert len(stopped_at) == 1, stopped_at
    stopped_at = stopped_at[0]
    assert logged_steps(workdir) == list(range(1, stopped_at + 1))  # saved at the step it was on
    assert 2 <= stopped_at < TOTAL
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == [str(stopped_at)]

    with caplog.at_level(logging.INFO, logger="ssl_ad.train.loop"):
        train_and_evaluate(make_config("mae", data_dir, **extra), workdir)
    assert f"Resumed from step {stopped_at} " in caplog.text
    assert committed_steps(workdir) == [stopped_at, TOTAL]
    assert logged_steps(workdir) == list(range(1, TOTAL + 1))
    assert_same_state(final_state(workdir)[1], final_state(reference("mae"))[1])


def test_half_written_checkpoints_are_never_taken_as_latest(tmp_path, data_dir, reference, caplog):
    ref = reference("mae")
    ck = tmp_path / "run" / "checkpoints"
    os.makedirs(ck)
    assert committed_steps(ref) == [10, 20, 30]
    shutil.copytree(os.path.join(ref, "checkpoints", "10"), ck / "10")
    # A step folder without orbax's commit marker (an interrupted copy): torn, not complete.
    shutil.copytree(os.path.join(ref, "checkpoints", "20"), ck / "20")
    os.remove(ck / "20" / "commit_success.txt")
    shutil.rmtree(ck / "20" / "state" / "d")
    # orbax's temporary folder of a save killed half-way.
    os.makedirs(ck / "30.orbax-checkpoint-tmp" / "state")
    (ck / "30.orbax-checkpoint-tmp" / "state" / "garbage").write_bytes(os.urandom(64))
    # metrics.jsonl past the good checkpoint, ending in a torn line.
    shutil.copy(os.path.join(ref, "metrics.jsonl"), tmp_path / "run" / "metrics.jsonl")
    with open(tmp_path / "run" / "metrics.jsonl", "a") as f:
        f.write('{"step": 35, "lo')

    reader = Checkpointer(str(ck), read_only=True)  # evaluation's view: ignores, moves nothing
    assert reader.latest_step() == 10
    reader.close()
    assert load_checkpoint(str(tmp_path / "run")).step == 10
    with caplog.at_level(logging.INFO, logger="ssl_ad.train.loop"):
        train_and_evaluate(make_config("mae", data_dir), str(tmp_path / "run"))
    assert "Resumed from step 10 " in caplog.text
    assert committed_steps(str(tmp_path / "run")) == [10, 20, 30]
    assert sorted(os.listdir(ck)) == ["10", "20", "20.incomplete", "30"]  # the torn one kept aside
    assert_same_state(final_state(str(tmp_path / "run"))[1], final_state(ref)[1])
    assert logged_steps(str(tmp_path / "run")) == list(range(5, TOTAL + 1, 5))


def test_divergence_stops_with_exit_3_and_keeps_the_last_good_checkpoint(tmp_path, data_dir):
    workdir = str(tmp_path / "nan")
    proc = subprocess.run(with_hooks(train_cmd("mae", data_dir, workdir, total_steps=20)), cwd=REPO,
                          env=dict(ENV, **{NAN_FROM_STEP_ENV: "12"}), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and re.fullmatch(
        r"error: training diverged: non-finite loss in step 12 \(the update from step 11 to 12; loss=nan, "
        r"grad_norm=\S+\); no checkpoint of the "
        r"diverged state was written, the last good one \(step 10\) is kept", errors[0]), errors
    assert "Traceback" not in proc.stderr
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["10"]  # complete, nothing at/after 12
    step, state = final_state(workdir)
    assert step == 10 and int(state["step"]) == 10 and int(state["bad_step"]) == -1
    assert all(np.all(np.isfinite(x)) for x in jax.tree_util.tree_leaves(state["params"]))
    assert logged_steps(workdir) == [5, 10]


# ---------------------------------------------------------------------------------------------
# Bad input: one 'error: ...' line, exit code 2, the existing workdir untouched.


def guarded_error(fn, capfd) -> str:
    capfd.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_guarded(fn)
    err = capfd.readouterr().err
    assert exit_info.value.code == 2
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.fixture
def trained_workdir(tmp_path, reference):
    workdir = str(tmp_path / "trained")
    shutil.copytree(reference("mae"), workdir)
    return workdir


@pytest.fixture
def image_folders(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for name in ("corrupt", "empty"):
        for cls in ("a", "b"):
            os.makedirs(tmp_path / name / cls)
            for i in range(3):
                Image.fromarray(rng.integers(0, 255, (28, 28, 3), dtype=np.uint8)).save(tmp_path / name / cls / f"{i}.png")
    bad = tmp_path / "corrupt" / "b" / "1.png"
    bad.write_bytes(bad.read_bytes()[:60])  # truncated
    for f in os.listdir(tmp_path / "empty" / "b"):
        os.remove(tmp_path / "empty" / "b" / f)
    return tmp_path, str(bad), str(tmp_path / "empty" / "b")


def test_bad_training_input_is_one_clear_message_and_writes_nothing(trained_workdir, data_dir, image_folders, capfd):
    root, bad_image, empty_class = image_folders
    before = snapshot(trained_workdir)
    assert "config.json" in before and any(k.startswith("checkpoints/") for k in before)
    cases = [
        ({"data.name": "image_folder", "data.data_dir": str(root / "missing")}, "image folder root", str(root / "missing")),
        ({"data.name": "cifar10", "data.data_dir": str(root / "no_tfds")}, "cifar10 is not prepared in", str(root / "no_tfds")),
        ({"data.name": "imagenet21k"}, "unknown data set 'imagenet21k'", "choose one of"),
        ({"data.name": "image_folder", "data.data_dir": str(root / "corrupt")}, "cannot decode image", bad_image),
        ({"data.name": "image_folder", "data.data_dir": str(root / "empty")}, "has no images", empty_class),
        ({"data.train_split": "validation"}, "has no split 'validation'", "'train'"),
        ({"model.width": 48, "total_steps": 60}, "with a different config: model.width: 32 -> 48.",
         "--allow_config_change=model.width"),
    ]
    for overrides, *expected in cases:
        message = guarded_error(lambda o=overrides: train_and_evaluate(make_config("mae", data_dir, **o), trained_workdir), capfd)
        for text in expected:
            assert text in message, (overrides, message)
        assert snapshot(trained_workdir) == before, overrides
    # allowed anyway, the shape mismatch names parameters: e.g. "encoder/.../kernel: config gives shape (..., 48),
    # checkpoint has (..., 32)"
    message = guarded_error(lambda: train_and_evaluate(make_config("mae", data_dir, **{"model.width": 48}),
                                                       trained_workdir, allow_config_change="all"), capfd)
    assert "does not match the config's model" in message
    assert snapshot(trained_workdir) == before
    assert "kernel: config gives shape" in message and "48" in message and "32" in message

    blocker = os.path.join(trained_workdir, "config.json")
    message = guarded_error(lambda: train_and_evaluate(make_config("mae", data_dir), os.path.join(blocker, "run")), capfd)
    assert message.startswith(f"error: cannot create workdir {blocker}/run")
    assert snapshot(trained_workdir) == before


def test_unknown_config_key_is_one_message_exit_2(trained_workdir, data_dir):
    before = snapshot(trained_workdir)
    proc = run_cli(train_cmd("mae", data_dir, trained_workdir) + ["--config.nope=1"], timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: --config.nope: unknown config key 'nope' (not in the config file; see its get_config() for the keys)"
    ]
    assert snapshot(trained_workdir) == before


def tiny_eval_config(data_dir, checkpoint=""):
    from configs import eval_mnist5k

    c = eval_mnist5k.get_config()
    c.data.data_dir = data_dir
    c.checkpoint = checkpoint
    c.sources = "pixels"
    c.scorers = "mahalanobis,kmeans"
    c.protocols = "one_class"
    c.max_train_per_round = 20
    c.tsne_points = 0
    c.scorer_args.kmeans.k_range = (1, 30)
    return c


def test_evaluate_without_a_complete_checkpoint_is_one_message(tmp_path, data_dir, capfd):
    out = str(tmp_path / "out")
    message = guarded_error(lambda: run_evaluation(tiny_eval_config(data_dir, str(tmp_path / "nothing")), out), capfd)
    assert message.startswith(f"error: no checkpoint in {tmp_path / 'nothing'}")
    half = tmp_path / "half" / "checkpoints"
    os.makedirs(half / "10.orbax-checkpoint-tmp")
    os.makedirs(half / "20" / "state")
    message = guarded_error(lambda: run_evaluation(tiny_eval_config(data_dir, str(tmp_path / "half")), out), capfd)
    assert message == f"error: no complete checkpoint in {half}"


def test_too_few_samples_for_pca_and_kmeans_are_clamped_with_warnings_in_results(tmp_path, data_dir):
    out = tmp_path / "out"
    run_evaluation(tiny_eval_config(data_dir), str(out))
    rows = json.loads((out / "results.json").read_text())["results"]
    assert {(r["feature"], r["scorer"]) for r in rows} == {("pixels", "mahalanobis"), ("pixels", "kmeans")}
    for row in rows:
        assert "pca_dims clamped from 100 to 19 (n_samples=20, n_features=784)." in row["warnings"], row
        assert 0.0 <= row["mean_auroc"] <= 1.0
    kmeans = next(r for r in rows if r["scorer"] == "kmeans")
    assert "k_range (1, 30) clamped to k <= n_samples=20." in kmeans["warnings"]


# ---------------------------------------------------------------------------------------------
# Reports are atomic; user files are never unpickled.


def _row(auroc):
    return {"feature": "pixels", "scorer": "knn", "protocol": "one_class", "mean_auroc": auroc, "std_auroc": 0.0,
            "mean_aupr": 0.5, "per_round": {"0": auroc}, "fit_seconds": 0.0, "score_seconds": 0.0, "warnings": []}


@pytest.mark.parametrize("failing", ["fsync", "replace"])
def test_a_failed_report_write_keeps_the_previous_file_and_no_temp_files(tmp_path, monkeypatch, failing):
    import ssl_ad.atomic

    path = tmp_path / "results.json"
    report.write_results_json(path, [_row(0.7)], {"seed": 0})
    before = path.read_bytes()

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(ssl_ad.atomic.os, failing, boom)
    with pytest.raises(OSError, match="No space left"):
        report.write_results_json(path, [_row(0.9)] * 50, {"seed": 1})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["results.json"]


class _Payload:
    """Unpickling this creates a file: proof that a pickle was (not) executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_feature_cache_with_an_object_array_is_refused_not_unpickled(tmp_path):
    from configs import eval_mnist5k

    images = np.zeros((4, 8, 8, 1), np.uint8)
    train = ImageSplit("toy", "train", images, np.zeros(4, np.int64), ["a"])
    test = ImageSplit("toy", "test", images, np.zeros(4, np.int64), ["a"])
    builder = FeatureBuilder(eval_mnist5k.get_config(), train, test, str(tmp_path / "features"))
    marker = str(tmp_path / "unpickled")
    evil = np.empty(4, dtype=object)
    evil[:] = [_Payload(marker)] * 4
    np.savez(builder.cache_path("pixels", 0, train, "raw"), features=evil)
    with pytest.raises(UserInputError, match="pickled Python objects, which are never loaded"):
        builder.pixels()
    assert not os.path.exists(marker)
