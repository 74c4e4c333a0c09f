"""Training as several processes: ``train.py`` started twice on localhost, joined by ``jax.distributed``
(``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, CPU collectives over gloo,
one CPU device per process), against the same config trained in this process on one device.

What is checked, for a tiny MAE (SIGTERM to process 1 mid-run, then the same 2-process command
resumes it) and a tiny DINO with the AD monitor on (one uninterrupted run):

* the final parameters equal the 1-process run at the same global batch to ``ATOL`` + ``RTOL`` x |x|
  (the gradient mean is summed in another order across 2 devices, so they are not bit-identical;
  the attention key biases, whose exact gradient is 0, only to ``KEY_BIAS_ATOL``: see there);
* a SIGTERM to one process stops both after the same step, with one checkpoint of that step, exit 0;
  the resumed pair sets a torn step folder aside once and resumes from that step;
* metrics.jsonl has each step once (and the same losses and monitor AUROCs as the 1-process run);
* process 1 writes no file of the workdir outside checkpoints/ (a Python audit hook, installed with a
  ``sitecustomize`` module on PYTHONPATH, records every file each process opens for writing or
  renames into the workdir); process 0 writes config.json, config_history.jsonl, metrics.jsonl,
  summary.json and, for MAE, reconstructions.png.
"""

import json
import os
import signal
import socket
import subprocess
import time

import jax
import numpy as np
import pytest

from ssl_ad import sharding
from ssl_ad.checkpointing import Checkpointer
from ssl_ad.errors import UserInputError
from ssl_ad.evaluation.runner import run_evaluation
from ssl_ad.train.loop import train_and_evaluate
from ssl_ad.train.metrics_log import read_metrics
from tests.conftest import REPO, logged_steps, tiny_config, tiny_train_argv
from tests.hooks import STEP_DELAY_ENV

# 2 processes x 1 CPU device vs 1 process x 1 device, float32: the gradient mean is summed in another
# order, so parameters differ by float rounding. Measured after MAE_STEPS / DINO_STEPS Adam updates:
# at most 3e-8 (MAE) and 1.5e-8 (DINO), except the attention *key* biases: their exact gradient is 0
# (softmax ignores a constant added to all of a query's logits), so each run's Adam turns its own
# rounding noise (~1e-10) into lr-sized steps; they drift apart by up to 7e-6 (MAE), 1.2e-6 (DINO),
# and stay as small in both runs (|key bias| <= 1e-5).
ATOL, RTOL = 1e-6, 1e-5
KEY_BIAS_ATOL = 1e-4
MAE_STEPS, DINO_STEPS = 24, 8
# The schedules of these runs, on top of conftest's TINY_SIZES.
TINY = {
    "mae": {"total_steps": MAE_STEPS, "log_every": 1, "checkpoint_every": 1000, "optim.warmup_steps": 5},
    "dino": {
        "total_steps": DINO_STEPS, "log_every": 2, "checkpoint_every": 4,
        "optim.warmup_steps": 2, "optim.freeze_steps": 2, "dino.warmup_teacher_temp_steps": 4,
        "monitor.every_steps": DINO_STEPS, "monitor.max_bank": 200,
    },
}
PROCESSES = 2
# Variables of a real cluster that would make JAX auto-detect it instead of the localhost one.
_CLUSTER_PREFIXES = ("SLURM_", "OMPI_", "PMI_", "TPU_", "JAX_COORDINATOR", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID")

AUDIT_OUT_ENV = "SSL_AD_TEST_AUDIT_OUT"
AUDIT_ROOT_ENV = "SSL_AD_TEST_AUDIT_ROOT"
# Imported by every Python process started with its folder on PYTHONPATH: records each file under
# $SSL_AD_TEST_AUDIT_ROOT that the process opens for writing or renames onto, as JSON at exit.
_SITECUSTOMIZE = '''
import atexit, json, os, sys

_root = os.path.abspath(os.environ["SSL_AD_TEST_AUDIT_ROOT"])
_out = os.environ["SSL_AD_TEST_AUDIT_OUT"]
_written = set()
_WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


def _note(path):
    if isinstance(path, (str, bytes, os.PathLike)):
        path = os.path.abspath(os.fsdecode(path))
        if path.startswith(_root + os.sep):
            _written.add(os.path.relpath(path, _root))


def _hook(event, args):
    if event == "open" and args[2] is not None and args[2] & _WRITE:
        _note(args[0])
    elif event == "os.rename":
        _note(args[1])


def _dump():
    found = sorted(_written)
    with open(_out, "w") as f:
        json.dump(found, f)


sys.addaudithook(_hook)
atexit.register(_dump)
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def train_argv(method, data_dir, workdir, script="train.py"):
    return tiny_train_argv(method, data_dir, workdir, TINY[method], script)


def base_env(audit_dir):
    env = {k: v for k, v in os.environ.items() if not k.startswith(_CLUSTER_PREFIXES) and k != "XLA_FLAGS"}
    env.update(JAX_DISABLE_MOST_OPTIMIZATIONS="1", JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONPATH=os.pathsep.join([str(audit_dir), REPO]))
    return env


class Cluster:
    """PROCESSES copies of one train.py command on localhost; logs and write audits in ``folder``."""

    def __init__(self, name, argv, folder, audit_dir, extra_env=None):
        self.name, self.folder = name, folder
        port = free_port()
        self.procs, self.logs = [], []
        for i in range(PROCESSES):
            env = base_env(audit_dir)
            env.update(extra_env or {})
            env.update({
                "JAX_COORDINATOR_ADDRESS": f"localhost:{port}", "JAX_NUM_PROCESSES": str(PROCESSES),
                "JAX_PROCESS_ID": str(i), AUDIT_ROOT_ENV: str(folder), AUDIT_OUT_ENV: self.audit_path(i),
            })
            log_path = os.path.join(folder, f"{name}.p{i}.log")
            with open(log_path, "w") as out:
                self.procs.append(subprocess.Popen(argv, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT))
            self.logs.append(log_path)

    def audit_path(self, i):
        return os.path.join(self.folder, f"{self.name}.p{i}.writes.json")

    def log_text(self, i):
        with open(self.logs[i]) as f:
            return f.read()

    def failure(self, what):
        return f"{self.name}: {what}\n" + "\n".join(f"--- process {i}:\n{self.log_text(i)[-3000:]}" for i in range(PROCESSES))

    def wait(self, timeout=300):
        """Every process's exit code; kills all of them after ``timeout`` s."""
        deadline = time.time() + timeout
        for p in self.procs:
            try:
                p.wait(timeout=max(deadline - time.time(), 1))
            except subprocess.TimeoutExpired:
                self.kill()
                pytest.fail(self.failure(f"timed out after {timeout} s"))
        return [p.returncode for p in self.procs]

    def kill(self):
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait()

    def writes(self, i):
        """The workdir files process ``i`` wrote outside checkpoints/ (paths relative to ``folder``)."""
        with open(self.audit_path(i)) as f:
            return [p for p in json.load(f) if os.sep + "checkpoints" + os.sep not in os.sep + p]


def committed_steps(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit() and os.path.exists(os.path.join(d, n, "commit_success.txt")))


def final_state(workdir):
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), read_only=True)
    step = ckpt.latest_step()
    state = ckpt.restore_as_saved(step)
    ckpt.close()
    return step, state


def _is_qkv_bias(path) -> bool:
    return jax.tree_util.keystr(path).endswith("['attn']['qkv']['bias']")


def param_gaps(a, b):
    """(largest |a - b| over every parameter but the attention key biases, largest over those);
    asserts the trees match and the gaps are within ATOL + RTOL |b| and KEY_BIAS_ATOL."""
    la, ta = jax.tree_util.tree_flatten_with_path(a)
    lb, tb = jax.tree_util.tree_flatten_with_path(b)
    assert ta == tb and len(la) > 10
    gap, key_gap = 0.0, 0.0
    for (path, x), (_, y) in zip(la, lb):
        x, y, name = np.asarray(x), np.asarray(y), jax.tree_util.keystr(path)
        if _is_qkv_bias(path):  # (3 x width,): query, key, value biases
            xk, yk = x.reshape(3, -1)[1], y.reshape(3, -1)[1]
            np.testing.assert_allclose(xk, yk, atol=KEY_BIAS_ATOL, rtol=0, err_msg=name + " (key part)")
            key_gap = max(key_gap, float(np.max(np.abs(xk - yk))))
            x, y = np.delete(x.reshape(3, -1), 1, axis=0), np.delete(y.reshape(3, -1), 1, axis=0)
        np.testing.assert_allclose(x, y, atol=ATOL, rtol=RTOL, err_msg=name)
        gap = max(gap, float(np.max(np.abs(x - y), initial=0.0)))
    return gap, key_gap


def reference_run(method, data_dir, workdir):
    """The same config trained in this process (1 process, 1 device); returns ``workdir``."""
    train_and_evaluate(tiny_config(method, data_dir, **TINY[method]), workdir)
    return workdir


def wait_for(cluster, cond, what, timeout=240):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return
        if any(p.poll() is not None for p in cluster.procs):
            cluster.kill()
            pytest.fail(cluster.failure(f"a process exited before {what}"))
        time.sleep(0.02)
    cluster.kill()
    pytest.fail(cluster.failure(f"timed out waiting for {what}"))


def assert_only_process_0_wrote(cluster, workdir, *names):
    """Process 1 wrote nothing outside checkpoints/; process 0 wrote config.json, metrics.jsonl,
    summary.json and ``names`` (config_history.jsonl is appended at the first start only, when
    nothing changed on resume)."""
    assert cluster.writes(1) == [], cluster.writes(1)
    rel = os.path.relpath(workdir, cluster.folder)
    expected = {os.path.join(rel, n) for n in ("config.json", "metrics.jsonl", "summary.json", *names)}
    written = cluster.writes(0)
    assert expected <= set(written), written


def assert_same_metrics(workdir, ref, keys):
    rows, ref_rows = read_metrics(os.path.join(workdir, "metrics.jsonl")), read_metrics(os.path.join(ref, "metrics.jsonl"))
    assert [r["step"] for r in rows] == [r["step"] for r in ref_rows]
    for key in keys:
        ours, theirs = [r.get(key) for r in rows], [r.get(key) for r in ref_rows]
        assert [v is None for v in ours] == [v is None for v in theirs] and any(v is not None for v in ours), key
        np.testing.assert_allclose([v for v in ours if v is not None], [v for v in theirs if v is not None],
                                   rtol=1e-4, atol=1e-5, err_msg=key)


def check_stopped(first, mae):
    """Both processes of the preempted MAE run stopped after the same step, saved it, exited 0;
    returns that step."""
    assert first.wait() == [0, 0], first.failure("exit codes")
    stopped = committed_steps(mae)
    assert len(stopped) == 1 and 2 <= stopped[0] < MAE_STEPS, first.failure(f"checkpoints {stopped}")
    for i in range(PROCESSES):
        assert f"saved a checkpoint at step {stopped[0]} and stopping (all 2 processes)" in first.log_text(i)
    assert logged_steps(mae) == list(range(1, stopped[0] + 1))
    with open(os.path.join(mae, "summary.json")) as f:
        assert json.load(f)["status"] == "stopped"
    assert_only_process_0_wrote(first, mae, "config_history.jsonl")
    return stopped[0]


def check_dino(cluster, dino, ref):
    """The DINO run (AD monitor at its last step) against the 1-process one; returns the parameter gap."""
    assert cluster.wait() == [0, 0], cluster.failure("exit codes")
    assert logged_steps(dino) == list(range(2, DINO_STEPS + 1, 2))
    assert_only_process_0_wrote(cluster, dino, "config_history.jsonl")
    assert_same_metrics(dino, ref, ["loss", "val_auroc/one_class"])
    return param_gaps(final_state(dino)[1]["params"], final_state(ref)[1]["params"])


def check_resumed(resumed, mae, stopped, ref):
    """The MAE run resumed by 2 processes against the uninterrupted 1-process one; returns the gap."""
    assert resumed.wait() == [0, 0], resumed.failure("exit codes")
    for i in range(PROCESSES):
        assert f"Resumed from step {stopped} " in resumed.log_text(i)
    assert committed_steps(mae) == [stopped, MAE_STEPS]
    # the torn step was set aside once (by process 0), before either process listed the steps
    assert sorted(os.listdir(os.path.join(mae, "checkpoints"))) == sorted(
        [str(stopped), str(MAE_STEPS), f"{MAE_STEPS - 1}.incomplete"])
    assert logged_steps(mae) == list(range(1, MAE_STEPS + 1))
    assert_only_process_0_wrote(resumed, mae, "reconstructions.png")
    assert_same_metrics(mae, ref, ["loss"])
    step, state = final_state(mae)
    assert step == MAE_STEPS
    return param_gaps(state["params"], final_state(ref)[1]["params"])


def test_two_processes_train_mae_and_dino_like_one_and_resume_after_sigterm(tmp_path, data_dir):
    t0 = time.perf_counter()
    audit_dir = tmp_path / "audit"
    audit_dir.mkdir()
    (audit_dir / "sitecustomize.py").write_text(_SITECUSTOMIZE)
    folder, mae, dino = str(tmp_path), str(tmp_path / "mae"), str(tmp_path / "dino")
    hooked = train_argv("mae", data_dir, mae, script="tests/train_with_hooks.py")
    # MAE with a pause after each step, so that the SIGTERM lands mid-run; DINO at full speed alongside.
    clusters = [Cluster("mae_first", hooked, folder, audit_dir, {STEP_DELAY_ENV: "0.2"})]
    try:
        first = clusters[0]
        clusters.append(Cluster("dino", train_argv("dino", data_dir, dino), folder, audit_dir))
        wait_for(first, lambda: len(logged_steps(mae)) >= 2, "two logged MAE steps")
        first.procs[1].send_signal(signal.SIGTERM)  # preempt one host only
        stopped = check_stopped(first, mae)
        torn = os.path.join(mae, "checkpoints", str(MAE_STEPS - 1))  # a step folder without orbax's commit marker
        os.makedirs(os.path.join(torn, "state"))
        clusters.append(Cluster("mae_resumed", train_argv("mae", data_dir, mae), folder, audit_dir))
        refs = {m: reference_run(m, data_dir, str(tmp_path / f"ref_{m}")) for m in ("mae", "dino")}
        dino_gap = check_dino(clusters[1], dino, refs["dino"])
        mae_gap = check_resumed(clusters[2], mae, stopped, refs["mae"])
    finally:
        for c in clusters:
            c.kill()
    print(f"\nmax |param difference| 2 vs 1 process (attention key biases apart): MAE {mae_gap[0]:.3g} "
          f"({mae_gap[1]:.3g}; resumed after SIGTERM at step {stopped}), DINO {dino_gap[0]:.3g} ({dino_gap[1]:.3g}); "
          f"wall {time.perf_counter() - t0:.1f} s")


def _clear_cluster_env(monkeypatch):
    for key in list(os.environ):
        if key.startswith(_CLUSTER_PREFIXES):
            monkeypatch.delenv(key)


SLURM_STEP = {"SLURM_JOB_ID": "77", "SLURM_STEP_NODELIST": "node[01-02]", "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}


@pytest.mark.parametrize("env, count, initialises", [
    ({}, None, False),
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}, 2, True),
    ({"JAX_COORDINATOR_ADDRESS": "h:1"}, None, True),  # JAX finds the rest (or says what is missing)
    ({"JAX_COORDINATOR_ADDRESS": "h:1", "JAX_NUM_PROCESSES": "1"}, 1, False),
    ({**SLURM_STEP, "SLURM_NTASKS": "16", "SLURM_STEP_NUM_TASKS": "16"}, 16, True),
    ({**SLURM_STEP, "SLURM_NTASKS": "1"}, 1, False),  # a single-task job keeps every local GPU
    ({"SLURM_JOB_ID": "77", "SLURM_NTASKS": "8"}, None, False),  # a batch script, not an srun step
    ({"OMPI_COMM_WORLD_SIZE": "4"}, 4, True),
])
def test_which_environments_start_jax_distributed(monkeypatch, env, count, initialises):
    _clear_cluster_env(monkeypatch)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert sharding.launched_process_count() == count
    sharding.maybe_initialize_distributed()
    assert calls == ([{k: int(env[v]) for k, v in (("num_processes", "JAX_NUM_PROCESSES"),
                                                   ("process_id", "JAX_PROCESS_ID")) if v in env}]
                     if initialises else [])


def test_a_non_integer_process_count_is_one_message(monkeypatch):
    _clear_cluster_env(monkeypatch)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "two")
    with pytest.raises(UserInputError, match=r"^environment variable JAX_NUM_PROCESSES='two' is not an integer$"):
        sharding.maybe_initialize_distributed()


def test_evaluation_refuses_to_run_as_one_of_several_processes(tmp_path, monkeypatch):
    _clear_cluster_env(monkeypatch)
    monkeypatch.setenv("JAX_NUM_PROCESSES", "2")
    with pytest.raises(UserInputError, match=r"evaluate.py runs on one host, but this is one of 2 processes"):
        run_evaluation(None, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
