"""The training loop: data -> jitted step -> metrics and orbax checkpoints, resumable at any step.

``train_and_evaluate(config, workdir)`` is the whole job. Running it again on
the same workdir resumes from the latest complete checkpoint and replays the
exact data stream from there; when training is complete it does nothing.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

import ssl_ad
from ssl_ad.atomic import atomic_write_text
from ssl_ad.data.pipeline import train_batches
from ssl_ad.data.sources import load_split
from ssl_ad.errors import DivergenceError, UserInputError
from ssl_ad.methods import build_method
from ssl_ad.train import sharding
from ssl_ad.train.checkpointing import Checkpointer
from ssl_ad.train.metrics_log import MetricsWriter
from ssl_ad.train.optim import make_optimizer
from ssl_ad.train.state import TrainState, create_train_state
from ssl_ad.train.step import make_train_step

log = logging.getLogger(__name__)

# Testing aid: seconds to sleep after every step, so that a test can kill or preempt a run of a
# tiny model at a step of its choosing (tiny steps take milliseconds). Unset in real runs.
STEP_DELAY_ENV = "SSL_AD_TEST_STEP_DELAY_S"


class _StopRequest:
    """Turns SIGTERM (preemption) into a flag the loop checks between steps."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self):
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, no preemption support
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def check_workdir(workdir: str) -> None:
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise UserInputError(f"cannot create workdir {workdir}: {e.strerror}") from e
    if not os.access(workdir, os.W_OK):
        raise UserInputError(f"workdir {workdir} is not writable")


def _raise_if_diverged(state: TrainState, ckpt: Checkpointer) -> None:
    bad = int(jax.device_get(state.bad_step))
    if bad >= 0:
        last_good = ckpt.latest_step()
        loss, gnorm = float(jax.device_get(state.bad_loss)), float(jax.device_get(state.bad_grad_norm))
        what = "loss" if not np.isfinite(loss) else "gradient norm"
        kept = f"the last good one (step {last_good}) is kept" if last_good is not None else "there is no earlier one"
        raise DivergenceError(
            f"training diverged: non-finite {what} at step {bad} (loss={loss}, grad_norm={gnorm}); "
            f"no checkpoint of the diverged state was written, {kept}"
        )


def _meta(config: Any, step: int) -> dict[str, Any]:
    return {"step": int(step), "config": config.to_dict(), "version": ssl_ad.__version__}


def _log_row(metrics: dict, schedules: dict, step: int, images: int, seconds: float, steps: int) -> dict:
    row = {k: float(np.asarray(v)) for k, v in metrics.items()}
    row.update({k: float(f(step)) for k, f in schedules.items()})
    row["images_per_s"] = images / max(seconds, 1e-9)
    row["seconds_per_step"] = seconds / max(steps, 1)
    return row


def train_and_evaluate(config: Any, workdir: str) -> TrainState:
    """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the final state."""
    sharding.maybe_initialize_distributed()
    check_workdir(workdir)
    mesh = sharding.data_mesh()
    if config.batch_size % jax.device_count():
        raise UserInputError(f"batch_size {config.batch_size} is not divisible by {jax.device_count()} devices")

    split = load_split(config.data, config.data.train_split)
    method = build_method(config)
    tx, schedules = make_optimizer(config.optim, config.total_steps, config.batch_size)
    schedules = {**schedules, **method.schedules()}

    with _StopRequest() as stop:  # SIGTERM from here on: finish the step, save, stop (exit code 0)
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints)
        try:
            return _train(config, workdir, split, method, tx, schedules, mesh, ckpt, stop)
        finally:
            ckpt.close()  # waits for an in-flight (async) save, also when training stops with an error


def _train(config, workdir, split, method, tx, schedules, mesh, ckpt: Checkpointer, stop: _StopRequest) -> TrainState:
    latest = ckpt.latest_step()
    start_step = int(latest or 0)

    batches = train_batches(
        config, split, start_step, process_index=jax.process_index(), process_count=jax.process_count()
    )
    first = next(batches, None)
    init_batch = first if first is not None else next(train_batches(config, split, 0))
    # Jitted init builds the state directly replicated on every device (eager init runs op by op).
    init = jax.jit(lambda key, b: create_train_state(method, tx, key, b), out_shardings=sharding.replicated(mesh))
    state = init(jax.random.key(config.seed), sharding.shard_batch(init_batch, mesh))
    if latest is not None:
        state = ckpt.restore(latest, state)
        log.info("Resumed from step %d in %s", latest, ckpt.directory)
    if start_step >= config.total_steps:
        log.info("Training already complete (step %d of %d); nothing to do.", start_step, config.total_steps)
        return state

    atomic_write_text(os.path.join(workdir, "config.json"), json.dumps(config.to_dict(), indent=2, sort_keys=True))
    writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl"))
    writer.truncate_after(start_step)
    step_fn = jax.jit(
        make_train_step(method, tx, config.seed, config.get("inject_nan_at_step", -1)), donate_argnums=(0,)
    )

    def device_batches():
        batch = first
        it = batches
        while batch is not None:
            yield sharding.shard_batch(batch, mesh)
            batch = next(it, None)

    step = start_step
    delay = float(os.environ.get(STEP_DELAY_ENV, "") or 0.0)
    t_last, step_last = time.perf_counter(), step
    bar = tqdm(total=config.total_steps, initial=start_step, desc=f"{config.method} train", dynamic_ncols=True)
    try:
        for batch in _prefetch(device_batches(), 2):
            state, metrics = step_fn(state, batch)
            step += 1
            bar.update(1)
            if step % config.log_every == 0 or step == config.total_steps:
                _raise_if_diverged(state, ckpt)
                now = time.perf_counter()
                row = _log_row(metrics, schedules, step, (step - step_last) * config.batch_size, now - t_last, step - step_last)
                writer.write(step, row)
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
                t_last, step_last = now, step
            if step % config.checkpoint_every == 0 or step == config.total_steps or stop.requested:
                _raise_if_diverged(state, ckpt)
                ckpt.save(step, state, _meta(config, step))
            if stop.requested:
                log.warning("SIGTERM received: saved a checkpoint at step %d and stopping.", step)
                break
            if delay:
                time.sleep(delay)
    finally:
        bar.close()
    ckpt.wait()
    if step == config.total_steps:
        _write_figures(method, state, config, split, workdir)
    return state


def _prefetch(iterator, size: int):
    """Keeps ``size`` batches in flight on the devices (device_put is asynchronous)."""
    queue = []
    for item in iterator:
        queue.append(item)
        if len(queue) > size:
            yield queue.pop(0)
    yield from queue


def _write_figures(method: Any, state: TrainState, config: Any, split, workdir: str) -> None:
    """Methods that reconstruct images (MAE) get a PNG grid: masked input / reconstruction / original."""
    if not hasattr(method, "reconstruct"):
        return
    from ssl_ad.data.pipeline import preprocess_eval
    from ssl_ad.evaluation.plots import plot_image_grid

    images = preprocess_eval(split.images[:8], config.model.image_size, config.data.mean, config.data.std)
    params = jax.device_get(state.params)
    out = jax.device_get(method.reconstruct(params, images, jax.random.key(config.seed)))
    mean, std = np.asarray(config.data.mean), np.asarray(config.data.std)
    to_unit = lambda x: np.clip(np.asarray(x) * std + mean, 0, 1)  # noqa: E731
    rows = [to_unit(out["masked"]), to_unit(out["reconstruction"]), to_unit(out["original"]), np.asarray(out["error"])]
    path = os.path.join(workdir, "reconstructions.png")
    plot_image_grid(rows, ["masked input", "reconstruction", "original", "error (masked patches)"], path)
    log.info("Wrote %s", path)
