"""TensorBoard event files, written with TensorFlow's own summary writer (``tf.summary``), so that
``tensorboard --logdir runs`` (or ``--logdir reports``) shows ssl_ad's training curves and
evaluation tables next to everything else a researcher logs.

Training writes every scalar of metrics.jsonl (loss, lr, wd, schedules, collapse statistics,
images/s, the AD monitor's ``val_auroc/<protocol>``) into the run's workdir at its step;
evaluation writes one scalar per (protocol, scorer, feature): ``auroc/<protocol>/<scorer>/<feature>``
at the checkpoint's step (0 for baselines).
"""

from __future__ import annotations

import glob
import math
import os
from collections.abc import Mapping

import tensorflow as tf


class EventWriter:
    """Scalars into an event file in ``logdir``; ``enabled=False`` (processes other than 0) writes nothing."""

    def __init__(self, logdir: str, enabled: bool = True):
        self.logdir = logdir
        self._writer = tf.summary.create_file_writer(logdir) if enabled else None

    def scalars(self, step: int, values: Mapping[str, float]) -> None:
        """One scalar per finite number of ``values`` (strings and NaN/inf skipped) at ``step``."""
        if self._writer is None:
            return
        with self._writer.as_default():
            for tag, value in values.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    tf.summary.scalar(tag, float(value), step=int(step))
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def read_scalars(logdir: str) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value), ...]} of every event file directly in ``logdir`` (in file order)."""
    out: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))):
        for event in tf.compat.v1.train.summary_iterator(path):
            for v in event.summary.value:
                value = float(tf.make_ndarray(v.tensor)) if v.HasField("tensor") else float(v.simple_value)
                out.setdefault(v.tag, []).append((int(event.step), value))
    return out
