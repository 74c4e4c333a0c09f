"""Shared by the thin entry points: logging set-up and turning user mistakes into one clear line."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from typing import Callable

from absl import flags
from absl import logging as absl_logging

from ssl_ad.errors import DivergenceError, UserInputError

# TensorFlow's C++ INFO lines (e.g. "oneDNN custom operations are on", once per process that imports
# it) say nothing to the user; its warnings and errors still show. Set before anything imports TF.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")


class SayOnce(logging.Filter):
    """Lets each distinct warning (logger + message) through once; repeats are counted, and
    :meth:`summary` lists every repeated one with its count (logged at exit by setup_logging)."""

    def __init__(self):
        super().__init__()
        self.counts: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        key = (record.name, record.getMessage())
        self.counts[key] = self.counts.get(key, 0) + 1
        return self.counts[key] == 1

    def summary(self) -> list[str]:
        return [f"said {n} times in all: {message}" for (_, message), n in self.counts.items() if n > 1]


# Third-party warnings that are expected and say nothing to the user (matched on the message).
EXPECTED_THIRD_PARTY = (
    # orbax's CheckpointManager opened with read_only=True (evaluation, predict, conversion checks):
    # "CheckpointManagerOptions.read_only=True, setting ..." and "Given directory is read only=...".
    "read_only=True, setting",
    "Given directory is read only",
)


class _Expected(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith("ssl_ad") or record.levelno >= logging.ERROR:
            return True
        message = record.getMessage()
        return not any(text in message for text in EXPECTED_THIRD_PARTY)


def setup_logging() -> None:
    """INFO for ssl_ad, WARNING for the libraries; each distinct warning said once (repeats counted
    and summarised at exit); expected third-party warnings of read-only use silenced."""
    absl_logging.set_verbosity(absl_logging.INFO)
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "jax._src", "tensorflow", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # On absl's stderr handler only (the one the entry points write through), once per process: other
    # handlers (a test runner's capture, a user's file handler) see every record.
    handler = absl_logging.get_absl_handler()
    if any(isinstance(f, SayOnce) for f in handler.filters):
        return
    once, expected = SayOnce(), _Expected()
    handler.addFilter(expected)
    handler.addFilter(once)

    def report() -> None:
        for line in once.summary():
            logging.getLogger("ssl_ad").info(line)

    atexit.register(report)


# Exit codes of the entry points: 0 success; 2 a user mistake (UserInputError); 3 training diverged
# (DivergenceError); 4 evaluate.py finished and wrote its results, but some part failed (a scorer on
# a round, a plot, the pixel maps): listed in results.json meta.failures and report.md.
EXIT_USER_ERROR, EXIT_DIVERGED, EXIT_PARTIAL_FAILURE = 2, 3, 4


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


def _fail(message: str, code: int = 2) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(code)


def _unknown_key_message(argv: list[str], error: BaseException) -> str | None:
    """ml_collections reports an unknown ``--config.<key>`` as a bare KeyError('key'); name the flag.

    None when no ``--config.*`` override names that key (then it is a bug, not a user's typo)."""
    cause = error if isinstance(error, KeyError) else (error.__cause__ or error.__context__)
    text = str(cause.args[0]) if isinstance(cause, KeyError) and cause.args else str(error)
    key, _, hint = text.partition("\n")
    key = key.strip("'\"")
    overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--") and "." in a.split("=", 1)[0]]
    culprit = next((o for o in overrides if key in o.lstrip("-").split(".")[1:]), None)
    if culprit is None:
        return None
    message = f"{culprit}: unknown config key {key!r} (not in the config file; see its get_config() for the keys)"
    return f"{message}. {hint.strip()}" if hint.strip() else message


def parse_flags(argv: list[str]) -> list[str]:
    """``app.run``'s flags parser: a bad flag, config file or ``--config.<key>`` override is one
    ``error: ...`` line and exit code 2 instead of a traceback."""
    try:
        rest = flags.FLAGS(argv)
        if "config" in flags.FLAGS and flags.FLAGS["config"].value is not None:
            getattr(flags.FLAGS["config"].value, "to_dict")  # a config file that failed to load raises here
        return rest
    except flags.Error as e:
        _fail(str(e))
    except (KeyError, AttributeError) as e:  # --config.<key>=... naming a key the config lacks
        message = _unknown_key_message(argv, e)
        if message is None:
            raise
        _fail(message)
    except OSError as e:  # the --config file itself cannot be loaded
        _fail(" ".join(str(e).split()))
    raise AssertionError("unreachable")
