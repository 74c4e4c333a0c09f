"""Writing evaluation results: results.json, results.csv and a Markdown report.

A result row is a dict with at least the keys in :data:`REQUIRED_KEYS`:
``feature``, ``scorer``, ``protocol``, ``mean_auroc``, ``std_auroc``,
``mean_aupr``, ``per_round`` (round name -> AUROC), ``fit_seconds``,
``score_seconds`` and ``warnings`` (list of str). Optional ``failed_rounds``
and ``skipped_rounds`` (round -> reason) say which rounds a mean leaves out.
A mean over no rounds is NaN: ``null`` in results.json (which stays strict
JSON), empty in results.csv and "failed" in report.md. Every file is written
atomically so an interrupted run never leaves a truncated result behind.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

import ssl_ad
from ssl_ad.event_files import EventWriter
from ssl_ad.atomic import atomic_write_text

__all__ = [
    "REQUIRED_KEYS",
    "SCHEMA_VERSION",
    "atomic_write_text",
    "write_results_json",
    "write_results_csv",
    "write_event_file",
    "markdown_table",
    "write_report_md",
]

SCHEMA_VERSION = 1

REQUIRED_KEYS: tuple[str, ...] = (
    "feature",
    "scorer",
    "protocol",
    "mean_auroc",
    "std_auroc",
    "mean_aupr",
    "per_round",
    "fit_seconds",
    "score_seconds",
    "warnings",
)

Row = Mapping[str, Any]


def _check_rows(rows: Sequence[Row]) -> None:
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED_KEYS if k not in row]
        if missing:
            raise ValueError(f"result row {i} is missing keys: {', '.join(missing)}.")


def _to_json(obj: Any) -> Any:
    """json.dumps fallback for numpy scalars/arrays and paths."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"Object of type {type(obj).__name__} is not JSON serialisable.")


def _finite(obj: Any) -> Any:
    """``obj`` with every NaN/Inf float (numpy ones too) replaced by None, recursively."""
    if isinstance(obj, (float, np.floating)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, Mapping):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    if isinstance(obj, np.ndarray) and obj.dtype.kind == "f":
        return _finite(obj.tolist())
    return obj


def write_results_json(path: str | Path, rows: Sequence[Row], meta: Mapping[str, Any]) -> Path:
    """Write ``{"schema_version", "meta", "results"}``; meta gains ``ssl_ad_version`` if absent.

    ``meta`` should hold the config, checkpoint paths/steps and the seed. NaN/Inf become
    ``null`` so the file is strict JSON.
    """
    _check_rows(rows)
    meta = {"ssl_ad_version": ssl_ad.__version__, **meta}
    payload = _finite({"schema_version": SCHEMA_VERSION, "meta": meta, "results": list(rows)})
    text = json.dumps(payload, indent=2, default=_to_json, allow_nan=False) + "\n"
    return atomic_write_text(path, text)


_REASON_KEYS = ("failed_rounds", "skipped_rounds")  # round -> reason maps, one "round: reason; ..." column


def _csv_cell(value: Any) -> Any:
    if isinstance(value, Mapping):
        return "; ".join(f"{k}: {v}" for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return "; ".join(str(v) for v in value)
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return value


def write_results_csv(path: str | Path, rows: Sequence[Row]) -> Path:
    """One line per row; ``per_round`` is flattened into ``auroc_<round>`` columns.

    Columns: the required scalar keys, then any extra scalar keys, then the
    union of round columns in first-seen order (empty where a row lacks one).
    ``warnings`` is joined with "; ", ``failed_rounds`` / ``skipped_rounds`` as
    "round: reason; ...", and a NaN (a mean over no rounds) is an empty cell.
    """
    _check_rows(rows)
    base = [k for k in REQUIRED_KEYS if k != "per_round"]
    extra = list(
        dict.fromkeys(
            k for row in rows for k, v in row.items()
            if k not in REQUIRED_KEYS and (not isinstance(v, Mapping) or k in _REASON_KEYS)
        )
    )
    rounds = list(dict.fromkeys(f"auroc_{r}" for row in rows for r in row["per_round"]))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=base + extra + rounds, restval="", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        line = {k: _csv_cell(row[k]) for k in base + extra if k in row}
        line.update({f"auroc_{r}": _csv_cell(v) for r, v in row["per_round"].items()})
        writer.writerow(line)
    return atomic_write_text(path, buf.getvalue())


def _cell(row: Row) -> str:
    """"mean ± std", with "(n of m rounds failed)" when some failed, or "failed" when all did."""
    mean, std = row["mean_auroc"], row["std_auroc"]
    n_failed = len(row.get("failed_rounds") or {})
    if mean is None or not math.isfinite(float(mean)):
        return "failed" if n_failed else "–"
    text = f"{float(mean):.3f} ± {float(std):.3f}"
    if n_failed:
        text += f" ({n_failed} of {n_failed + len(row['per_round'])} rounds failed)"
    return text


def markdown_table(rows: Sequence[Row]) -> str:
    """Mean ± std AUROC tables: one per protocol, feature sources × scorers.

    Missing combinations show "–", a row whose every round failed "failed", and
    one with some failed rounds says how many; a duplicated (protocol, feature,
    scorer) raises ValueError since it would hide one of the results.
    """
    _check_rows(rows)
    out: list[str] = []
    for protocol in dict.fromkeys(r["protocol"] for r in rows):
        sub = [r for r in rows if r["protocol"] == protocol]
        features = list(dict.fromkeys(r["feature"] for r in sub))
        scorers = list(dict.fromkeys(r["scorer"] for r in sub))
        cells: dict[tuple[str, str], str] = {}
        for r in sub:
            key = (r["feature"], r["scorer"])
            if key in cells:
                raise ValueError(f"duplicate result for protocol={protocol!r}, feature/scorer={key}.")
            cells[key] = _cell(r)
        out.append(f"### Protocol: {protocol}\n")
        out.append("| feature | " + " | ".join(scorers) + " |")
        out.append("|---|" + "---|" * len(scorers))
        for f in features:
            out.append(f"| {f} | " + " | ".join(cells.get((f, s), "–") for s in scorers) + " |")
        out.append("")
    return "\n".join(out)


def write_event_file(outdir: str | Path, rows: Sequence[Row], steps: Mapping[str, int]) -> Path:
    """TensorBoard scalars ``auroc/<protocol>/<scorer>/<feature>`` (and ``pixel_auroc/...``, ``pro/...``
    for pixel rows) into an event file in ``outdir``, each at its feature's checkpoint step
    (``steps``: feature name -> step; baselines 0). Returns ``outdir``."""
    writer = EventWriter(str(outdir))
    for r in rows:
        name = str(r["feature"])
        step = int(steps.get(name.split("/")[0], 0))
        tags = {f"auroc/{r['protocol']}/{r['scorer']}/{name}": r.get("mean_auroc")}
        if "mean_pixel_auroc" in r:
            tags[f"pixel_auroc/{r['protocol']}/{r['scorer']}/{name}"] = r["mean_pixel_auroc"]
            tags[f"pro/{r['protocol']}/{r['scorer']}/{name}"] = r.get("mean_pro")
        writer.scalars(step, {k: float(v) for k, v in tags.items() if v is not None})
    writer.close()
    return Path(outdir)


def write_report_md(
    path: str | Path,
    rows: Sequence[Row],
    meta: Mapping[str, Any],
    plot_paths: Sequence[str],
    command: str,
) -> Path:
    """Write report.md: results tables, reproduce command, warnings, metadata and plots.

    ``plot_paths`` should be relative to the report's folder so the report
    renders wherever the run directory is moved.
    """
    meta = {"ssl_ad_version": ssl_ad.__version__, **meta}
    lines = [
        "# Anomaly-detection evaluation",
        "",
        "Mean ± population std of AUROC over protocol rounds (higher is better).",
        "",
        markdown_table(rows),
        "## Reproduce",
        "",
        "```bash",
        command,
        "```",
        "",
    ]
    failures = list(meta.get("failures") or [])
    if failures:
        lines += ["## Failures", "", "Left out of the numbers above; the rest of the run completed.", ""]
        lines += [f"- {f.get('stage', '')} `{f.get('what', '')}`: {f.get('reason', '')}" for f in failures]
        lines.append("")
    skipped = {p: r for p, r in (meta.get("skipped_rounds") or {}).items() if r}
    if skipped:
        lines += ["## Skipped rounds", "", "Rounds the protocol cannot score, left out of every mean.", ""]
        lines += [f"- `{p}` / `{name}`: {why}" for p, r in skipped.items() for name, why in r.items()]
        lines.append("")
    notes = [(r["feature"], r["scorer"], r["protocol"], w) for r in rows for w in r["warnings"]]
    run_notes = list(meta.get("warnings") or [])
    if notes or run_notes:
        lines += ["## Warnings", ""]
        lines += [f"- {w}" for w in run_notes]
        lines += [f"- `{f}` / `{s}` / `{p}`: {w}" for f, s, p, w in notes]
        lines.append("")
    lines += [
        "## Metadata",
        "",
        "```json",
        json.dumps(_finite(meta), indent=2, default=_to_json),
        "```",
        "",
    ]
    if plot_paths:
        lines += ["## Plots", ""]
        lines += [f"![{Path(p).stem}]({p})\n" for p in plot_paths]
    return atomic_write_text(path, "\n".join(lines))
