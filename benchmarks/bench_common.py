"""Helpers the benchmark scripts share (no absl flags here, so any script can import them).

* :func:`cpu_seconds`: CPU time of this process, all threads (user + system);
* :func:`report_json`: prints a result dict as JSON and writes it to a file;
* :func:`synthetic_split`: smooth random uint8 images of a data set's shape (no data set loaded);
* :func:`xla_flops`: the FLOP count of ``compiled.cost_analysis()``;
* :func:`host_batch_spec` / :func:`batch_spec`: shapes and dtypes of the training pipeline's batches
  (from the pipeline itself) / of the train step's input (the same, or after the device
  augmentation with ``data.augment_device``).
"""

from __future__ import annotations

import json
import os
import resource
import sys
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from ssl_ad.data.device_augment import batch_augmenter  # noqa: E402
from ssl_ad.data.pipeline import train_dataset  # noqa: E402
from ssl_ad.data.sources import ImageSplit  # noqa: E402


def cpu_seconds() -> float:
    """CPU seconds of this process (all threads): robust to other jobs' load, unlike wall time."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def report_json(result: Any, path: str | None) -> None:
    """Prints ``result`` as indented JSON and, when ``path`` is given, writes the same text there
    (creating its folder). Values JSON cannot encode are written with ``str``."""
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")


def synthetic_split(shape: tuple[int, int, int], n: int) -> ImageSplit:
    """``n`` uint8 images of ``shape`` (H, W, C): smooth random blobs plus noise, so every augmentation
    does real work (not constant)."""
    rng = np.random.default_rng(0)
    h, w, ch = shape
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    images = np.empty((n, h, w, ch), np.uint8)
    for i in range(n):
        f = rng.uniform(1, 4, size=(ch, 2))
        base = np.stack([np.sin(2 * np.pi * (f[c, 0] * xx + f[c, 1] * yy)) for c in range(ch)], -1)
        images[i] = np.clip(128 + 90 * base + rng.normal(0, 20, (h, w, ch)), 0, 255).astype(np.uint8)
    return ImageSplit("synthetic", "train", images, np.zeros(n, np.int64), ["x"])


def xla_flops(cost: Any) -> float | None:
    """``cost_analysis()`` gives a dict (a list of one dict in older jax); None if XLA has no count."""
    if isinstance(cost, (list, tuple)):
        cost = cost[0] if cost else None
    if not cost or "flops" not in cost:
        return None
    return float(cost["flops"])


def host_batch_spec(config: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shapes and dtypes of one process's host batch, from the pipeline itself (no data loaded)."""
    side = int(config.data.get("load_size", 0) or config.model.image_size)
    n = int(config.batch_size)
    fake = ImageSplit("fake", "train", np.zeros((n, side, side, 3), np.uint8), np.zeros(n, np.int64), ["x"])
    spec = train_dataset(config, fake, 0).element_spec
    return {k: (tuple(int(d) for d in v.shape), v.dtype.name) for k, v in spec.items()}


def batch_spec(config: Any) -> dict[str, tuple[tuple[int, ...], str]]:
    """Shapes and dtypes of the train step's input: the host batch, or with ``data.augment_device``
    what ``ssl_ad.data.device_augment.batch_augmenter`` makes of it (``jax.eval_shape``: nothing runs)."""
    spec = host_batch_spec(config)
    if not config.data.get("augment_device", False):
        return spec
    host = {k: jax.ShapeDtypeStruct(shape, dtype) for k, (shape, dtype) in spec.items()}
    out = jax.eval_shape(batch_augmenter(config), host, 0)
    return {k: (tuple(int(d) for d in v.shape), v.dtype.name) for k, v in out.items()}
