"""Readable logs: each distinct warning once (counted), expected orbax read-only warnings silenced,
progress bars throttled in log files."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

from ssl_ad.cli import SayOnce, _Expected
from tests.conftest import REPO


def test_say_once_counts_repeats():
    once = SayOnce()
    rec = lambda msg, level=logging.WARNING, name="ssl_ad.x": logging.LogRecord(name, level, "f", 1, msg, None, None)  # noqa: E731
    passed = [once.filter(rec(m)) for m in ("pca_dims clamped", "pca_dims clamped", "other", "pca_dims clamped")]
    assert passed == [True, False, True, False]
    assert all(once.filter(rec("info line", logging.INFO)) for _ in range(3))  # INFO is never deduplicated
    assert once.summary() == ["said 3 times in all: pca_dims clamped"]


def test_expected_orbax_read_only_warnings_are_silenced():
    f = _Expected()
    rec = lambda name, msg: logging.LogRecord(name, logging.WARNING, "f", 1, msg, None, None)  # noqa: E731
    assert not f.filter(rec("absl", "CheckpointManagerOptions.read_only=True, setting max_to_keep=None."))
    assert not f.filter(rec("absl", "Given directory is read only=/runs/x/checkpoints"))
    assert f.filter(rec("absl", "something else"))
    assert f.filter(rec("ssl_ad.evaluation", "Given directory is read only"))  # our own lines always pass


def test_progress_bar_in_a_log_file_is_throttled(tmp_path):
    code = ("import time; from ssl_ad.progress import progress\n"
            "for _ in progress(range(50), desc='x'): time.sleep(0.01)\n")
    log = tmp_path / "log.txt"
    with open(log, "w") as f:
        subprocess.run([sys.executable, "-c", code], cwd=REPO, stderr=f, check=True, timeout=120,
                       env=dict(os.environ, JAX_PLATFORMS="cpu"))
    text = log.read_text()
    assert text.count("\r") + text.count("\n") <= 3, text  # first and last redraw only, not 50
