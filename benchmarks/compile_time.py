"""Compile time and step time of the train step with scanned vs unrolled ViT blocks (``model.scan_blocks``).

  python benchmarks/compile_time.py --configs=configs/mae_vitb16_224.py,configs/dino_vits16_224.py \
      --batch_size=2 --steps=2 --out=compile_time.json

For each config, the layouts of ``--layouts`` are measured in turn (unrolled, scanned, then again
with ``--repeats=2``, so that a change of machine load hits both), each in a fresh model, optimiser
and jit cache, on synthetic batches of the pipeline's shapes (``bench_common.batch_spec``; no data
set is loaded):

* ``init_compile_s``: ``lower`` + ``compile`` of the jitted train-state init (as ``ssl_ad.train.loop``
  builds the state);
* ``compile_s`` (wall) and ``compile_cpu_s`` (CPU seconds of this process, less sensitive to other
  jobs' load): ``lower`` + ``compile`` of the jitted, state-donating train step of
  ``ssl_ad.train.step.jit_train_step``, the loop's step; ``hlo_chars``: size of the lowered program;
* ``s_per_step``: mean wall seconds of ``--steps`` steps (each blocked on), after ``--warmup`` steps.

The date, the jax version and ``os.getloadavg()`` before and after each measurement are recorded.
"""

from __future__ import annotations

import ast
import datetime
import gc
import importlib.util
import os
import platform
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from bench_common import batch_spec, cpu_seconds, report_json  # noqa: E402
from ssl_ad.ablation.grid import apply_overrides  # noqa: E402
from ssl_ad import sharding  # noqa: E402
from ssl_ad.config_check import validate_train_config  # noqa: E402
from ssl_ad.methods import build_method  # noqa: E402
from ssl_ad.train.optim import make_optimizer  # noqa: E402
from ssl_ad.train.state import create_train_state  # noqa: E402
from ssl_ad.train.step import jit_train_step  # noqa: E402

_CONFIGS = flags.DEFINE_list("configs", ["configs/mae_vitb16_224.py", "configs/dino_vits16_224.py"],
                             "Training config files (each a get_config()).")
_LAYOUTS = flags.DEFINE_list("layouts", ["unrolled", "scanned"], "Layouts, measured in this order per repeat.")
_BATCH = flags.DEFINE_integer("batch_size", 2, "Global batch of the measured step (images).")
_STEPS = flags.DEFINE_integer("steps", 2, "Timed steps per measurement.")
_WARMUP = flags.DEFINE_integer("warmup", 1, "Untimed steps after compilation.")
_REPEATS = flags.DEFINE_integer("repeats", 1, "Rounds over --layouts per config.")
_DTYPE = flags.DEFINE_string("dtype", "", "Override model.dtype ('' = the config's).")
_SET = flags.DEFINE_multi_string("set", [], "Config overrides KEY=VALUE, e.g. model.depth=24 (VALUE a Python "
                                 "literal, else a string), applied to every config.")
_OUT = flags.DEFINE_string("out", "", "Where the JSON results go (also printed); '' = print only.")


def load_config(path: str, batch_size: int, dtype: str = "", overrides: tuple[str, ...] = ()) -> Any:
    """``get_config()`` of a config file, at ``batch_size`` (and ``dtype``, and ``KEY=VALUE`` ``overrides``),
    validated (variant resolved)."""
    spec = importlib.util.spec_from_file_location(os.path.splitext(os.path.basename(path))[0], path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    config.batch_size = int(batch_size)
    if dtype:
        config.model.dtype = dtype
    values = {}
    for item in overrides:
        key, _, text = item.partition("=")
        try:
            values[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            values[key] = text
    config = apply_overrides(config, values, "--override")
    validate_train_config(config)
    return config


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _synthetic_batch(config: Any) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    out = {}
    for key, (shape, dtype) in batch_spec(config).items():
        kind = np.dtype(dtype).kind
        out[key] = rng.standard_normal(shape).astype(dtype) if kind == "f" else np.zeros(shape, dtype)
    return out


def measure(config: Any, scanned: bool, steps: int, warmup: int) -> dict[str, Any]:
    """Compile and step times of ``config``'s train step with ``model.scan_blocks=scanned`` (see the module doc)."""
    config = config.copy_and_resolve_references()
    config.model.scan_blocks = bool(scanned)
    load_before = _loadavg()
    mesh = sharding.data_mesh()
    batch = sharding.shard_batch(_synthetic_batch(config), mesh)
    method = build_method(config)
    tx, _ = make_optimizer(config.optim, config.total_steps, int(config.batch_size), method=config.method)
    key = jax.random.key(config.seed)

    init = jax.jit(lambda k, b: create_train_state(method, tx, k, b), out_shardings=sharding.replicated(mesh))
    t0 = time.perf_counter()
    init_compiled = init.lower(key, batch).compile()
    init_compile_s = time.perf_counter() - t0
    state = init_compiled(key, batch)

    step_fn = jit_train_step(method, tx, config.seed)
    t0, c0 = time.perf_counter(), cpu_seconds()
    lowered = step_fn.lower(state, batch)
    compiled = lowered.compile()
    compile_s, compile_cpu_s = time.perf_counter() - t0, cpu_seconds() - c0
    hlo_chars = len(lowered.as_text())

    for _ in range(warmup):
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        state, metrics = compiled(state, batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - t0)
    loss = float(jax.device_get(metrics["loss"]))
    del state, compiled, lowered, init_compiled
    jax.clear_caches()
    gc.collect()
    return {
        "layout": "scanned" if scanned else "unrolled",
        "init_compile_s": round(init_compile_s, 2),
        "compile_s": round(compile_s, 2),
        "compile_cpu_s": round(compile_cpu_s, 2),
        "hlo_chars": hlo_chars,
        "s_per_step": round(float(np.mean(times)), 3) if times else None,
        "step_times_s": [round(t, 3) for t in times],
        "loss": loss,
        "loss_finite": bool(np.isfinite(loss)),
        "loadavg_before": load_before,
        "loadavg_after": _loadavg(),
    }


def _row(name: str, r: dict[str, Any]) -> str:
    return (f"| {name} | {r['layout']} | {r['compile_s']:.1f} | {r['compile_cpu_s']:.1f} | {r['init_compile_s']:.1f} "
            f"| {r['s_per_step']:.2f} | {r['hlo_chars'] / 1e6:.2f} | {r['loadavg_before'][0]:.1f} / "
            f"{r['loadavg_after'][0]:.1f} |")


def main(argv):
    del argv
    for layout in _LAYOUTS.value:
        if layout not in ("unrolled", "scanned"):
            raise app.UsageError(f"--layouts entries must be 'unrolled' or 'scanned', got {layout!r}")
    results: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "jax": jax.__version__,
        "backend": jax.default_backend(),
        "devices": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "command": " ".join(sys.argv),
        "batch_size": _BATCH.value,
        "loadavg_start": _loadavg(),
        "runs": [],
    }
    print(f"# {results['date']}, jax {results['jax']} ({results['backend']}, {results['devices']} device(s)), "
          f"batch {_BATCH.value}, load average {results['loadavg_start']}", flush=True)
    print("| config | layout | compile s | compile CPU s | init compile s | s/step | HLO Mchars | load 1 min "
          "before / after |\n|---|---|---|---|---|---|---|---|", flush=True)
    for path in _CONFIGS.value:
        config = load_config(path, _BATCH.value, _DTYPE.value, tuple(_SET.value))
        name = f"{os.path.basename(path)} ({config.method}, {config.model.dtype}, depth {config.model.depth})"
        for _ in range(_REPEATS.value):
            for layout in _LAYOUTS.value:
                r = measure(config, layout == "scanned", _STEPS.value, _WARMUP.value)
                results["runs"].append({"config": path, "method": config.method, "dtype": config.model.dtype, **r})
                print(_row(name, r), flush=True)
    results["loadavg_end"] = _loadavg()
    report_json(results, _OUT.value)


if __name__ == "__main__":
    app.run(main)
