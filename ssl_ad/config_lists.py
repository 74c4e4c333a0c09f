"""List-valued config keys (``checkpoint``, ``sources``, ``pooling``, ``protocols``, ``scorers``,
``pixel_maps``, ...) are tuples of strings.

ml_collections parses a tuple field from the command line, either repeated
(``--config.scorers=knn --config.scorers=gmm``) or as a Python literal
(``--config.scorers="('knn', 'gmm')"``). The former comma-separated string
(``--config.scorers=knn,gmm``, or ``c.scorers = "knn,gmm"`` in a config file) still
works for this release: it is split at commas, with one deprecation line per key.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from ssl_ad.errors import UserInputError

log = logging.getLogger(__name__)

LIST_KEYS = ("checkpoint", "sources", "pooling", "protocols", "scorers", "pixel_maps")
_warned: set[str] = set()


def _deprecated(key: str, value: Any) -> None:
    if key in _warned:
        return
    _warned.add(key)
    parts = [p.strip() for p in str(value).split(",") if p.strip()]
    log.warning(
        "config.%s=%r: a comma-separated string is deprecated and stops working in the next release; "
        "give a tuple: %s, or in a config file c.%s = %r.",
        key, value, " ".join(f"--config.{key}={p}" for p in parts), key, tuple(parts),
    )


def as_names(value: Any, key: str) -> tuple[str, ...]:
    """The entries of list-valued config key ``key``: stripped, empties dropped, order kept.

    ``value`` is a tuple/list of strings (the current form), a string (one entry, or the
    deprecated comma-separated form), or None/'' (no entries). An entry containing commas is
    split too (``--config.checkpoint=a,b`` reaches the config as the 1-tuple ``('a,b',)``).

    Raises:
      UserInputError: when an entry is not a string.
    """
    if value is None:
        return ()
    items: Iterable[Any] = (value,) if isinstance(value, str) else value
    out: list[str] = []
    for item in items:
        if not isinstance(item, str):
            raise UserInputError(f"config.{key} entries must be strings; got {item!r} in {value!r}")
        if "," in item:
            _deprecated(key, item)
        out.extend(p.strip() for p in item.split(",") if p.strip())
    return tuple(out)
