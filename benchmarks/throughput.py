"""Throughput of a training config: train step, embedding pass, FLOPs; and the kNN scorer at scale.

  python benchmarks/throughput.py --config=configs/mae_mnist5k.py --out=results.json \
      [--config.batch_size=128 ...] [--peak_tflops=989] [--steps=10 --warmup=2 --time_budget_s=60] [--real_data]
  python benchmarks/throughput.py --knn_n=50000 --knn_dim=384 --out=knn.json

What is measured (after ``--warmup`` calls, over ``--steps`` timed calls, fewer when they would
take more than ``--time_budget_s`` (default 60 s, judged from the last warm-up call), blocking on
the last result only, so dispatch overlaps compute as in the training loop):

* ``train``: the jitted, buffer-donating train step of ``ssl_ad.train.step`` (the loop's step) on
  synthetic, device-resident batches with the exact shapes and dtypes of the pipeline's batches
  (taken from ``train_dataset(...).element_spec`` built over a few fake images, so the data set is
  never loaded): the model, not the input pipeline. The timed calls run under
  ``jax.transfer_guard('disallow')``, which proves the step makes no host transfer.
* ``train_real_data`` (``--real_data``): the same step fed by the real tf.data pipeline through
  ``sharding.shard_batch`` and the loop's ``_prefetch`` (needs the data set prepared).
* ``embed``: the evaluation forward of the encoder (CLS pooling, float32 features) on batches of
  ``model.image_size`` images, as ``ssl_ad.evaluation.embedding.embed_images`` runs it.
* FLOPs: XLA's own count, ``jax.jit(f).lower(...).compile().cost_analysis()['flops']`` of the
  compiled train step (forward + backward + optimiser update) and of the embedding pass, per image.
  That is the cost of one device's program; it is multiplied by the device count (data parallel).
  The pre-optimisation count ``lower(...).cost_analysis()`` is recorded beside it.
  Achieved FLOP/s = FLOPs per step / seconds per step; with ``--peak_tflops`` (per device, e.g.
  989 for an H200's dense bf16) the utilisation is achieved / (peak x devices).
* ``knn`` (``--knn_n``): ``KNNScorer`` (k=2, cosine, chunked JAX top-k) fit on n random d-dim
  training features, then scoring n queries; wall time of fit and score and the process's peak
  resident memory (an n x n float32 matrix would be 4 n^2 bytes).
"""

from __future__ import annotations

import datetime
import os
import platform
import resource
import sys
import time
import warnings
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from bench_common import batch_spec  # noqa: E402,F401 (also this module's public helper)
from bench_common import report_json  # noqa: E402
from bench_common import xla_flops as _flops  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (optional with --knn_n).")
_OUT = flags.DEFINE_string("out", None, "Where the JSON results go (also printed).")
_PEAK = flags.DEFINE_float("peak_tflops", 0.0, "Peak TFLOP/s of one device, for the utilisation (0 = none).")
_STEPS = flags.DEFINE_integer("steps", 10, "Timed calls of each measured function.")
_WARMUP = flags.DEFINE_integer("warmup", 2, "Untimed calls after compilation (at least 1).")
_BUDGET = flags.DEFINE_float(
    "time_budget_s", 60.0, "Cap the timed calls of each measurement at about this many seconds, judged from "
    "the last warm-up call (at least 2 calls; 0 = always --steps)."
)
_REAL = flags.DEFINE_bool("real_data", False, "Also time the train step fed by the real data pipeline.")
_EMBED_BATCH = flags.DEFINE_integer("embed_batch", 0, "Embedding-pass batch (0 = the config's batch_size).")
_KNN_N = flags.DEFINE_integer("knn_n", 0, "Train and query rows of the kNN benchmark (0 = skip it).")
_KNN_DIM = flags.DEFINE_integer("knn_dim", 384, "Feature dimension of the kNN benchmark.")
_KNN_K = flags.DEFINE_integer("knn_k", 2, "k of the kNN benchmark.")
_KNN_CHUNK = flags.DEFINE_integer("knn_chunk", 1024, "Query and train chunk size of KNNScorer.")
flags.mark_flag_as_required("out")


def _timed(fn, args_fn, steps: int, warmup: int, budget_s: float = 0.0) -> tuple[float, int, Any]:
    """(seconds per call, timed calls, last output) of ``fn``; ``args_fn(out)`` gives the next args.

    The ``warmup`` calls are timed one by one (blocking); when ``budget_s`` > 0 they cap the timed
    calls at about ``budget_s`` seconds (at least 2), so slow configs finish on a slow machine.
    The timed calls run under ``jax.transfer_guard('disallow')`` and block only on the last one.
    """
    import jax

    out, per_call = None, None
    for _ in range(max(warmup, 1)):
        t0 = time.perf_counter()
        out = jax.block_until_ready(fn(*args_fn(out)))
        per_call = time.perf_counter() - t0
    if budget_s > 0 and per_call:
        steps = max(2, min(steps, int(budget_s / per_call)))
    start = time.perf_counter()
    with jax.transfer_guard("disallow"):
        for _ in range(steps):
            out = fn(*args_fn(out))
        jax.block_until_ready(out)
    return (time.perf_counter() - start) / steps, steps, out


def _rates(seconds: float, images: int, flops_step: float | None, devices: int, peak_tflops: float) -> dict:
    out = {"seconds_per_step": seconds, "images_per_s": images / seconds}
    if flops_step:
        out["achieved_flops_per_s"] = flops_step / seconds
        out["achieved_tflops_per_s"] = flops_step / seconds / 1e12
        if peak_tflops > 0:
            out["utilisation"] = flops_step / seconds / (peak_tflops * 1e12 * devices)
    return out


def bench_training(
    config: Any, steps: int, warmup: int, peak: float, real_data: bool, embed_batch: int, budget_s: float
) -> dict:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from ssl_ad.methods import build_method
    from ssl_ad.models.vit import pool_tokens, vit_from_config
    from ssl_ad import sharding
    from ssl_ad.train.optim import make_optimizer
    from ssl_ad.train.state import create_train_state
    from ssl_ad.train.step import make_train_step

    mesh = sharding.data_mesh()
    devices = jax.device_count()
    batch_size = int(config.batch_size)
    spec = batch_spec(config)
    rng = np.random.default_rng(0)
    host_batch = {k: rng.standard_normal(shape, dtype=np.float32).astype(dtype) for k, (shape, dtype) in spec.items()}
    batch = sharding.shard_batch(host_batch, mesh)

    method = build_method(config)
    tx, _ = make_optimizer(config.optim, config.total_steps, batch_size, method=config.method)
    state = sharding.replicate(create_train_state(method, tx, jax.random.key(config.seed), batch), mesh)
    param_dtypes = sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(state.params)})
    n_params = int(sum(x.size for x in jax.tree_util.tree_leaves(state.params)))

    step_fn = jax.jit(make_train_step(method, tx, config.seed), donate_argnums=(0,))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t0 = time.perf_counter()
        lowered = step_fn.lower(state, batch)
        compiled = lowered.compile()
        compile_s = time.perf_counter() - t0
        flops_step_dev = _flops(compiled.cost_analysis())
        flops_step_hlo = _flops(lowered.cost_analysis())
        seconds, timed_steps, (state, metrics) = _timed(
            compiled, lambda out: (state if out is None else out[0], batch), steps, warmup, budget_s
        )
    donation = [str(w.message) for w in caught if "donat" in str(w.message).lower()]
    loss = float(jax.device_get(metrics["loss"]))
    flops_step = flops_step_dev * devices if flops_step_dev else None
    train = {
        "batch_size": batch_size,
        "batch_shapes": {k: list(s) for k, (s, _) in spec.items()},
        "compile_s": compile_s,
        "timed_steps": timed_steps,
        "flops_per_step": flops_step,
        "flops_per_image": flops_step / batch_size if flops_step else None,
        "flops_per_image_hlo_unoptimised": flops_step_hlo * devices / batch_size if flops_step_hlo else None,
        **_rates(seconds, batch_size, flops_step, devices, peak),
        "loss_after": loss,
        "loss_finite": bool(np.isfinite(loss)),
        "param_dtypes_after": sorted({str(x.dtype) for x in jax.tree_util.tree_leaves(state.params)}),
        "donation_warnings": donation,
        "host_transfers_in_step": "none (timed calls ran under jax.transfer_guard('disallow'))",
    }

    real = None
    if real_data:
        from ssl_ad.data.device_augment import jitted_augmenter
        from ssl_ad.data.pipeline import train_batches
        from ssl_ad.data.sources import load_split
        from ssl_ad.train.loop import _prefetch

        split = load_split(config.data, config.data.train_split)
        n_steps = warmup + timed_steps
        cfg = config.copy_and_resolve_references()
        cfg.unlock()
        cfg.total_steps = n_steps
        batches = (sharding.shard_batch(b, mesh) for b in train_batches(
            cfg, split, 0, process_index=jax.process_index(), process_count=jax.process_count()))
        augment = jitted_augmenter(cfg)
        if augment is not None:  # data.augment_device: the crops are made on the device, as in the loop
            batches = (augment(b, s) for s, b in enumerate(batches))
        it = _prefetch(batches, 2)
        for _ in range(warmup):
            state, metrics = compiled(state, next(it))
        jax.block_until_ready(state)
        t0 = time.perf_counter()
        for b in it:
            state, metrics = compiled(state, b)
        jax.block_until_ready(state)
        real = _rates((time.perf_counter() - t0) / timed_steps, batch_size, flops_step, devices, peak)
        real["timed_steps"] = timed_steps

    # The embedding pass: eval forward of the encoder, CLS pooling, float32 features.
    model = vit_from_config(config.model, drop_path_rate=0.0)
    enc_params = sharding.replicate(method.encoder_params(state.params, state.extra, "default"), mesh)
    eb = embed_batch or batch_size
    eb = max(eb // devices, 1) * devices
    images = jax.device_put(
        rng.standard_normal((eb, model.image_size, model.image_size, 3), dtype=np.float32),
        sharding.batch_sharding(mesh),
    )

    def embed(p, x):
        return pool_tokens(model.apply({"params": p}, x), "cls" if model.use_cls else "mean", model.use_cls).astype(
            jnp.float32
        )

    t0 = time.perf_counter()
    lowered_e = jax.jit(embed).lower(enc_params, images)
    compiled_e = lowered_e.compile()
    compile_e = time.perf_counter() - t0
    flops_e_dev = _flops(compiled_e.cost_analysis())
    flops_e = flops_e_dev * devices if flops_e_dev else None
    seconds_e, timed_e, feats = _timed(compiled_e, lambda out: (enc_params, images), steps, warmup, budget_s)
    embed_out = {
        "batch_size": eb,
        "image_size": model.image_size,
        "feature_dim": int(feats.shape[-1]),
        "compile_s": compile_e,
        "timed_steps": timed_e,
        "flops_per_image": flops_e / eb if flops_e else None,
        **_rates(seconds_e, eb, flops_e, devices, peak),
    }
    out = {
        "method": config.method,
        "model": {
            k: config.model[k] for k in ("image_size", "patch_size", "width", "depth", "num_heads", "dtype", "remat")
        },
        "num_params": n_params,
        "param_dtypes_init": param_dtypes,
        "train": train,
        "embed": embed_out,
    }
    if real is not None:
        out["train_real_data"] = real
    return out


def bench_knn(n: int, dim: int, k: int, chunk: int) -> dict:
    import numpy as np

    from ssl_ad.evaluation.scorers import KNNScorer

    rng = np.random.default_rng(0)
    train = rng.standard_normal((n, dim), dtype=np.float32)
    queries = rng.standard_normal((n, dim), dtype=np.float32)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    scorer = KNNScorer(k=k, metric="cosine", chunk_size=chunk, train_chunk_size=chunk)
    t0 = time.perf_counter()
    scorer.fit(train)
    fit_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scores = scorer.score(queries)
    score_s = time.perf_counter() - t0
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        "n_train": n,
        "n_query": n,
        "dim": dim,
        "k": k,
        "metric": "cosine",
        "chunk_size": chunk,
        "fit_s": fit_s,
        "score_s": score_s,
        "queries_per_s": n / score_s,
        "scores_finite": bool(np.all(np.isfinite(scores))),
        "peak_rss_mib_before": rss0,
        "peak_rss_mib_after": rss1,
        "n_by_n_float32_would_be_mib": 4.0 * n * n / 2**20,
    }


def main(argv):
    del argv
    import jax

    config = _CONFIG.value
    if config is None and not _KNN_N.value:
        raise app.UsageError("give --config and/or --knn_n")
    result: dict[str, Any] = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": jax.devices()[0].device_kind,
        "device_count": jax.device_count(),
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15_min_before": list(os.getloadavg()),
        "command": " ".join(sys.argv),
        "steps": _STEPS.value,
        "warmup": _WARMUP.value,
        "time_budget_s": _BUDGET.value,
        "peak_tflops_per_device": _PEAK.value or None,
        "flops_source": "XLA HloCostAnalysis: jax.jit(f).lower(...).compile().cost_analysis()['flops'] "
        "(per device program, x device_count)",
    }
    if config is not None:
        result["config"] = getattr(flags.FLAGS["config"], "config_filename", None)
        result.update(
            bench_training(
                config, _STEPS.value, _WARMUP.value, _PEAK.value, _REAL.value, _EMBED_BATCH.value, _BUDGET.value
            )
        )
    if _KNN_N.value:
        result["knn"] = bench_knn(_KNN_N.value, _KNN_DIM.value, _KNN_K.value, _KNN_CHUNK.value)
    result["load_average_1_5_15_min_after"] = list(os.getloadavg())
    report_json(result, _OUT.value)


if __name__ == "__main__":
    app.run(main)
