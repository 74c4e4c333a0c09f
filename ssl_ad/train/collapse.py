"""Flags representation collapse from the teacher-distribution statistics a method logs.

A method that logs ``teacher_entropy`` (mean per-sample entropy of the teacher's
K-way output), ``teacher_mean_entropy`` (entropy of the batch-mean distribution)
and ``kl_mean_teacher`` (= log K - teacher_mean_entropy) gets this check; DINO
does (``ssl_ad.methods.dino.distribution_stats``). log K is recovered from the
last two, so the check knows nothing of the method. At each logged row:

* ``uniform``: per-sample entropy >= :data:`UNIFORM_FRACTION` x log K: every
  image gets (nearly) the uniform distribution (e.g. temperatures too high);
* ``one_dimension``: entropy of the mean distribution <= :data:`ONE_DIM_FRACTION`
  x log K: (nearly) every image lands on the same few dimensions.

When one holds for :data:`PATIENCE` consecutive logged rows, the run is flagged:
a warning is logged once, and rows carry ``collapse: 1`` (plus ``collapse_kind``)
for as long as it keeps holding; the end-of-run summary records it.
A healthy tiny DINO run (configs/dino_mnist5k.py shrunk as in tests/test_dino.py, 40 steps)
stays well inside both bounds (measured: per-sample entropy 0.33-0.40 log K, mean entropy
0.60-0.74 log K); at temperatures 1.0 the per-sample entropy sits at > 0.99 log K.
"""

from __future__ import annotations

import logging
import math
from typing import Any

log = logging.getLogger(__name__)

UNIFORM_FRACTION = 0.95
ONE_DIM_FRACTION = 0.05
PATIENCE = 3
STAT_KEYS = ("teacher_entropy", "teacher_mean_entropy", "kl_mean_teacher")

_EXPLAIN = {
    "uniform": "the teacher's per-sample entropy has stayed >= {f:.0%} of log K = {logk:.3f}: its outputs are "
               "nearly uniform for every image (check the temperatures and the centring momentum)",
    "one_dimension": "the entropy of the teacher's mean distribution has stayed <= {f:.0%} of log K = {logk:.3f}: "
                     "nearly every image maps to the same dimensions (check the centring and the teacher temperature)",
}


class CollapseMonitor:
    """Feed it every logged row in order (also the rows kept from before a resume)."""

    def __init__(self, patience: int = PATIENCE):
        self.patience = patience
        self.streak_kind: str | None = None
        self.streak = 0
        self.first_step: int | None = None  # first step at which the run was flagged
        self.first_kind: str | None = None
        self.last_row_flagged = False
        self.applies = False  # the rows carry the statistics

    @staticmethod
    def kind_of(row: dict[str, Any]) -> tuple[str | None, float]:
        """(the collapse condition this row meets or None, log K)."""
        per_sample, mean_ent, kl = (float(row[k]) for k in STAT_KEYS)
        log_k = kl + mean_ent
        if not all(math.isfinite(v) for v in (per_sample, mean_ent, log_k)) or log_k <= 0:
            return None, log_k
        if per_sample >= UNIFORM_FRACTION * log_k:
            return "uniform", log_k
        if mean_ent <= ONE_DIM_FRACTION * log_k:
            return "one_dimension", log_k
        return None, log_k

    def update(self, step: int, row: dict[str, Any], announce: bool = True) -> dict[str, Any]:
        """The fields to add to ``row`` (``collapse`` 0/1, ``collapse_kind``); {} for rows without
        the statistics. Logs a warning the first time the run is flagged (if ``announce``)."""
        if not all(k in row for k in STAT_KEYS):
            return {}
        self.applies = True
        kind, log_k = self.kind_of(row)
        if kind is not None and kind == self.streak_kind:
            self.streak += 1
        else:
            self.streak_kind, self.streak = kind, (1 if kind else 0)
        flagged = kind is not None and self.streak >= self.patience
        self.last_row_flagged = flagged
        if not flagged:
            return {"collapse": 0}
        if self.first_step is None:
            self.first_step, self.first_kind = int(step), kind
            if announce:
                fraction = UNIFORM_FRACTION if kind == "uniform" else ONE_DIM_FRACTION
                log.warning("Collapse (%s) at step %d: %s for %d log intervals.", kind, step,
                            _EXPLAIN[kind].format(f=fraction, logk=log_k), self.streak)
        return {"collapse": 1, "collapse_kind": kind}

    def summary(self) -> dict[str, Any]:
        if not self.applies:
            return {}
        return {
            "collapse": int(self.first_step is not None),
            "collapse_kind": self.first_kind,
            "collapse_first_step": self.first_step,
            "collapse_at_end": int(self.last_row_flagged),
            "collapse_rule": (f"per-sample teacher entropy >= {UNIFORM_FRACTION} log K ('uniform') or entropy of the "
                              f"mean teacher distribution <= {ONE_DIM_FRACTION} log K ('one_dimension') for "
                              f"{self.patience} consecutive logged rows"),
        }
