"""Ablation results: ablation.csv, ablation.md (mean ± std over seeds) and plots against each swept key.

Per run, the rows of its ``results.json`` are kept for the trained checkpoint
(the feature named after the run's workdir, ``seed<k>``, shown as
``checkpoint``; ``checkpoint/<pooling>`` when several poolings are compared),
plus the baseline sources when the ablation asks for them. The value per
seed is the row's ``mean_auroc`` (the mean over the protocol's rounds); the
table gives the mean ± population std of that value over seeds.

Training cost comes from each run's ``metrics.jsonl``: ``steps`` (last logged
step), ``train_seconds`` (sum of ``seconds_per_step`` over the logged
intervals, compile included) and ``images_per_s`` (mean over the logged
intervals, leaving out the first one, which holds the compile, when there
are several).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import tempfile
from collections.abc import Sequence
from typing import Any

import numpy as np

from ssl_ad.ablation.grid import DIVERGED, Plan, Run, format_seconds, format_value, slug_text, short_names
from ssl_ad.atomic import atomic_write_text
from ssl_ad.figures import new_figure

CSV_COLUMNS = (
    "setting", "seed", "status", "feature", "scorer", "protocol", "auroc", "auroc_std_over_rounds", "aupr",
    "steps", "train_seconds", "images_per_s", "eval_seconds", "workdir", "evaldir",
)


def training_cost(workdir: str) -> dict[str, float]:
    """steps, train_seconds and images_per_s of a run from its metrics.jsonl (NaN when absent)."""
    path = os.path.join(workdir, "metrics.jsonl")
    nan = {"steps": math.nan, "train_seconds": math.nan, "images_per_s": math.nan}
    if not os.path.exists(path):
        return nan
    with open(path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    if not rows:
        return nan
    seconds, prev = 0.0, 0
    for r in rows:
        seconds += float(r.get("seconds_per_step", math.nan)) * (int(r["step"]) - prev)
        prev = int(r["step"])
    rates = [float(r["images_per_s"]) for r in rows if "images_per_s" in r]
    steady = rates[1:] if len(rates) > 1 else rates
    return {"steps": int(rows[-1]["step"]), "train_seconds": seconds,
            "images_per_s": float(np.mean(steady)) if steady else math.nan}


def _run_status(run: Run) -> str:
    if os.path.exists(os.path.join(run.workdir, DIVERGED)):
        return "diverged"
    return "done" if os.path.exists(os.path.join(run.evaldir, "results.json")) else "pending"


def axis_columns(plan: Plan) -> list[str]:
    """The swept keys (dotted, 'eval.' kept): the grid's axes, or every key the explicit settings set."""
    return list(dict.fromkeys(k for s in plan.settings for k in s.overrides))


def collect(plan: Plan) -> list[dict[str, Any]]:
    """One record per run × protocol × feature × scorer (one status-only record for runs without results)."""
    axes = axis_columns(plan)
    records = []
    for run in plan.runs:
        base = {"setting": run.setting.label, "setting_index": run.setting.index, "seed": run.seed}
        base.update({k: format_value(run.setting.overrides[k]) if k in run.setting.overrides else "" for k in axes})
        base.update(training_cost(run.workdir))
        base.update({"workdir": run.workdir, "evaldir": run.evaldir, "status": _run_status(run)})
        path = os.path.join(run.evaldir, "results.json")
        if base["status"] != "done":
            records.append({**base, "feature": "", "scorer": "", "protocol": "", "auroc": math.nan,
                            "auroc_std_over_rounds": math.nan, "aupr": math.nan, "eval_seconds": math.nan})
            continue
        with open(path) as f:
            data = json.load(f)
        own = os.path.basename(os.path.normpath(run.workdir))
        eval_seconds = float(data.get("meta", {}).get("total_seconds", math.nan))
        for row in data["results"]:
            feature = str(row["feature"])
            if feature == own or feature.startswith(own + "/"):
                feature = "checkpoint" + feature[len(own):]
            elif not plan.baselines:
                continue
            records.append({**base, "feature": feature, "scorer": row["scorer"], "protocol": row["protocol"],
                            "auroc": _num(row["mean_auroc"]), "auroc_std_over_rounds": _num(row["std_auroc"]),
                            "aupr": _num(row.get("mean_aupr")), "eval_seconds": eval_seconds})
    return records


def _num(value: Any) -> float:
    """A results.json number; null (a mean over no rounds: every round failed) or absent is NaN."""
    return math.nan if value is None else float(value)


def summarise(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean and population std of the AUROC over seeds per (protocol, setting, feature, scorer)."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        if r["status"] == "done":
            groups.setdefault((r["protocol"], r["setting_index"], r["feature"], r["scorer"]), []).append(r)
    out = []
    for (protocol, index, feature, scorer), rs in groups.items():
        values = np.array([r["auroc"] for r in rs], dtype=np.float64)
        out.append({
            "protocol": protocol, "setting_index": index, "setting": rs[0]["setting"], "feature": feature,
            "scorer": scorer, "mean": float(values.mean()), "std": float(values.std()), "n": len(rs),
            "seeds": [r["seed"] for r in rs],
        })
    return out


def cost_by_setting(records: Sequence[dict[str, Any]]) -> dict[int, dict[str, float]]:
    """Mean training cost over the seeds of each setting (one value per run, not per result row)."""
    per_run: dict[tuple[int, int], dict] = {}
    for r in records:
        per_run.setdefault((r["setting_index"], r["seed"]), r)
    out: dict[int, dict[str, float]] = {}
    for index in sorted({i for i, _ in per_run}):
        runs = [r for (i, _), r in per_run.items() if i == index]
        cost = {}
        for key in ("steps", "train_seconds", "images_per_s"):
            vals = [r[key] for r in runs if not math.isnan(r[key])]
            cost[key] = float(np.mean(vals)) if vals else math.nan
        cost["diverged"] = sum(r["status"] == "diverged" for r in runs)
        cost["pending"] = sum(r["status"] == "pending" for r in runs)
        out[index] = cost
    return out


def _csv_value(v: Any) -> Any:
    if isinstance(v, float):
        return "" if math.isnan(v) else round(v, 6)
    return v


def csv_text(plan: Plan, records: Sequence[dict[str, Any]]) -> str:
    cols = ["setting"] + axis_columns(plan) + [c for c in CSV_COLUMNS if c != "setting"]
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=cols, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in records:
        writer.writerow({k: _csv_value(r.get(k, "")) for k in cols})
    return buf.getvalue()


def _fmt_seconds(s: float) -> str:
    return "–" if math.isnan(s) else format_seconds(s)


def _fmt_num(x: float, digits: int = 0) -> str:
    return "–" if math.isnan(x) else f"{x:.{digits}f}"


def markdown_text(plan: Plan, records: Sequence[dict[str, Any]], plot_paths: Sequence[str], command: str = "") -> str:
    """ablation.md: per protocol, a setting × scorer table of mean ± std AUROC over seeds, plus training cost."""
    summary = summarise(records)
    cost = cost_by_setting(records)
    seeds = len(plan.seeds)
    lines = [
        f"# Ablation: {plan.name}",
        "",
        f"Base training config `{plan.train_config_path}`, evaluation config `{plan.eval_config_path}`; "
        f"seeds {', '.join(map(str, plan.seeds))}.",
        "",
        f"Cells: mean ± population std over seeds (n={seeds} unless marked) of each run's AUROC, itself the mean "
        "over the protocol's rounds; the best mean per column is bold. Training cost is the mean over seeds: "
        "steps, training wall time (compile included) and images/s (steady state).",
        "",
    ]
    protocols = list(dict.fromkeys(s["protocol"] for s in summary))
    if not protocols:
        lines += ["No finished runs yet.", ""]
    for protocol in protocols:
        sub = [s for s in summary if s["protocol"] == protocol]
        scorers = list(dict.fromkeys(s["scorer"] for s in sub))
        features = list(dict.fromkeys(s["feature"] for s in sub))
        show_feature = len(features) > 1
        cells = {(s["setting_index"], s["feature"], s["scorer"]): s for s in sub}
        best = {}
        for (_, f, sc), s in cells.items():
            best[(f, sc)] = max(best.get((f, sc), -math.inf), s["mean"])
        head = ["setting"] + (["feature"] if show_feature else []) + scorers + ["steps", "train time", "images/s"]
        lines += [f"## Protocol: {protocol}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for setting in plan.settings:
            c = cost.get(setting.index, {})
            for feature in features:
                row = [setting.label] + ([feature] if show_feature else [])
                for sc in scorers:
                    s = cells.get((setting.index, feature, sc))
                    if s is None:
                        row.append("diverged" if c.get("diverged") else "–")
                        continue
                    text = f"{s['mean']:.3f} ± {s['std']:.3f}"
                    if math.isclose(s["mean"], best[(feature, sc)]) and len(plan.settings) > 1:
                        text = f"**{text}**"
                    if s["n"] != seeds:
                        text += f" (n={s['n']})"
                    row.append(text)
                row += [_fmt_num(c.get("steps", math.nan)), _fmt_seconds(c.get("train_seconds", math.nan)),
                        _fmt_num(c.get("images_per_s", math.nan))]
                lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    diverged = [r for r in {(r["setting"], r["seed"]): r for r in records}.values() if r["status"] == "diverged"]
    pending = [r for r in {(r["setting"], r["seed"]): r for r in records}.values() if r["status"] == "pending"]
    if diverged:
        lines += ["Diverged runs: " + ", ".join(f"{r['setting']} seed={r['seed']}" for r in diverged), ""]
    if pending:
        lines += ["Not finished yet: " + ", ".join(f"{r['setting']} seed={r['seed']}" for r in pending), ""]
    lines += ["Per-seed values: `ablation.csv`. Runs: `runs/<setting>/seed<k>` (training) and its `eval*/` folders.", ""]
    if command:
        lines += ["## Reproduce", "", "```bash", command, "```", ""]
    if plot_paths:
        lines += ["## Plots", ""] + [f"![{os.path.splitext(os.path.basename(p))[0]}]({p})\n" for p in plot_paths]
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Plots


def _hashable(v: Any) -> Any:
    """A grid value usable as a dict key: dicts and lists (groups of overrides) by their text."""
    return format_value(v) if isinstance(v, (dict, list)) else v


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


def _save_png(fig, path: str) -> str:
    """Atomic PNG write (temp file in the same folder, then rename)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    os.close(fd)
    try:
        fig.savefig(tmp, format="png", bbox_inches="tight")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def _plot_series(path: str, title: str, xlabel: str, xs: list, series: dict[str, dict[Any, tuple[float, float]]]) -> str:
    """One line per series over the x values (numeric x: positions; otherwise categorical), std error bars."""
    numeric = all(_is_number(x) for x in xs)
    order = sorted(xs) if numeric else list(xs)
    pos = {x: (float(x) if numeric else i) for i, x in enumerate(order)}
    fig = new_figure(max(5.5, 1.1 * len(order) + 3), 4.2)
    ax = fig.add_subplot()
    span = (max(pos.values()) - min(pos.values())) or 1.0
    for j, (name, points) in enumerate(series.items()):
        dodge = (j - (len(series) - 1) / 2) * 0.012 * span  # keeps error bars of equal x apart
        px = [x for x in order if x in points]
        ax.errorbar([pos[x] + dodge for x in px], [points[x][0] for x in px], yerr=[points[x][1] for x in px],
                    marker="o", capsize=4, label=name)
    if not numeric:
        ax.set_xticks(list(range(len(order))), [format_value(x) for x in order], rotation=15, ha="right")
    elif all(float(x).is_integer() for x in order):
        ax.set_xticks([pos[x] for x in order], [format_value(x) for x in order])
    ax.set(xlabel=xlabel, ylabel="AUROC (mean ± std over seeds)", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    return _save_png(fig, path)


def write_plots(plan: Plan, records: Sequence[dict[str, Any]], plot_dir: str) -> list[str]:
    """``<protocol>_<key>.png`` per protocol and swept grid key (``<protocol>_setting.png`` in list mode)."""
    summary = summarise(records)
    settings = {s.index: s for s in plan.settings}
    features = list(dict.fromkeys(s["feature"] for s in summary))
    paths = []
    for protocol in dict.fromkeys(s["protocol"] for s in summary):
        sub = [s for s in summary if s["protocol"] == protocol]
        if plan.axis_keys:
            names = short_names(plan.axis_keys)
            for key in plan.axis_keys:
                xs = list(dict.fromkeys(_hashable(dict(settings[s["setting_index"]].axes)[key]) for s in sub))
                if len(xs) < 2:
                    continue
                series: dict[str, dict] = {}
                for s in sub:
                    axes = dict(settings[s["setting_index"]].axes)
                    others = ", ".join(f"{names[k]}={format_value(v)}" for k, v in axes.items() if k != key)
                    name = " · ".join(p for p in ((s["feature"] if len(features) > 1 else ""), s["scorer"], others) if p)
                    series.setdefault(name, {})[_hashable(axes[key])] = (s["mean"], s["std"])
                path = os.path.join(plot_dir, f"{protocol}_{slug_text(names[key])}.png")
                paths.append(_plot_series(path, f"{plan.name} · {protocol}", key, xs, series))
        elif len(plan.settings) > 1:
            labels = [s.label for s in plan.settings]
            series = {}
            for s in sub:
                name = " · ".join(p for p in ((s["feature"] if len(features) > 1 else ""), s["scorer"]) if p)
                series.setdefault(name, {})[s["setting"]] = (s["mean"], s["std"])
            paths.append(_plot_series(os.path.join(plot_dir, f"{protocol}_setting.png"),
                                      f"{plan.name} · {protocol}", "setting", labels, series))
    return paths


def write_outputs(plan: Plan, command: str = "") -> dict[str, str]:
    """Collects every run's results and writes ablation.csv, plots/ and ablation.md (atomically)."""
    records = collect(plan)
    csv_path = os.path.join(plan.outdir, "ablation.csv")
    atomic_write_text(csv_path, csv_text(plan, records))
    plot_dir = os.path.join(plan.outdir, "plots")
    plots = write_plots(plan, records, plot_dir)
    rel = [os.path.relpath(p, plan.outdir) for p in plots]
    md_path = os.path.join(plan.outdir, "ablation.md")
    atomic_write_text(md_path, markdown_text(plan, records, rel, command))
    return {"csv": csv_path, "markdown": md_path, "plots": plot_dir if plots else ""}
