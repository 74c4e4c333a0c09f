"""Shared by the thin entry points: logging set-up and turning user mistakes into one clear line."""

from __future__ import annotations

import logging
import sys
from typing import Callable

from absl import flags
from absl import logging as absl_logging

from ssl_ad.errors import DivergenceError, UserInputError


def setup_logging() -> None:
    absl_logging.set_verbosity(absl_logging.INFO)
    logging.getLogger().setLevel(logging.INFO)
    for noisy in ("absl", "orbax", "jax._src", "tensorflow", "tensorflow_datasets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


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
