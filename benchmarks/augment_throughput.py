"""Throughput of the real tf.data training pipelines with the earlier vs the reference augmentations.

  python benchmarks/augment_throughput.py [--preset=mnist5k|paper224] [--rounds=5 --batches=4] [--out=x.json]

Builds ``ssl_ad.data.pipeline.train_dataset`` (the training loop's input pipeline) for the
multi-crop (DINO) and single-view (MAE) configs of the preset, on synthetic uint8 images of the
shape the data set would have (no data set is loaded), in two settings:

* ``old``: ``data.crop_sampler='tf_bounding_box'``, ``data.resize_antialias=False``,
  ``data.color_jitter_impl='additive_brightness'`` (ssl_ad's earlier augmentations);
* ``new``: the defaults (torchvision's RandomResizedCrop sampler and ColorJitter, antialiased
  bicubic resize).

Both pipelines are built (traced, first batch untimed), then timed alternately, old and new,
``--rounds`` times: each round opens a fresh iterator of one setting (so the other setting's
pipeline is not running ahead in the background), discards ``--warmup`` batches and times
``--batches`` more. Prints, per recipe, the median over rounds of images/s (wall time) and of
the process's CPU time per image (user + system, all threads: on a machine shared with other
jobs this is the steadier measure of cost), new / old for both, and the time to the first batch
(tracing) of each pipeline. Presets:

* ``mnist5k``: configs/dino_mnist5k.py and configs/mae_mnist5k.py on 28 x 28 x 1 images (the demo);
* ``paper224``: configs/dino_vits16_224.py (2 x 224 + 8 x 96 crops) and configs/mae_vitb16_224.py
  on 256 x 256 x 3 images (``data.load_size`` 256), with ``--batch`` images per batch.
"""

from __future__ import annotations

import gc
import os
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags

from ssl_ad.data.pipeline import train_dataset
from ssl_ad.data.split import ImageSplit
from bench_common import cpu_seconds as _cpu_s
from bench_common import report_json
from bench_common import synthetic_split as _synthetic

_PRESET = flags.DEFINE_enum("preset", "mnist5k", ["mnist5k", "paper224"], "Configs and image shape.")
_ROUNDS = flags.DEFINE_integer("rounds", 5, "Alternating old/new timing rounds.")
_BATCHES = flags.DEFINE_integer("batches", 4, "Batches timed per round and setting.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed batches at the start of each round (fills the pipeline).")
_BATCH = flags.DEFINE_integer("batch", 0, "Images per batch (0 = the config's batch_size, capped at 256).")
_IMAGES = flags.DEFINE_integer("images", 1000, "Synthetic training images held in memory.")
_OUT = flags.DEFINE_string("out", None, "Also write the results as JSON here.")
_INTRA = flags.DEFINE_integer(
    "tf_intra_op_threads", 0, "tf.config.threading.set_intra_op_parallelism_threads before anything runs "
    "(0 = TensorFlow's default, as train.py runs). 1 stops kernels such as ScaleAndTranslate (the antialiased "
    "resize) from sharding tiny images over the intra-op pool, whose spinning threads cost CPU time."
)

OLD = {"crop_sampler": "tf_bounding_box", "resize_antialias": False, "color_jitter_impl": "additive_brightness"}
PRESETS = {
    "mnist5k": (("multicrop", "configs.dino_mnist5k"), ("single", "configs.mae_mnist5k"), (28, 28, 1)),
    "paper224": (("multicrop", "configs.dino_vits16_224"), ("single", "configs.mae_vitb16_224"), (256, 256, 3)),
}


def _config(module: str, old: bool, batch: int):
    import importlib

    c = importlib.import_module(module).get_config()
    c.batch_size = batch or min(int(c.batch_size), 256)
    c.total_steps = 10**6
    if old:
        for k, v in OLD.items():
            c.data[k] = v
    return c


def _one_round(ds, batch: int) -> tuple[float, float]:
    """A fresh iterator (the other setting's pipeline is gone): warm-up batches, then timed ones.

    Returns (images/s of wall time, CPU microseconds per image).
    """
    it = iter(ds)
    for _ in range(_WARMUP.value):
        next(it)
    wall, cpu = time.perf_counter(), _cpu_s()
    for _ in range(_BATCHES.value):
        next(it)
    wall, cpu = time.perf_counter() - wall, _cpu_s() - cpu
    del it
    gc.collect()
    n = batch * _BATCHES.value
    return n / wall, 1e6 * cpu / n


def bench(recipe: str, module: str, split: ImageSplit) -> dict:
    datasets, build_s, batch = {}, {}, 0
    for name in ("old", "new"):
        c = _config(module, name == "old", _BATCH.value)
        batch = int(c.batch_size)
        start = time.perf_counter()
        datasets[name] = train_dataset(c, split, 0)
        next(iter(datasets[name]))  # tracing and graph instantiation, untimed
        build_s[name] = time.perf_counter() - start
    rates = {"old": [], "new": []}
    for r in range(_ROUNDS.value):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            rates[name].append(_one_round(datasets[name], batch))
    med = {k: statistics.median(x[0] for x in v) for k, v in rates.items()}
    cpu = {k: statistics.median(x[1] for x in v) for k, v in rates.items()}
    return {
        "recipe": recipe,
        "config": module,
        "batch": batch,
        "images_per_s_old": round(med["old"], 1),
        "images_per_s_new": round(med["new"], 1),
        "ratio_new_over_old": round(med["new"] / med["old"], 3),
        "cpu_us_per_image_old": round(cpu["old"], 1),
        "cpu_us_per_image_new": round(cpu["new"], 1),
        "cpu_ratio_new_over_old": round(cpu["new"] / cpu["old"], 3),
        "rounds_images_per_s_old": [round(v[0], 1) for v in rates["old"]],
        "rounds_images_per_s_new": [round(v[0], 1) for v in rates["new"]],
        "first_batch_s": {k: round(v, 2) for k, v in build_s.items()},
    }


def main(argv):
    del argv
    if _INTRA.value:
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(_INTRA.value)
    multi, single, shape = PRESETS[_PRESET.value]
    split = _synthetic(shape, _IMAGES.value)
    load_before = os.getloadavg()
    results = [bench(recipe, module, split) for recipe, module in (multi, single)]
    out = {
        "preset": _PRESET.value,
        "image_shape": list(shape),
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "cpu_count": os.cpu_count(),
        "loadavg_before": [round(x, 2) for x in load_before],
        "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        "tf_intra_op_threads": _INTRA.value,
        "old_settings": OLD,
        "results": results,
    }
    for r in results:
        print(
            f"{r['recipe']:9s} {r['config']:26s} batch {r['batch']:4d}: old {r['images_per_s_old']:8.1f} img/s, "
            f"new {r['images_per_s_new']:8.1f} img/s, new/old {r['ratio_new_over_old']:.3f}; CPU per image "
            f"old {r['cpu_us_per_image_old']:.0f} us, new {r['cpu_us_per_image_new']:.0f} us, "
            f"new/old {r['cpu_ratio_new_over_old']:.3f}"
        )
    report_json(out, _OUT.value)


if __name__ == "__main__":
    app.run(main)
