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

import logging
import os
import time
from typing import Any

import numpy as np

import ssl_ad
from ssl_ad.data.pipeline import preprocess_eval
from ssl_ad.data.sources import ImageSplit, load_split
from ssl_ad.errors import UserInputError
from ssl_ad.evaluation import embedding, metrics, plots, report
from ssl_ad.evaluation.features import EMBEDDING, RECON, FeatureBuilder, FeatureSet, csv_list
from ssl_ad.evaluation.protocols import MVTEC_VARIANTS, PROTOCOLS, Round, make_rounds, mvtec_rounds
from ssl_ad.evaluation.scorers import RESIDUAL_MODES, SCORERS, build_scorer
from ssl_ad.models.vit import vit_from_config

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


def _mean_std(per_round: dict[str, float]) -> tuple[float, float]:
    """metrics.summarise over the rounds that worked; NaN when none did."""
    return metrics.summarise(per_round) if per_round else (float("nan"), float("nan"))


def failures_in(outdir: str) -> list[dict]:
    """The failures a finished run recorded in ``outdir/results.json`` (empty when all worked)."""
    import json

    with open(os.path.join(outdir, "results.json")) as f:
        return list(json.load(f)["meta"].get("failures", []))


def scorer_kwargs(config: Any, name: str) -> dict[str, Any]:
    """Keyword arguments of scorer ``name`` from ``config.scorer_args`` plus the global pca_dims and seed."""
    kwargs = dict(config.scorer_args.get(name, {}))
    if name != "mae_recon":
        kwargs.setdefault("pca_dims", int(config.pca_dims) or None)
        kwargs.setdefault("pca_residual", str(config.get("pca_residual", "auto")))
    if name in ("kmeans", "gmm_kmeans", "gmm"):
        kwargs.setdefault("seed", int(config.seed))
        if "k_range" in kwargs:
            kwargs["k_range"] = tuple(kwargs["k_range"])
    return kwargs


def score_rounds(fs: FeatureSet, scorer_name: str, protocol: str, rounds: list[Round], config: Any) -> tuple[dict, dict]:
    """Fits and scores one scorer on every round; returns (result row, per-round ROC curves).

    A round on which the scorer raises is left out of ``per_round`` and recorded in the row's
    ``failed_rounds`` (round -> reason); the means cover the rounds that worked (NaN if none).
    """
    per_round, auprs, curves, warnings, failed = {}, [], {}, [], {}
    fit_s = score_s = 0.0
    first_scorer = None
    for rnd in rounds:
        scorer = None
        try:
            scorer = build_scorer(scorer_name, **scorer_kwargs(config, scorer_name))
            t0 = time.perf_counter()
            scorer.fit(fs.train[rnd.train_idx])
            t1 = time.perf_counter()
            scores = scorer.score(fs.test[rnd.test_idx])
            t2 = time.perf_counter()
            auc = metrics.auroc(rnd.test_is_anomaly, scores)
            ap = metrics.aupr(rnd.test_is_anomaly, scores)
            fpr, tpr = metrics.roc_points(rnd.test_is_anomaly, scores)
        except Exception as e:  # noqa: BLE001 - one round's failure must not lose the others
            failed[rnd.name] = _reason(e)
            log.warning("%s / %s / %s: round %r failed: %s", fs.name, scorer_name, protocol, rnd.name, _reason(e))
            continue
        finally:
            if scorer is not None:
                warnings.extend(w for w in scorer.warnings if w not in warnings)
        fit_s, score_s = fit_s + t1 - t0, score_s + t2 - t1
        per_round[rnd.name] = auc
        auprs.append(ap)
        curves[rnd.name] = (fpr, tpr, auc)
        first_scorer = first_scorer or scorer
    mean, std = _mean_std(per_round)
    row = {
        "feature": fs.name,
        "scorer": scorer_name,
        "protocol": protocol,
        "mean_auroc": mean,
        "std_auroc": std,
        "mean_aupr": float(np.mean(auprs)) if auprs else float("nan"),
        "per_round": per_round,
        "fit_seconds": fit_s,
        "score_seconds": score_s,
        "warnings": warnings,
        "feature_dims": int(fs.train.shape[1]),
        "failed_rounds": failed,
    }
    k = getattr(first_scorer, "fitted_k", None)
    k = getattr(first_scorer, "k", None) if k is None else k
    if k is not None:
        row["k_first_round"] = int(k)
    return row, {"curves": curves, "scorer": first_scorer}


def _rounds_for(
    protocol: str, train: ImageSplit, test: ImageSplit, config: Any, skipped: dict[str, str] | None = None
) -> list[Round]:
    """The rounds of ``protocol``: a class protocol, or 'mvtec' / 'mvtec_study' (anomaly = test.is_anomaly).

    Unscoreable rounds are skipped and recorded in ``skipped``; a protocol with no scoreable
    round (or an unknown one) is a UserInputError.
    """
    max_train, seed = int(config.max_train_per_round) or None, int(config.seed)
    if protocol in MVTEC_VARIANTS:
        if test.is_anomaly is None:
            raise UserInputError(
                f"protocol {protocol!r} needs a test split with anomaly labels (e.g. mvtec_ad); {test.name} has none"
            )
        category = str(config.data.get("category", "") or "")
        try:
            return mvtec_rounds(
                train.labels, test.labels, test.is_anomaly, train.class_names, category == "all", protocol,
                name=category or train.name, max_train_per_round=max_train, seed=seed, skipped=skipped,
            )
        except ValueError as e:
            raise UserInputError(f"protocol {protocol!r}: {e}") from None
    if protocol not in PROTOCOLS:
        raise UserInputError(f"unknown protocol {protocol!r}; choose from {sorted(PROTOCOLS) + list(MVTEC_VARIANTS)}")
    try:
        return make_rounds(protocol, train.labels, test.labels, train.class_names, max_train_per_round=max_train,
                           seed=seed, skipped=skipped, normal_class=str(config.get("normal_class", "good")))
    except ValueError as e:
        raise UserInputError(f"protocol {protocol!r}: {e}") from None


def _pixel_stage(config, train, test, checkpoints, protocol_rounds, builder, plot_dir, failures) -> tuple[list, list]:
    """Pixel-level rows (pixel_<maker>) and plots for every source and MVTec round; see pixel_maps."""
    from ssl_ad.evaluation.pixel_maps import MapSource, PixelEvaluator

    makers = csv_list(config.pixel_maps)
    if test.masks is None or test.is_anomaly is None:
        log.warning("pixel_maps=%s skipped: %s/%s has no ground-truth masks", makers, test.name, test.split)
        return [], []
    if not protocol_rounds:  # no MVTec protocol requested: the standard one
        protocol_rounds = {"mvtec": _rounds_for("mvtec", train, test, config)}
    sources = []
    if "random_init" in csv_list(config.sources):
        ref = checkpoints[0].config if checkpoints else config
        model = vit_from_config(ref.model, drop_path_rate=0.0)
        params = embedding.random_init_params(model, config.seed)
        sources.append(MapSource("random_init", 0, model, params, ref.data if checkpoints else config.data))
    for loaded in checkpoints:
        which = config.which if loaded.config.method == "dino" else "default"
        sources.append(MapSource(loaded.name, loaded.step, loaded.encoder(), loaded.encoder_params(which),
                                 loaded.config.data, loaded.method, loaded.params))
    evaluator = PixelEvaluator(config, train, test, makers, cache_path=builder._key)
    rows, paths = evaluator.evaluate(sources, protocol_rounds, plot_dir)
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
    """The whole evaluation; writes results.json/.csv, report.md, plots/ and features/ into ``outdir``."""
    t_start = time.perf_counter()
    scorer_names = csv_list(config.scorers)
    unknown = [s for s in scorer_names if s not in SCORERS]
    if unknown:
        raise UserInputError(f"unknown scorer(s) {unknown}; choose from {sorted(SCORERS)}")
    if str(config.get("pca_residual", "auto")) not in RESIDUAL_MODES:
        raise UserInputError(f"pca_residual={config.pca_residual!r}; choose from {list(RESIDUAL_MODES)}")
    try:
        os.makedirs(os.path.join(outdir, "plots"), exist_ok=True)
    except OSError as e:
        raise UserInputError(f"cannot write outdir {outdir}: {e.strerror}") from e
    pixel_makers = csv_list(config.get("pixel_maps", ""))
    if pixel_makers:
        from ssl_ad.evaluation.pixel_maps import MAKERS

        if [m for m in pixel_makers if m not in MAKERS]:
            raise UserInputError(f"unknown pixel map maker(s) in {pixel_makers}; choose from {list(MAKERS)}")
    checkpoints = [embedding.load_checkpoint(w, int(config.step)) for w in csv_list(config.checkpoint)]
    train = load_split(config.data, config.data.train_split)
    test = load_split(config.data, config.data.test_split)
    # Every protocol's rounds before any feature is computed: an unusable protocol fails early.
    protocol_rounds: dict[str, list[Round]] = {}
    skipped_rounds: dict[str, dict[str, str]] = {}
    for protocol in csv_list(config.protocols):
        skipped_rounds[protocol] = {}
        protocol_rounds[protocol] = _rounds_for(protocol, train, test, config, skipped_rounds[protocol])
    builder = FeatureBuilder(config, train, test, os.path.join(outdir, "features"))

    feature_sets: list[FeatureSet] = []
    sources = csv_list(config.sources)
    if "pixels" in sources:
        feature_sets.append(builder.pixels())
    if "random_init" in sources:
        ref = checkpoints[0].config if checkpoints else config
        feature_sets.extend(builder.random_init(ref.model, ref.data if checkpoints else config.data))
    for loaded in checkpoints:
        feature_sets.extend(builder.checkpoint(loaded))
    for fs in feature_sets:
        log.info("features %-14s %-9s train %s test %s (%.1f s)", fs.name, fs.kind, fs.train.shape, fs.test.shape, fs.seconds)

    rows, plot_paths, failures, meta_warnings = [], [], [], []
    plot_dir = os.path.join(outdir, "plots")
    first_protocol = next(iter(protocol_rounds), None)
    for protocol, rounds in protocol_rounds.items():
        for fs in feature_sets:
            for scorer_name in scorer_names:
                if not _applicable(fs, scorer_name):
                    continue
                row, extra = score_rounds(fs, scorer_name, protocol, rounds, config)
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
            plot_paths.append(_plot(failures, f"recon_{loaded.name}", _reconstruction_grid, loaded, test,
                                    os.path.join(plot_dir, f"recon_{loaded.name}.png"), config.seed))
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
    rel = [os.path.relpath(str(p), outdir) for p in plot_paths]
    report.write_report_md(os.path.join(outdir, "report.md"), rows, meta, rel, command)
    return rows


def _reconstruction_grid(loaded: embedding.LoadedCheckpoint, split: ImageSplit, path: str, seed: int):
    """Masked input / reconstruction / original / error map for the first test image of each class."""
    import jax

    first = [int(np.flatnonzero(split.labels == c)[0]) for c in np.unique(split.labels)][:8]
    norm = loaded.config.data
    x = preprocess_eval(split.images[first], loaded.config.model.image_size, norm.mean, norm.std)
    out = jax.device_get(loaded.method.reconstruct(loaded.params, x, jax.random.key(seed)))
    mean, std = np.asarray(norm.mean), np.asarray(norm.std)

    def unit(a):
        return np.clip(np.asarray(a) * std + mean, 0.0, 1.0)

    rows = [unit(out["masked"]), unit(out["reconstruction"]), unit(out["original"]), np.asarray(out["error"])]
    return plots.plot_image_grid(rows, ["masked input", "reconstruction", "original", "error map"], path)
