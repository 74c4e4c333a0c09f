"""Shared by the thin entry points: logging set-up and turning user mistakes into one clear line."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from absl import logging as absl_logging

from ssl_ad.errors import DivergenceError, UserInputError


def setup_logging() -> None:
    absl_logging.set_verbosity(absl_logging.INFO)
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "jax._src", "tensorflow", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_guarded(fn: Callable[[], object]) -> None:
    """Runs ``fn``; a UserInputError or DivergenceError becomes one message on stderr and exit code 2 / 3."""
    try:
        fn()
    except UserInputError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(2)
    except DivergenceError as e:
        sys.stderr.write(f"error: {e}\n")
        sys.exit(3)
