"""Progress bars that read well in a terminal and in a log file.

In a terminal (stderr is a TTY) this is tqdm as usual. Redirected to a file (``make demo >
log``, a cluster job), tqdm's carriage-return redraws would put a bar update into the log every
0.1 s; there the bar is redrawn at most every ``LOG_INTERVAL_S`` seconds, each redraw on its own
line, so a 10-minute training writes about 20 lines instead of thousands.
"""

from __future__ import annotations

import sys
from typing import Any

from tqdm import tqdm

LOG_INTERVAL_S = 30.0


def progress(iterable: Any = None, **kwargs: Any) -> tqdm:
    """``tqdm(iterable, **kwargs)`` with ``mininterval`` = LOG_INTERVAL_S seconds when stderr is not a
    terminal (unless given), and ``dynamic_ncols`` in a terminal."""
    if sys.stderr.isatty():
        kwargs.setdefault("dynamic_ncols", True)
    else:
        kwargs.setdefault("mininterval", LOG_INTERVAL_S)
        kwargs.setdefault("ncols", 100)
    return tqdm(iterable, **kwargs)
