"""ssl_ad's training against the reference PyTorch code at the same shapes, measured in alternation.

  python benchmarks/paired_step.py --config=configs/mae_mnist5k.py [--reps=3 --warmup=20 --steps=150]
      [--workers=2 --threads=2 --omp_wait_policy=PASSIVE] [--e2e] [--out=paired.json] [--config.KEY=VALUE ...]

Two sides, run A B A B ... (``--reps`` each), each run ``--warmup`` untimed then ``--steps``
timed training steps on the real training images of the config (e.g. the embedded mnist5k
digits; no download), images/s = steps x batch / seconds:

* **ssl_ad**: the loop's jitted, buffer-donating step (``ssl_ad.train.step.jit_train_step``) fed by
  ssl_ad's tf.data pipeline (``ssl_ad.data.pipeline.train_batches``) through
  ``sharding.shard_batch`` and the loop's 2-batch device prefetch, in this process. With
  ``--e2e`` instead: ``train.py`` itself in a subprocess (fresh workdir, ``warmup + steps`` steps,
  the AD monitor off, ``checkpoint_every=--e2e_checkpoint_every``, ``log_every=--e2e_log_every``);
  the rate is read from its metrics.jsonl rows after step ``--warmup`` (wall time between logged
  steps: pipeline, step, logging, the metrics file and TensorBoard events, checkpoints), so
  start-up and compilation are not counted.
* **torch**: ``benchmarks/torch_reference.py`` in a worker process: the official MAE / DINO model
  and loss code rebuilt with timm's ``Block``/``PatchEmbed`` at the config's sizes, torch AdamW,
  the official torchvision transforms in a ``DataLoader`` with ``--workers`` processes,
  ``torch.set_num_threads(--threads)``.

Only one side runs at a time (the other waits, its loader's prefetch buffer full). Printed and
written to ``--out``: every run's rate, the medians, the ratio ssl_ad / torch of the medians,
1/5/15-minute load averages before and after each run, versions and the command.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bench_common import report_json  # noqa: E402
from ssl_ad import sharding  # noqa: E402
from ssl_ad.config_check import validate_train_config  # noqa: E402
from ssl_ad.data.pipeline import train_batches  # noqa: E402
from ssl_ad.data.sources import load_split  # noqa: E402
from ssl_ad.methods import build_method  # noqa: E402
from ssl_ad.models.variants import apply_variant  # noqa: E402
from ssl_ad.train.loop import _prefetch  # noqa: E402
from ssl_ad.train.optim import make_optimizer  # noqa: E402
from ssl_ad.train.state import create_train_state  # noqa: E402
from ssl_ad.train.step import jit_train_step  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file.")
_REPS = flags.DEFINE_integer("reps", 3, "Runs of each side, alternating (ssl_ad first).")
_WARMUP = flags.DEFINE_integer("warmup", 20, "Untimed steps at the start of every run.")
_STEPS = flags.DEFINE_integer("steps", 150, "Timed steps of every run.")
_WORKERS = flags.DEFINE_integer("workers", 2, "DataLoader worker processes of the torch side.")
_THREADS = flags.DEFINE_integer("threads", 2, "torch.set_num_threads of the torch side (the cores to share).")
_OMP_WAIT = flags.DEFINE_string(
    "omp_wait_policy", "", "OMP_WAIT_POLICY of the torch worker ('' = OpenMP's default, spinning). On a loaded "
    "machine PASSIVE is torch's best: spinning OpenMP threads there ran the MAE step 5-10x slower.")
_E2E = flags.DEFINE_bool("e2e", False, "Time ssl_ad through train.py (subprocess) instead of the in-process step.")
_E2E_LOG = flags.DEFINE_integer("e2e_log_every", 0, "log_every of the train.py runs (0 = the config's).")
_E2E_CKPT = flags.DEFINE_integer("e2e_checkpoint_every", 100, "checkpoint_every of the train.py runs.")
_OUT = flags.DEFINE_string("out", None, "Where the JSON results go (also printed).")
flags.mark_flag_as_required("config")


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class JaxSide:
    """ssl_ad's jitted step fed by its tf.data pipeline, as ``ssl_ad.train.loop`` runs them."""

    def __init__(self, config: Any, split):
        self.config = config
        self.mesh = sharding.data_mesh()
        method = build_method(config)
        tx, _ = make_optimizer(config.optim, config.total_steps, config.batch_size, method=config.method)
        stream = config.copy_and_resolve_references()
        stream.unlock()
        stream.total_steps = 10**7  # an endless stream; the schedules keep the config's length
        host = train_batches(stream, split, 0, process_index=jax.process_index(), process_count=jax.process_count())
        self.batches = _prefetch((sharding.shard_batch(b, self.mesh) for b in host), 2)
        first = next(self.batches)
        init = jax.jit(lambda key, b: create_train_state(method, tx, key, b),
                       out_shardings=sharding.replicated(self.mesh))
        self.state = init(jax.random.key(config.seed), first)
        self.step = jit_train_step(method, tx, config.seed)
        self.state, _ = self.step(self.state, first)  # compiles
        jax.block_until_ready(self.state)

    def run(self, warmup: int, steps: int) -> dict:
        for _ in range(warmup):
            self.state, metrics = self.step(self.state, next(self.batches))
        jax.block_until_ready(self.state)
        t0 = time.perf_counter()
        for _ in range(steps):
            self.state, metrics = self.step(self.state, next(self.batches))
        loss = float(jax.device_get(metrics["loss"]))
        seconds = time.perf_counter() - t0
        return {"images_per_s": steps * self.config.batch_size / seconds, "seconds": seconds, "loss": loss}


class TrainPySide:
    """``train.py`` end to end in a subprocess; the rate from its metrics.jsonl after the warm-up."""

    def __init__(self, config_path: str, overrides: list[str], log_every: int, checkpoint_every: int):
        self.config_path, self.overrides = config_path, overrides
        self.log_every, self.checkpoint_every = log_every, checkpoint_every

    def run(self, warmup: int, steps: int) -> dict:
        with tempfile.TemporaryDirectory(prefix="paired_e2e_") as workdir:
            cmd = [sys.executable, os.path.join(REPO, "train.py"), f"--config={self.config_path}",
                   f"--workdir={workdir}", *self.overrides, f"--config.total_steps={warmup + steps}",
                   "--config.monitor.every_steps=0", f"--config.checkpoint_every={self.checkpoint_every}"]
            if self.log_every:
                cmd.append(f"--config.log_every={self.log_every}")
            t0 = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
            wall = time.perf_counter() - t0
            if proc.returncode:
                raise RuntimeError(f"train.py failed ({proc.returncode}): {proc.stderr[-3000:]}")
            with open(os.path.join(workdir, "metrics.jsonl")) as f:
                rows = [json.loads(line) for line in f if line.strip()]
            with open(os.path.join(workdir, "config.json")) as f:
                batch = int(json.load(f)["batch_size"])
        images, seconds, prev, loss = 0, 0.0, None, None
        for row in rows:
            step = int(row["step"])
            if prev is not None and prev >= warmup:
                images += (step - prev) * batch
                seconds += row["seconds_per_step"] * (step - prev)
                loss = row["loss"]
            prev = step
        if not images:
            raise RuntimeError(f"no metrics rows after step {warmup}: set --e2e_log_every to divide {warmup}")
        return {"images_per_s": images / seconds, "seconds": seconds, "loss": loss, "process_wall_s": wall,
                "timed_steps": images // batch}


class TorchSide:
    """benchmarks/torch_reference.py in a worker process, driven over stdin/stdout."""

    def __init__(self, spec: dict, omp_wait_policy: str = ""):
        env = dict(os.environ)
        if omp_wait_policy:
            env["OMP_WAIT_POLICY"] = omp_wait_policy
        self.proc = subprocess.Popen([sys.executable, os.path.join(REPO, "benchmarks", "torch_reference.py")],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=REPO, env=env)
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()
        self.info = self._answer()

    def _answer(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the torch worker ended (exit code {self.proc.wait()})")
        return json.loads(line)

    def run(self, warmup: int, steps: int) -> dict:
        self.proc.stdin.write(f"run {warmup} {steps}\n")
        self.proc.stdin.flush()
        return self._answer()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def torch_spec(config: Any, images_path: str) -> dict:
    """What the torch worker needs: the config's sizes and recipe values as plain JSON."""
    model = apply_variant(dict(config.model))
    c = config.to_dict()
    return {
        "method": config.method, "batch_size": int(config.batch_size), "total_steps": int(config.total_steps),
        "model": {k: model[k] for k in ("image_size", "patch_size", "width", "depth", "num_heads", "mlp_ratio")},
        "data": c["data"], "optim": c["optim"], "mae": c.get("mae"), "dino": c.get("dino"),
        "images": images_path, "workers": _WORKERS.value, "threads": _THREADS.value,
    }


def main(argv):
    del argv
    config = _CONFIG.value
    validate_train_config(config)
    config_path = flags.FLAGS["config"].config_filename
    overrides = [a for a in sys.argv[1:] if a.startswith("--config.")]
    result: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(sys.argv), "host": platform.node(), "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__, "config": config_path, "method": config.method,
        "batch_size": int(config.batch_size), "warmup": _WARMUP.value, "steps": _STEPS.value,
        "ssl_ad_side": "train.py end to end" if _E2E.value else "jitted step + tf.data pipeline (in process)",
        "load_average_1_5_15_min_before": _load(),
    }
    split = load_split(config.data, config.data.train_split)
    with tempfile.TemporaryDirectory(prefix="paired_") as tmp:
        images_path = os.path.join(tmp, "images.npy")
        np.save(images_path, np.asarray(split.images))
        if _E2E.value:
            ours = TrainPySide(config_path, overrides, _E2E_LOG.value, _E2E_CKPT.value)
        else:
            ours = JaxSide(config, split)
        ref = TorchSide(torch_spec(config, images_path), _OMP_WAIT.value)
        result["torch_version"] = ref.info.get("torch")
        result["torch_threads"] = ref.info.get("threads")
        result["torch_omp_wait_policy"] = _OMP_WAIT.value or "default"
        result["torch_dataloader_workers"] = _WORKERS.value
        runs = {"ssl_ad": [], "torch": []}
        try:
            for rep in range(_REPS.value):
                for name, side in (("ssl_ad", ours), ("torch", ref)):
                    before = _load()
                    out = side.run(_WARMUP.value, _STEPS.value)
                    out.update(rep=rep, load_before=before, load_after=_load())
                    runs[name].append(out)
                    print(f"rep {rep} {name:6s} {out['images_per_s']:8.1f} img/s  loss {out['loss']:.4f}  "
                          f"load {before} -> {out['load_after']}", flush=True)
        finally:
            ref.close()
    med = {k: statistics.median(r["images_per_s"] for r in v) for k, v in runs.items()}
    result.update(
        runs=runs,
        median_images_per_s=med,
        range_images_per_s={k: [min(r["images_per_s"] for r in v), max(r["images_per_s"] for r in v)]
                            for k, v in runs.items()},
        ratio_ssl_ad_over_torch=med["ssl_ad"] / med["torch"],
        ratio_per_pair=[a["images_per_s"] / b["images_per_s"] for a, b in zip(runs["ssl_ad"], runs["torch"])],
        load_average_1_5_15_min_after=_load(),
    )
    print(f"{config.method}: ssl_ad {med['ssl_ad']:.1f} img/s, torch {med['torch']:.1f} img/s (medians of "
          f"{_REPS.value}), ratio {result['ratio_ssl_ad_over_torch']:.3f}")
    report_json(result, _OUT.value)


if __name__ == "__main__":
    app.run(main)
