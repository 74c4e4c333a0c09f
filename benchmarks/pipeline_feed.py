"""Can the input pipeline feed an accelerator? Host cost of the training pipeline vs the step's FLOPs.

  python benchmarks/pipeline_feed.py [--recipes=dino_vits16_224,mae_vitb16_224,dino_cifar10,mae_cifar10] \
      [--rounds=3 --batches=3 --warmup=2] [--flops_batch=32] [--device_augment] [--out=feed.json]

For each recipe (a training config plus overrides, see :data:`RECIPES`):

* **host**: builds ``ssl_ad.data.pipeline.train_dataset`` (the training loop's input pipeline)
  on synthetic uint8 images of the data set's shape (``bench_common.synthetic_split``; no data set
  is loaded) and reads it as the loop does (``as_numpy_iterator``). ``--rounds`` times: a fresh
  iterator, ``--warmup`` untimed batches, ``--batches`` timed ones; the median over rounds of
  images/s (wall) and of CPU-seconds per image (user + system of this process, all threads:
  steady on a shared machine). Images/s per host core = 1 / CPU-seconds per image.
* **FLOPs**: XLA's count of the compiled train step (``jax.jit(step).lower(...).compile()
  .cost_analysis()['flops']``: forward, backward and optimiser update, all ops) in bfloat16
  (``model.dtype=bfloat16``) at ``--flops_batch`` images, divided by that batch. The state and
  batch are abstract (``jax.eval_shape``): nothing is run, only compiled.
* **feed**: images/s an accelerator needs at ``--mfu`` of ``--peak_tflops`` (default 45 % of an
  H200's 989 dense bf16 TFLOP/s) = mfu x peak / FLOPs per image, and the host cores that takes =
  needed images/s x CPU-seconds per image, compared with ``--cores_per_gpu``.
* ``--device_augment``: the same with ``data.augment_device=True`` (``ssl_ad.data.device_augment``):
  the host only gathers uint8 images; the crops are made by a jitted function on the device. It
  adds the host cost of that pipeline, the augmentation's XLA FLOPs per image and its CPU-seconds
  per image on this machine's JAX CPU backend (jitted, ``--aug_batch`` images per call).

Prints a table and the JSON (with the date, load average before and after, command line).
"""

from __future__ import annotations

import datetime
import gc
import importlib
import os
import statistics
import sys
import time
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from bench_common import batch_spec, cpu_seconds, host_batch_spec, report_json, synthetic_split, xla_flops  # noqa: E402
from ssl_ad.ablation.grid import apply_overrides  # noqa: E402
from ssl_ad.config_check import validate_train_config  # noqa: E402
from ssl_ad.data import device_augment  # noqa: E402
from ssl_ad.data.pipeline import train_dataset  # noqa: E402
from ssl_ad.methods import build_method  # noqa: E402
from ssl_ad.train.optim import make_optimizer  # noqa: E402
from ssl_ad.train.state import create_train_state  # noqa: E402
from ssl_ad.train.step import make_train_step  # noqa: E402

# name -> (config module, overrides, shape of the stored images (H, W, C), default host batch)
RECIPES: dict[str, tuple[str, dict[str, Any], tuple[int, int, int], int]] = {
    # The DINO ViT-S/16 recipe: 2 x 224 + 10 x 96 crops (the config has the paper's 8 locals).
    "dino_vits16_224": ("configs.dino_vits16_224", {"data.num_local": 10}, (256, 256, 3), 64),
    "mae_vitb16_224": ("configs.mae_vitb16_224", {}, (256, 256, 3), 128),
    "dino_cifar10": ("configs.dino_cifar10", {}, (32, 32, 3), 256),
    "mae_cifar10": ("configs.mae_cifar10", {}, (32, 32, 3), 512),
}

_RECIPES = flags.DEFINE_list("recipes", list(RECIPES), f"Recipes to measure, of {list(RECIPES)}.")
_ROUNDS = flags.DEFINE_integer("rounds", 3, "Timing rounds (fresh iterator each); medians are reported.")
_BATCHES = flags.DEFINE_integer("batches", 3, "Batches timed per round.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed batches at the start of each round (fills the pipeline).")
_BATCH = flags.DEFINE_integer("batch", 0, "Host batch (0 = the recipe's default in RECIPES).")
_IMAGES = flags.DEFINE_integer("images", 512, "Synthetic training images held in memory.")
_FLOPS_BATCH = flags.DEFINE_integer("flops_batch", 32, "Batch of the compiled train step whose FLOPs are counted.")
_SKIP_FLOPS = flags.DEFINE_bool("skip_flops", False, "Do not compile the train step (no FLOPs, no feed columns).")
_PEAK = flags.DEFINE_float("peak_tflops", 989.0, "Peak dense bf16 TFLOP/s of one accelerator (H200 SXM: 989).")
_MFU = flags.DEFINE_float("mfu", 0.45, "Model-FLOP utilisation to feed.")
_CORES_PER_GPU = flags.DEFINE_float(
    "cores_per_gpu", 14.0, "Physical host cores per accelerator of a typical 8-GPU node (DGX H100/H200: "
    "2 x 56 cores / 8 = 14, 28 hardware threads)."
)
_DEVICE = flags.DEFINE_bool("device_augment", False, "Also measure data.augment_device=True.")
_AUG_BATCH = flags.DEFINE_integer("aug_batch", 32, "Images per call when timing the device augmentation here.")
_AUG_CALLS = flags.DEFINE_integer("aug_calls", 3, "Timed calls of the device augmentation (after 1 warm-up).")
_OUT = flags.DEFINE_string("out", None, "Also write the JSON here.")


def recipe_config(name: str, batch: int, device: bool = False) -> Any:
    """The recipe's config (validated, ``model.variant`` resolved) at host batch ``batch``."""
    module, overrides, _, default_batch = RECIPES[name]
    c = importlib.import_module(module).get_config()
    c.batch_size = batch or default_batch
    c.total_steps = 10**6
    c = apply_overrides(c, {**overrides, "data.augment_device": device}, f"recipe {name}")
    validate_train_config(c)
    return c


def host_cost(config: Any, split) -> dict:
    """Median images/s and CPU-seconds per image of the host pipeline (``--rounds`` fresh iterators)."""
    batch = int(config.batch_size)
    ds = train_dataset(config, split, 0)
    t0 = time.perf_counter()
    next(ds.as_numpy_iterator())  # tracing and graph instantiation, untimed
    first_s = time.perf_counter() - t0
    rates, cpus = [], []
    for _ in range(_ROUNDS.value):
        it = ds.as_numpy_iterator()
        for _ in range(_WARMUP.value):
            next(it)
        wall, cpu = time.perf_counter(), cpu_seconds()
        for _ in range(_BATCHES.value):
            next(it)
        wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
        del it
        gc.collect()
        n = batch * _BATCHES.value
        rates.append(n / wall)
        cpus.append(cpu / n)
    cpu_s = statistics.median(cpus)
    return {
        "batch": batch,
        "images_per_s_wall": round(statistics.median(rates), 1),
        "cpu_s_per_image": cpu_s,
        "images_per_s_per_core": round(1.0 / cpu_s, 1),
        "rounds_cpu_ms_per_image": [round(1e3 * c, 3) for c in cpus],
        "first_batch_s": round(first_s, 2),
        "batch_spec": {k: [list(s), d] for k, (s, d) in host_batch_spec(config).items()},
    }


def train_flops_per_image(config: Any, batch: int) -> dict:
    """XLA's FLOPs per image of the compiled bfloat16 train step at ``batch`` (abstract state: nothing runs)."""
    c = config.copy_and_resolve_references()
    c.batch_size = batch
    c.model.dtype = "bfloat16"
    abstract = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in batch_spec(c).items()}  # after device augmentation
    method = build_method(c)
    tx, _ = make_optimizer(c.optim, c.total_steps, batch, method=c.method)
    state = jax.eval_shape(lambda key, b: create_train_state(method, tx, key, b), jax.random.key(c.seed), abstract)
    t0 = time.perf_counter()
    compiled = jax.jit(make_train_step(method, tx, c.seed), donate_argnums=(0,)).lower(state, abstract).compile()
    flops = xla_flops(compiled.cost_analysis())
    return {
        "flops_batch": batch,
        "train_batch_shapes": {k: list(v.shape) for k, v in abstract.items()},
        "compile_s": round(time.perf_counter() - t0, 1),
        "flops_per_image": flops / batch if flops else None,
    }


def device_cost(config: Any, split) -> dict:
    """The jitted device augmentation on this machine's JAX backend: XLA FLOPs and CPU-seconds per image."""
    c = config.copy_and_resolve_references()
    c.batch_size = _AUG_BATCH.value
    fn = jax.jit(device_augment.batch_augmenter(c))
    images = jax.device_put(split.images[: _AUG_BATCH.value])
    t0 = time.perf_counter()
    compiled = fn.lower({"image": images}, 0).compile()
    compile_s = time.perf_counter() - t0
    flops = xla_flops(compiled.cost_analysis())
    jax.block_until_ready(compiled({"image": images}, 0))
    wall, cpu = time.perf_counter(), cpu_seconds()
    for step in range(1, _AUG_CALLS.value + 1):
        out = compiled({"image": images}, step)
    jax.block_until_ready(out)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    n = _AUG_BATCH.value * _AUG_CALLS.value
    return {
        "aug_batch": _AUG_BATCH.value,
        "compile_s": round(compile_s, 1),
        "flops_per_image": flops / _AUG_BATCH.value if flops else None,
        "cpu_s_per_image_jax_cpu": cpu / n,
        "images_per_s_wall_jax_cpu": round(n / wall, 1),
        "output_shapes": {k: list(v.shape) for k, v in out.items()},
    }


def feed(cpu_s_per_image: float, flops_per_image: float | None) -> dict:
    """Images/s for ``--mfu`` of ``--peak_tflops`` and the host cores that needs."""
    if not flops_per_image:
        return {}
    needed = _MFU.value * _PEAK.value * 1e12 / flops_per_image
    cores = needed * cpu_s_per_image
    return {
        "images_per_s_for_mfu": round(needed, 1),
        "host_cores_needed": round(cores, 2),
        "fits_cores_per_gpu": bool(cores <= _CORES_PER_GPU.value),
    }


def measure(name: str) -> dict:
    shape = RECIPES[name][2]
    split = synthetic_split(shape, _IMAGES.value)
    config = recipe_config(name, _BATCH.value)
    row: dict[str, Any] = {"recipe": name, "config": RECIPES[name][0], "overrides": RECIPES[name][1],
                           "image_shape": list(shape), "load_before": [round(x, 2) for x in os.getloadavg()]}
    row["host"] = host_cost(config, split)
    flops = None
    if not _SKIP_FLOPS.value:
        row["train"] = train_flops_per_image(config, _FLOPS_BATCH.value)
        flops = row["train"]["flops_per_image"]
        row["feed"] = feed(row["host"]["cpu_s_per_image"], flops)
    if _DEVICE.value:
        dev_config = recipe_config(name, _BATCH.value, device=True)
        dev: dict[str, Any] = {"host": host_cost(dev_config, split), "augment": device_cost(dev_config, split)}
        aug_flops = dev["augment"]["flops_per_image"] or 0.0
        if flops:
            # MFU counts the model's FLOPs; the augmentation is extra device work, reported beside it.
            dev["augment_flops_share_of_step"] = round(aug_flops / flops, 5)
            dev["feed"] = feed(dev["host"]["cpu_s_per_image"], flops)
        row["device_augment"] = dev
    row["load_after"] = [round(x, 2) for x in os.getloadavg()]
    return row


def _table(rows: list[dict]) -> str:
    lines = ["| recipe | augmentation | host img/s/core | host img/s (wall) | step GFLOP/img (XLA, bf16) | "
             f"device aug. GFLOP/img | img/s for {100 * _MFU.value:.0f} % MFU | host cores needed | load avg |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        flops = r.get("train", {}).get("flops_per_image")
        paths = [("tf.data (host)", r["host"], None, r.get("feed", {}))]
        if "device_augment" in r:
            d = r["device_augment"]
            paths.append(("device", d["host"], d["augment"]["flops_per_image"], d.get("feed", {})))
        for path, host, aug, f in paths:
            lines.append(
                f"| {r['recipe']} | {path} | {host['images_per_s_per_core']:.0f} | {host['images_per_s_wall']:.0f} | "
                f"{f'{flops / 1e9:.2f}' if flops else '-'} | {f'{aug / 1e9:.3g}' if aug else '-'} | "
                f"{f.get('images_per_s_for_mfu', '-')} | {f.get('host_cores_needed', '-')} | "
                f"{r['load_before'][0]:.1f} / {r['load_after'][0]:.1f} |"
            )
    return "\n".join(lines)


def main(argv):
    del argv
    unknown = sorted(set(_RECIPES.value) - set(RECIPES))
    if unknown:
        raise app.UsageError(f"unknown recipes {unknown}; choose from {list(RECIPES)}")
    result: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(sys.argv),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15_min_before": list(os.getloadavg()),
        "peak_tflops": _PEAK.value,
        "mfu": _MFU.value,
        "cores_per_gpu": _CORES_PER_GPU.value,
        "flops_source": "XLA HloCostAnalysis of the compiled bf16 train step: "
        "jax.jit(step).lower(abstract state, batch).compile().cost_analysis()['flops'] / flops_batch",
        "rows": [measure(name) for name in _RECIPES.value],
    }
    result["load_average_1_5_15_min_after"] = list(os.getloadavg())
    print(_table(result["rows"]))
    report_json(result, _OUT.value)


if __name__ == "__main__":
    np.set_printoptions(precision=4)
    app.run(main)
