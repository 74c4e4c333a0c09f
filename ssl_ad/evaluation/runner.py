"""The evaluation job: features for every source, every scorer on every protocol round, reports.

Everything is inductive: a scorer is fit on the TRAIN split's normal images of
a round and scores the held-out TEST split. Feature sources are raw pixels,
a randomly initialised ViT ("before SSL") and each checkpoint given.

One optional part never loses the run: a scorer that fails on a round leaves
that round out of its row (``failed_rounds``: round -> reason; the means are
over the rounds that worked, NaN / null when none did), a plot or the pixel
stage that fails is a warning, and every failure is listed in
``meta["failures"]`` of results.json and in report.md, which are always
written (:func:`failures_in` reads them back; evaluate.py exits with 4).
Rounds a protocol cannot score are skipped with their reason
(``meta["skipped_rounds"]``, each row's ``skipped_rounds``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import numpy as np

import ssl_ad
from ssl_ad import figures, sharding
from ssl_ad.config_lists import as_names
from ssl_ad.data.sources import load_split
from ssl_ad.errors import UserInputError
from ssl_ad.evaluation import embedding, plots, report
from ssl_ad.evaluation.features import EMBEDDING, RECON, FeatureBuilder, FeatureSet, random_init_baselines
from ssl_ad.evaluation.pixel_eval import PixelEvaluator, map_sources
from ssl_ad.evaluation.pixel_maps import MAKERS
from ssl_ad.evaluation.protocols import MVTEC_VARIANTS, Round, rounds_for
from ssl_ad.evaluation.scorers import RESIDUAL_MODES, SCORERS
from ssl_ad.evaluation.scoring import score_feature_set

log = logging.getLogger(__name__)


def _reason(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def _plot(failures: list[dict], what: str, fn, *args, **kwargs):
    """Draws one plot; a failure is recorded in ``failures`` (and logged) instead of ending the run."""
    try:
        return fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - a plot must never lose the results
        log.warning("plot %s failed: %s", what, _reason(e))
        failures.append({"stage": "plot", "what": what, "reason": _reason(e)})
        return None


def failures_in(outdir: str) -> list[dict]:
    """The failures a finished run recorded in ``outdir/results.json`` (empty when all worked)."""
    with open(os.path.join(outdir, "results.json")) as f:
        return list(json.load(f)["meta"].get("failures", []))


def _pixel_stage(config, train, test, checkpoints, protocol_rounds, builder, plot_dir, failures) -> tuple[list, list]:
    """Pixel-level rows (pixel_<maker>) and plots for every source and MVTec round; see pixel_eval."""
    makers = as_names(config.pixel_maps, "pixel_maps")
    if test.masks is None or test.is_anomaly is None:
        log.warning("pixel_maps=%s skipped: %s/%s has no ground-truth masks", makers, test.name, test.split)
        return [], []
    if not protocol_rounds:  # no MVTec protocol requested: the standard one
        protocol_rounds = {"mvtec": rounds_for("mvtec", train, test, config)}
    evaluator = PixelEvaluator(config, train, test, makers, cache_path=builder.cache_path)
    rows, paths = evaluator.evaluate(map_sources(config, checkpoints), protocol_rounds, plot_dir)
    for protocol in protocol_rounds:
        sub = [r for r in rows if r["protocol"] == protocol]
        for key, label in (("pixel_auroc", "pixel AUROC"), ("pro", f"PRO (FPR ≤ {evaluator.max_fpr:g})")):
            bars = {(r["feature"], r["scorer"]): (r[f"mean_{key}"], r[f"std_{key}"]) for r in sub}
            if bars:
                paths.append(_plot(failures, f"{key}_{protocol}", plots.plot_auroc_bars, bars,
                                   os.path.join(plot_dir, f"{key}_{protocol}.png"), title=f"Mean {label} · {protocol}"))
    return rows, [p for p in paths if p is not None]


def _applicable(fs: FeatureSet, scorer_name: str) -> bool:
    return (scorer_name == "mae_recon") == (fs.kind == RECON)


def run_evaluation(config: Any, outdir: str, command: str = "") -> list[dict[str, Any]]:
    """The whole evaluation; writes results.json/.csv, report.md, plots/ and features/ into ``outdir``.

    Runs on one host (all its devices embed); as one of several processes (``jax.distributed``,
    ``srun`` with several tasks) it refuses with a UserInputError before reading or writing anything.
    """
    sharding.require_one_process("evaluate.py")
    t_start = time.perf_counter()
    scorer_names = as_names(config.scorers, "scorers")
    unknown = [s for s in scorer_names if s not in SCORERS]
    if unknown:
        raise UserInputError(f"unknown scorer(s) {unknown}; choose from {sorted(SCORERS)}")
    if str(config.get("pca_residual", "auto")) not in RESIDUAL_MODES:
        raise UserInputError(f"pca_residual={config.pca_residual!r}; choose from {list(RESIDUAL_MODES)}")
    try:
        os.makedirs(os.path.join(outdir, "plots"), exist_ok=True)
    except OSError as e:
        raise UserInputError(f"cannot write outdir {outdir}: {e.strerror}") from e
    pixel_makers = as_names(config.get("pixel_maps", ()), "pixel_maps")
    if [m for m in pixel_makers if m not in MAKERS]:
        raise UserInputError(f"unknown pixel map maker(s) in {pixel_makers}; choose from {list(MAKERS)}")
    checkpoints = [embedding.load_checkpoint(w, int(config.step)) for w in as_names(config.checkpoint, "checkpoint")]
    train = load_split(config.data, config.data.train_split)
    test = load_split(config.data, config.data.test_split)
    # Every protocol's rounds before any feature is computed: an unusable protocol fails early.
    protocol_rounds: dict[str, list[Round]] = {}
    skipped_rounds: dict[str, dict[str, str]] = {}
    for protocol in as_names(config.protocols, "protocols"):
        skipped_rounds[protocol] = {}
        protocol_rounds[protocol] = rounds_for(protocol, train, test, config, skipped_rounds[protocol])
    builder = FeatureBuilder(config, train, test, os.path.join(outdir, "features"))

    feature_sets: list[FeatureSet] = []
    sources = as_names(config.sources, "sources")
    if "pixels" in sources:
        feature_sets.append(builder.pixels())
    if "random_init" in sources:
        for baseline in random_init_baselines(checkpoints, config):
            feature_sets.extend(builder.random_init(baseline))
    for loaded in checkpoints:
        feature_sets.extend(builder.checkpoint(loaded))
    for fs in feature_sets:
        log.info("features %-14s %-9s train %s test %s (%.1f s)", fs.name, fs.kind, fs.train.shape, fs.test.shape, fs.seconds)

    rows, plot_paths, failures, meta_warnings = [], [], [], []
    plot_dir = os.path.join(outdir, "plots")
    first_protocol = next(iter(protocol_rounds), None)
    for protocol, rounds in protocol_rounds.items():
        for fs in feature_sets:
            names = [s for s in scorer_names if _applicable(fs, s)]  # one round at a time, sharing its fits
            for scorer_name, (row, extra) in zip(names, score_feature_set(fs, names, protocol, rounds, config)):
                row["skipped_rounds"] = dict(skipped_rounds[protocol])
                rows.append(row)
                for name, why in row["failed_rounds"].items():
                    failures.append({"stage": "score", "what": f"{fs.name} / {scorer_name} / {protocol} / {name}",
                                     "reason": why})
                log.info("%-12s %-12s %-20s AUROC %.3f ± %.3f (fit %.1f s, score %.1f s)", fs.name, scorer_name,
                         protocol, row["mean_auroc"], row["std_auroc"], row["fit_seconds"], row["score_seconds"])
                safe = fs.name.replace("/", "_")
                if extra["curves"] and (scorer_name == config.roc_scorer or (fs.kind == RECON and config.roc_scorer)):
                    name = f"roc_{protocol}_{safe}_{scorer_name}"
                    plot_paths.append(_plot(failures, name, plots.plot_roc_curves, extra["curves"],
                                            f"{fs.name} · {scorer_name} · {protocol}",
                                            os.path.join(plot_dir, f"{name}.png")))
                if scorer_name == "kmeans" and protocol == first_protocol and extra["scorer"] is not None:
                    sc = extra["scorer"]
                    plot_paths.append(_plot(failures, f"elbow_{safe}", plots.plot_elbow, sc.inertias, sc.k,
                                            os.path.join(plot_dir, f"elbow_{safe}.png")))
        bars = {(r["feature"], r["scorer"]): (r["mean_auroc"], r["std_auroc"]) for r in rows if r["protocol"] == protocol}
        if bars:
            plot_paths.append(_plot(failures, f"auroc_{protocol}", plots.plot_auroc_bars, bars,
                                    os.path.join(plot_dir, f"auroc_{protocol}.png"), title=f"Mean AUROC · {protocol}"))

    if pixel_makers:
        mvtec_protocol_rounds = {p: r for p, r in protocol_rounds.items() if p in MVTEC_VARIANTS}
        try:
            pixel_rows, pixel_paths = _pixel_stage(config, train, test, checkpoints, mvtec_protocol_rounds, builder,
                                                   plot_dir, failures)
        except UserInputError:
            raise
        except Exception as e:  # noqa: BLE001 - the image-level results are kept
            log.warning("pixel maps failed: %s", _reason(e))
            failures.append({"stage": "pixel", "what": f"pixel_maps={','.join(pixel_makers)}", "reason": _reason(e)})
            pixel_rows, pixel_paths = [], []
        rows.extend(pixel_rows)
        for r in pixel_rows:
            for name, why in r.get("failed_rounds", {}).items():
                failures.append({"stage": "score", "what": f"{r['feature']} / {r['scorer']} / {r['protocol']} / {name}",
                                 "reason": why})
        plot_paths.extend(p for p in pixel_paths if os.path.dirname(str(p)) == plot_dir)  # overlays stay in plots/pixel/

    if config.tsne_points:
        for fs in feature_sets:
            if fs.kind == EMBEDDING:
                safe = fs.name.replace("/", "_")
                notes: list[str] = []
                plot_paths.append(_plot(failures, f"tsne_{safe}", plots.plot_tsne, fs.test, test.labels,
                                        test.class_names, os.path.join(plot_dir, f"tsne_{safe}.png"),
                                        max_points=int(config.tsne_points), seed=int(config.seed), notes=notes))
                meta_warnings.extend(f"t-SNE of {fs.name}: {n}" for n in notes)
    for loaded in checkpoints:
        if loaded.can_reconstruct:
            first = [int(np.flatnonzero(test.labels == c)[0]) for c in np.unique(test.labels)][:8]  # one per class
            plot_paths.append(_plot(failures, f"recon_{loaded.name}", figures.reconstruction_grid, loaded.method,
                                    loaded.params, test.images[first], loaded.config.model.image_size,
                                    loaded.config.data, config.seed, os.path.join(plot_dir, f"recon_{loaded.name}.png")))
    plot_paths = [p for p in plot_paths if p is not None]

    meta = {
        "config": config.to_dict(),
        "checkpoints": [{"workdir": c.workdir, "name": c.name, "step": c.step, "method": c.config.method} for c in checkpoints],
        "seed": int(config.seed),
        "version": ssl_ad.__version__,
        "dataset": {"name": train.name, "train": len(train), "test": len(test), "classes": train.class_names},
        "feature_seconds": {f"{fs.name}:{fs.kind}": fs.seconds for fs in feature_sets},
        "total_seconds": time.perf_counter() - t_start,
        "skipped_rounds": {p: r for p, r in skipped_rounds.items() if r},
        "warnings": meta_warnings,
        "failures": failures,
    }
    report.write_results_json(os.path.join(outdir, "results.json"), rows, meta)
    report.write_results_csv(os.path.join(outdir, "results.csv"), rows)
    report.write_event_file(outdir, rows, {c.name: c.step for c in checkpoints})
    rel = [os.path.relpath(str(p), outdir) for p in plot_paths]
    report.write_report_md(os.path.join(outdir, "report.md"), rows, meta, rel, command)
    return rows
