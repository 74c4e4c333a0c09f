"""metrics.jsonl: one JSON object per logged step, appended and flushed; the same scalars go to a
TensorBoard event file in the same folder (:mod:`ssl_ad.event_files`).

``step`` is the number of optimiser updates completed (as checkpoints count); the row of
step N holds the loss of the update from step N-1 to N and the schedule values it used.
"""

from __future__ import annotations

import json
import os
from typing import Any

from ssl_ad.atomic import atomic_write_text
from ssl_ad.event_files import EventWriter


class MetricsWriter:
    """Appends the rows of ``path``. ``enabled=False`` (every process but 0 of a multi-process run,
    which all log the same rows) writes nothing, so each step is in the file once."""

    def __init__(self, path: str, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        if enabled:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self.events = EventWriter(os.path.dirname(os.path.abspath(path)), enabled=enabled)

    def write(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {"step": int(step), **{k: v if isinstance(v, str) else float(v) for k, v in metrics.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        self.events.scalars(step, {k: v for k, v in row.items() if k != "step"})

    def close(self) -> None:
        self.events.close()

    def truncate_after(self, step: int) -> None:
        """Drops rows past ``step`` (left by a run that crashed after its last checkpoint).

        A torn last line (the process was killed while appending it) is dropped too.
        The file is replaced atomically, so a crash here loses nothing.
        """
        if not self.enabled or not os.path.exists(self.path):
            return
        keep = []
        with open(self.path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if isinstance(row, dict) and int(row.get("step", step + 1)) <= step:
                    keep.append(line.rstrip("\n") + "\n")
        atomic_write_text(self.path, "".join(keep))


def read_metrics(path: str) -> list[dict[str, Any]]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
