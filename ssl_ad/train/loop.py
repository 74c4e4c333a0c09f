"""The training loop: data -> jitted step -> metrics and orbax checkpoints, resumable at any step.

``train_and_evaluate(config, workdir)`` is the whole job. Running it again on
the same workdir resumes from the latest complete checkpoint and replays the
exact data stream from there; when training is complete it does nothing.

Before anything is loaded or written the config's values are checked
(:mod:`ssl_ad.config_check`); on resume the config is compared with the saved
one (:mod:`ssl_ad.train.config_history`). "Step N" everywhere (metrics.jsonl,
checkpoints, log and error messages) is the number of optimiser updates
completed; the update from step N-1 to N is "step N". Every run ends with
``workdir/summary.json`` (status, step, final metrics, collapse flag, time).

With several processes (``jax.distributed``, see :mod:`ssl_ad.sharding`) every
process runs this loop on its slice of each global batch and takes part in every
step, checkpoint and AD-monitor pass; process 0 alone writes config.json,
config_history.jsonl, metrics.jsonl, summary.json and the figures. A SIGTERM to
any of them stops all of them after the same step (JAX's preemption sync point).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils

import ssl_ad
from ssl_ad import figures, sharding
from ssl_ad.atomic import atomic_write_text
from ssl_ad.checkpointing import Checkpointer
from ssl_ad.config_check import validate_train_config
from ssl_ad.data.device_augment import jitted_augmenter
from ssl_ad.data.pipeline import train_batches
from ssl_ad.data.sources import load_split
from ssl_ad.errors import DivergenceError, UserInputError
from ssl_ad.evaluation.monitor import METRIC_PREFIX, ADMonitor
from ssl_ad.progress import progress
from ssl_ad.methods import Method, ReconstructingMethod, build_method
from ssl_ad.train import config_history
from ssl_ad.train.collapse import CollapseMonitor
from ssl_ad.train.metrics_log import MetricsWriter, read_metrics
from ssl_ad.train.optim import make_optimizer
from ssl_ad.train.state import TrainState, create_train_state
from ssl_ad.train.step import jit_train_step

log = logging.getLogger(__name__)

SUMMARY_FILE = "summary.json"


class _StopRequest:
    """Turns SIGTERM (preemption) into a stop after a step; :meth:`at` is asked once after every step.

    One process: a Python SIGTERM handler sets a flag. Several processes: ``jax.distributed``'s
    preemption service owns SIGTERM (a Python handler would replace it) and tells every process
    the same step to stop at (:func:`jax.experimental.multihost_utils.reached_preemption_sync_point`:
    the largest step any process had reached when the notice spread, plus one), so all save the
    same checkpoint. Without that service (``jax_enable_preemption_service=False``) a SIGTERM
    ends the processes (warned at the start).
    """

    def __init__(self):
        self.requested = False
        self._previous = None
        self._several = False
        self._synced = False

    def __enter__(self):
        self._several = jax.process_count() > 1
        if self._several:
            self._synced = bool(jax.config.jax_enable_preemption_service)
            if not self._synced:
                log.warning("jax_enable_preemption_service is off: a SIGTERM ends this process without a checkpoint.")
            return self
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, no preemption support
            self._previous = None
        return self

    def _handle(self, signum, frame):
        del signum, frame
        self.requested = True

    def at(self, step: int) -> bool:
        """Whether to save and stop after ``step`` (completed updates); call it after every step."""
        if self._several and self._synced:
            self.requested = multihost_utils.reached_preemption_sync_point(step)
        return self.requested

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
    bad = int(jax.device_get(state.bad_step))  # completed-step count of the first bad update
    if bad >= 0:
        last_good = ckpt.latest_step()
        loss, gnorm = float(jax.device_get(state.bad_loss)), float(jax.device_get(state.bad_grad_norm))
        what = "loss" if not np.isfinite(loss) else "gradient norm"
        kept = f"the last good one (step {last_good}) is kept" if last_good is not None else "there is no earlier one"
        raise DivergenceError(
            f"training diverged: non-finite {what} in step {bad} (the update from step {bad - 1} to {bad}; "
            f"loss={loss}, grad_norm={gnorm}); no checkpoint of the diverged state was written, {kept}"
        )


def _meta(config: Any, step: int) -> dict[str, Any]:
    return {"step": int(step), "config": config.to_dict(), "version": ssl_ad.__version__}


def _log_row(metrics: dict, schedules: dict, step: int, images: int, seconds: float, steps: int) -> dict:
    """The row of ``step``: the metrics of the update from ``step - 1`` to ``step`` and the schedule
    values that update used (schedules are functions of the completed-step count before it)."""
    row = {k: float(np.asarray(v)) for k, v in metrics.items()}
    row.update({k: float(f(step - 1)) for k, f in schedules.items()})
    row["images_per_s"] = images / max(seconds, 1e-9)
    row["seconds_per_step"] = seconds / max(steps, 1)
    return row


def _saved_config(workdir: str, ckpt: Checkpointer, step: int) -> dict | None:
    """The config the checkpoint at ``step`` was saved with (its meta; else config.json)."""
    try:
        saved = ckpt.meta(step).get("config")
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("Cannot read the meta of checkpoint %s/%d: %s", ckpt.directory, step, e)
        saved = None
    path = os.path.join(workdir, "config.json")
    if saved is None and os.path.exists(path):
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, ValueError) as e:
            raise UserInputError(f"cannot read {path}: {e}") from e
    return saved


def train_and_evaluate(
    config: Any, workdir: str, allow_config_change: str | Sequence[str] = ()
) -> TrainState:
    """Trains ``config`` in ``workdir`` (resuming if it holds checkpoints); returns the final state.

    ``allow_config_change``: keys (or 'all') that may differ from the saved config on resume
    beyond the bookkeeping ones (see :mod:`ssl_ad.train.config_history`); recorded in
    ``workdir/config_history.jsonl``.
    """
    validate_train_config(config)  # before anything is loaded or written
    sharding.maybe_initialize_distributed()
    check_workdir(workdir)
    mesh = sharding.data_mesh()
    if config.batch_size % jax.device_count():
        raise UserInputError(f"batch_size {config.batch_size} is not divisible by {jax.device_count()} devices")

    split = load_split(config.data, config.data.train_split)
    monitor = ADMonitor.from_config(config)
    method = build_method(config)
    tx, schedules = make_optimizer(config.optim, config.total_steps, config.batch_size, method=config.method)
    schedules = {**schedules, **method.schedules()}

    with _StopRequest() as stop:  # SIGTERM from here on: finish the step, save, stop (exit code 0)
        ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=config.keep_checkpoints)
        try:
            latest = ckpt.latest_step()
            resume = None
            if latest is not None:  # refused before config.json or anything else is written
                saved = _saved_config(workdir, ckpt, latest)
                resume = config_history.check_resume(saved, config, latest, allow_config_change, workdir)
            return _train(config, workdir, split, method, tx, schedules, mesh, ckpt, stop, resume, monitor)
        finally:
            ckpt.close()  # waits for an in-flight (async) save, also when training stops with an error


def _train(config, workdir, split, method, tx, schedules, mesh, ckpt: Checkpointer, stop: _StopRequest,
           resume: config_history.ResumeCheck | None, monitor: ADMonitor | None) -> TrainState:
    t_start = time.perf_counter()
    latest = ckpt.latest_step()
    start_step = int(latest or 0)

    batches = train_batches(
        config, split, start_step, process_index=jax.process_index(), process_count=jax.process_count()
    )
    first = next(batches, None)
    init_batch = first if first is not None else next(train_batches(config, split, 0))
    # Jitted init builds the state directly replicated on every device (eager init runs op by op).
    init = jax.jit(lambda key, b: create_train_state(method, tx, key, b), out_shardings=sharding.replicated(mesh))
    # --- data.augment_device: the host sends uint8 images, this jitted function makes the step's crops
    augment = jitted_augmenter(config)  # None when off
    init_batch = sharding.shard_batch(init_batch, mesh)
    if augment is not None:
        init_batch = augment(init_batch, start_step)
    # --- end data.augment_device
    state = init(jax.random.key(config.seed), init_batch)
    if latest is not None:
        state = ckpt.restore(latest, state)
        log.info("Resumed from step %d in %s", latest, ckpt.directory)
    if start_step >= config.total_steps:
        log.info("Training already complete (step %d of %d); nothing to do.", start_step, config.total_steps)
        return state

    main = sharding.is_main_process()  # the one process that writes the run's files
    if resume is not None:
        resume.log()
    if main:
        _write_start_records(workdir, config, resume, latest)
    writer = MetricsWriter(os.path.join(workdir, "metrics.jsonl"), enabled=main)
    writer.truncate_after(start_step)
    collapse = CollapseMonitor()
    last_row: dict = {}
    if main and os.path.exists(writer.path):  # the kept rows of the earlier runs: the collapse streak continues
        for kept in read_metrics(writer.path):
            collapse.update(int(kept["step"]), kept, announce=False)
            last_row = kept
    step_fn = jit_train_step(method, tx, config.seed)

    def device_batches():
        batch = first
        it = batches
        while batch is not None:
            yield sharding.shard_batch(batch, mesh)
            batch = next(it, None)

    step = start_step
    t_last, step_last = time.perf_counter(), step
    bar = progress(total=config.total_steps, initial=start_step, desc=f"{config.method} train", disable=not main)
    status = "stopped"

    def summarise(error: str | None = None) -> None:
        if main:
            _write_summary(workdir, config, status, step, last_row, collapse, time.perf_counter() - t_start, error)

    try:
        for batch in _prefetch(device_batches(), 2):
            if augment is not None:  # data.augment_device: crops from per-sample keys of this step's rng
                batch = augment(batch, step)
            state, metrics = step_fn(state, batch)
            step += 1
            bar.update(1)
            monitor_due = monitor is not None and monitor.due(step, config.total_steps)
            if step % config.log_every == 0 or step == config.total_steps or monitor_due:
                _raise_if_diverged(state, ckpt)
                now = time.perf_counter()
                row = _log_row(metrics, schedules, step, (step - step_last) * config.batch_size, now - t_last, step - step_last)
                row.update(collapse.update(step, row))
                if monitor_due:
                    row.update(_monitor_row(monitor, method, state, step))
                    now = time.perf_counter()  # the monitor's time is not training time
                writer.write(step, row)
                last_row = {"step": step, **row}
                bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.0f}")
                t_last, step_last = now, step
            stopping = stop.at(step)  # the same answer in every process
            if step % config.checkpoint_every == 0 or step == config.total_steps or stopping:
                _raise_if_diverged(state, ckpt)
                ckpt.save(step, state, _meta(config, step))
            if stopping:
                log.warning("SIGTERM received: saved a checkpoint at step %d and stopping%s.", step,
                            f" (all {jax.process_count()} processes)" if jax.process_count() > 1 else "")
                break
    except DivergenceError as e:
        status = "diverged"
        summarise(str(e))
        raise
    finally:
        bar.close()
        writer.close()
    ckpt.wait()
    if step == config.total_steps:
        status = "complete"
        if main:
            _write_figures(method, state, config, split, workdir)
    summarise()
    return state


def _write_start_records(workdir: str, config: Any, resume: config_history.ResumeCheck | None,
                         latest: int | None) -> None:
    """config_history.jsonl's row of this start (first start, or a resume that changed something)
    and config.json (written only after the resume check passed). Process 0 only."""
    if resume is not None:
        row = resume.record()
        if row is not None:
            config_history.append_history(workdir, row)
    elif latest is None:
        config_history.append_history(workdir, {"event": "start", "step": 0})
    atomic_write_text(os.path.join(workdir, "config.json"), json.dumps(config.to_dict(), indent=2, sort_keys=True))


def _write_summary(workdir: str, config: Any, status: str, step: int, last_row: dict, collapse: CollapseMonitor,
                   seconds: float, error: str | None) -> None:
    """workdir/summary.json: how this run ended, its last logged metrics and the collapse flag."""
    path = os.path.join(workdir, SUMMARY_FILE)
    total = seconds
    try:  # wall time adds up over the resumed runs
        with open(path) as f:
            total += float(json.load(f).get("wall_seconds_total", 0.0))
    except (OSError, ValueError, TypeError, AttributeError):
        pass
    summary = {
        "status": status,
        "step": int(step),
        "total_steps": int(config.total_steps),
        "method": config.method,
        "final_metrics": last_row,
        **collapse.summary(),
        "wall_seconds": round(seconds, 3),
        "wall_seconds_total": round(total, 3),
        "version": ssl_ad.__version__,
    }
    if error:
        summary["error"] = error
    atomic_write_text(path, json.dumps(summary, indent=2) + "\n")
    flag = ""
    if summary.get("collapse"):
        flag = f"; COLLAPSE ({summary['collapse_kind']}) flagged from step {summary['collapse_first_step']}"
    loss = last_row.get("loss")
    log.log(logging.WARNING if flag else logging.INFO, "Run %s at step %d of %d%s%s (%s).", status, step,
            config.total_steps, f", last logged loss {loss:.4f}" if isinstance(loss, float) else "", flag, path)


def _monitor_row(monitor: ADMonitor, method: Method, state: TrainState, step: int) -> dict[str, float]:
    """The monitor's metrics at ``step``; a monitor that fails is logged and gives NaN (training goes on)."""
    try:
        out = monitor(method, state.params, state.extra)
    except Exception as e:  # noqa: BLE001 - the monitor must never stop training
        log.warning("AD monitor failed at step %d: %s: %s", step, type(e).__name__, e)
        return {f"{METRIC_PREFIX}{p}": float("nan") for p in monitor.protocols}
    log.info("step %d: %s", step, ", ".join(f"{k} {v:.4f}" for k, v in out.items() if k.startswith(METRIC_PREFIX)))
    return out


def _prefetch(iterator, size: int):
    """Keeps ``size`` batches in flight on the devices (device_put is asynchronous)."""
    queue = []
    for item in iterator:
        queue.append(item)
        if len(queue) > size:
            yield queue.pop(0)
    yield from queue


def _write_figures(method: Method, state: TrainState, config: Any, split, workdir: str) -> None:
    """Methods that reconstruct images (MAE) get a PNG grid: masked input / reconstruction / original."""
    if not isinstance(method, ReconstructingMethod):
        return
    path = os.path.join(workdir, "reconstructions.png")
    figures.reconstruction_grid(method, jax.device_get(state.params), split.images[:8], config.model.image_size,
                                config.data, config.seed, path)
    log.info("Wrote %s", path)
