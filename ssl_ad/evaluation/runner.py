"""The evaluation job: features for every source, every scorer on every protocol round, reports.

Everything is inductive: a scorer is fit on the TRAIN split's normal images of
a round and scores the held-out TEST split. Feature sources are raw pixels,
a randomly initialised ViT ("before SSL") and each checkpoint given.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import zipfile
from typing import Any

import numpy as np

import ssl_ad
from ssl_ad.data.pipeline import preprocess_eval
from ssl_ad.data.sources import ImageSplit, load_split
from ssl_ad.errors import UserInputError
from ssl_ad.evaluation import embedding, metrics, plots, report
from ssl_ad.evaluation.protocols import MVTEC_VARIANTS, PROTOCOLS, Round, make_rounds, mvtec_rounds
from ssl_ad.evaluation.scorers import SCORERS, build_scorer
from ssl_ad.models.vit import vit_from_config

log = logging.getLogger(__name__)

EMBEDDING, RECON = "embedding", "recon"


@dataclasses.dataclass
class FeatureSet:
    """Train and test features of one source; ``kind`` says which scorers apply."""

    name: str
    kind: str
    train: np.ndarray
    test: np.ndarray
    seconds: float
    info: dict[str, Any]


def _csv(value: Any) -> list[str]:
    if isinstance(value, (list, tuple)):
        return [str(v) for v in value if str(v)]
    return [v.strip() for v in str(value).split(",") if v.strip()]


def _cached(path: str, compute) -> tuple[np.ndarray, bool]:
    """Loads features from ``path`` (.npz, no pickle) or computes and saves them atomically."""
    if os.path.exists(path):
        try:
            with np.load(path, allow_pickle=False) as f:
                return f["features"], True
        except ValueError as e:
            if "allow_pickle" in str(e):  # numpy refuses object arrays: loading them would unpickle
                raise UserInputError(
                    f"cached features {path} hold pickled Python objects, which are never loaded "
                    "(allow_pickle=False); delete the file to recompute the features"
                ) from None
            raise UserInputError(f"cached features {path} cannot be read ({e}); delete the file to recompute them") from None
        except (OSError, KeyError, EOFError, zipfile.BadZipFile) as e:
            raise UserInputError(
                f"cached features {path} cannot be read ({type(e).__name__}: {e}); delete the file to recompute them"
            ) from None
    features = compute()
    tmp = path + ".tmp.npz"
    try:
        np.savez(tmp, features=features)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return features, False


class FeatureBuilder:
    """Computes (or reloads) the features of each source for the train and test splits."""

    def __init__(self, config: Any, train: ImageSplit, test: ImageSplit, feature_dir: str):
        self.config, self.train, self.test, self.dir = config, train, test, feature_dir
        os.makedirs(feature_dir, exist_ok=True)

    def _key(self, source: str, step: int, split: ImageSplit, extra: str) -> str:
        return os.path.join(self.dir, f"{source}-step{step}-{split.name}-{split.split}-{extra}.npz")

    def _both(self, source: str, step: int, extra: str, compute) -> tuple[np.ndarray, np.ndarray, float]:
        t0 = time.perf_counter()
        out = []
        for split in (self.train, self.test):
            feats, hit = _cached(self._key(source, step, split, extra), lambda s=split: compute(s))
            if feats.shape[0] != len(split):
                raise UserInputError(f"cached features {self._key(source, step, split, extra)} do not match the split")
            embedding.check_features_finite(feats, source)
            out.append(feats)
        return out[0], out[1], time.perf_counter() - t0

    def pixels(self) -> FeatureSet:
        tr, te, sec = self._both("pixels", 0, "raw", lambda s: embedding.pixel_features(s.images))
        return FeatureSet("pixels", EMBEDDING, tr, te, sec, {"source": "raw pixels"})

    def _vit_sets(self, name: str, step: int, model, params, data_norm, which: str = "") -> list[FeatureSet]:
        cfg = self.config
        sets = []
        size = model.image_size
        images = {}

        def prepared(split: ImageSplit) -> np.ndarray:
            if split.split not in images:
                images[split.split] = preprocess_eval(split.images, size, data_norm.mean, data_norm.std)
            return images[split.split]

        for pooling in _csv(cfg.pooling):
            tag = "-".join(t for t in (pooling, which, f"{size}px", "l2" if cfg.l2_normalize else "") if t)
            tr, te, sec = self._both(
                name,
                step,
                tag,
                lambda s, p=pooling: embedding.embed_images(
                    model, params, prepared(s), p, cfg.batch_size, cfg.l2_normalize
                ),
            )
            label = name if len(_csv(cfg.pooling)) == 1 else f"{name}/{pooling}"
            sets.append(FeatureSet(label, EMBEDDING, tr, te, sec, {"pooling": pooling, "step": step}))
        return sets

    def random_init(self, model_cfg: Any, data_norm: Any) -> list[FeatureSet]:
        model = vit_from_config(model_cfg, drop_path_rate=0.0)
        params = embedding.random_init_params(model, self.config.seed)
        return self._vit_sets("random_init", 0, model, params, data_norm)

    def checkpoint(self, loaded: embedding.LoadedCheckpoint) -> list[FeatureSet]:
        cfg = self.config
        which = cfg.which if loaded.config.method == "dino" else "default"
        model = loaded.encoder()
        params = loaded.encoder_params(which)
        sets = self._vit_sets(loaded.name, loaded.step, model, params, loaded.config.data, which if which != "default" else "")
        if loaded.can_reconstruct and "mae_recon" in _csv(cfg.scorers):
            size, norm = model.image_size, loaded.config.data
            masks = int(cfg.mae_recon.num_masks)

            def maps(split: ImageSplit) -> np.ndarray:
                x = preprocess_eval(split.images, size, norm.mean, norm.std)
                err = embedding.reconstruction_error_maps(loaded.method, loaded.params, x, masks, cfg.seed, cfg.batch_size)
                return err.reshape(err.shape[0], -1)

            tr, te, sec = self._both(loaded.name, loaded.step, f"recon{masks}-{size}px", maps)
            sets.append(FeatureSet(loaded.name, RECON, tr, te, sec, {"step": loaded.step, "num_masks": masks}))
        return sets


def scorer_kwargs(config: Any, name: str) -> dict[str, Any]:
    """Keyword arguments of scorer ``name`` from ``config.scorer_args`` plus the global pca_dims and seed."""
    kwargs = dict(config.scorer_args.get(name, {}))
    if name != "mae_recon":
        kwargs.setdefault("pca_dims", int(config.pca_dims) or None)
    if name in ("kmeans", "gmm_kmeans", "gmm"):
        kwargs.setdefault("seed", int(config.seed))
        if "k_range" in kwargs:
            kwargs["k_range"] = tuple(kwargs["k_range"])
    return kwargs


def score_rounds(fs: FeatureSet, scorer_name: str, protocol: str, rounds: list[Round], config: Any) -> tuple[dict, dict]:
    """Fits and scores one scorer on every round; returns (result row, per-round ROC curves)."""
    per_round, auprs, curves, warnings = {}, [], {}, []
    fit_s = score_s = 0.0
    first_scorer = None
    for rnd in rounds:
        scorer = build_scorer(scorer_name, **scorer_kwargs(config, scorer_name))
        t0 = time.perf_counter()
        scorer.fit(fs.train[rnd.train_idx])
        t1 = time.perf_counter()
        scores = scorer.score(fs.test[rnd.test_idx])
        t2 = time.perf_counter()
        fit_s, score_s = fit_s + t1 - t0, score_s + t2 - t1
        per_round[rnd.name] = metrics.auroc(rnd.test_is_anomaly, scores)
        auprs.append(metrics.aupr(rnd.test_is_anomaly, scores))
        fpr, tpr = metrics.roc_points(rnd.test_is_anomaly, scores)
        curves[rnd.name] = (fpr, tpr, per_round[rnd.name])
        warnings.extend(w for w in scorer.warnings if w not in warnings)
        first_scorer = first_scorer or scorer
    mean, std = metrics.summarise(per_round)
    row = {
        "feature": fs.name,
        "scorer": scorer_name,
        "protocol": protocol,
        "mean_auroc": mean,
        "std_auroc": std,
        "mean_aupr": float(np.mean(auprs)),
        "per_round": per_round,
        "fit_seconds": fit_s,
        "score_seconds": score_s,
        "warnings": warnings,
        "feature_dims": int(fs.train.shape[1]),
    }
    if getattr(first_scorer, "k", None) is not None:
        row["k_first_round"] = int(first_scorer.k)
    return row, {"curves": curves, "scorer": first_scorer}


def _rounds_for(protocol: str, train: ImageSplit, test: ImageSplit, config: Any) -> list[Round]:
    """The rounds of ``protocol``: a class protocol, or 'mvtec' / 'mvtec_study' (anomaly = test.is_anomaly)."""
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
                name=category or train.name, max_train_per_round=max_train, seed=seed,
            )
        except ValueError as e:
            raise UserInputError(f"protocol {protocol!r}: {e}") from None
    if protocol not in PROTOCOLS:
        raise UserInputError(f"unknown protocol {protocol!r}; choose from {sorted(PROTOCOLS) + list(MVTEC_VARIANTS)}")
    return make_rounds(protocol, train.labels, test.labels, train.class_names, max_train_per_round=max_train, seed=seed)


def _pixel_stage(config, train, test, checkpoints, protocol_rounds, builder, plot_dir) -> tuple[list, list]:
    """Pixel-level rows (pixel_<maker>) and plots for every source and MVTec round; see pixel_maps."""
    from ssl_ad.evaluation.pixel_maps import MapSource, PixelEvaluator

    makers = _csv(config.pixel_maps)
    if test.masks is None or test.is_anomaly is None:
        log.warning("pixel_maps=%s skipped: %s/%s has no ground-truth masks", makers, test.name, test.split)
        return [], []
    if not protocol_rounds:  # no MVTec protocol requested: the standard one
        protocol_rounds = {"mvtec": _rounds_for("mvtec", train, test, config)}
    sources = []
    if "random_init" in _csv(config.sources):
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
                paths.append(plots.plot_auroc_bars(bars, os.path.join(plot_dir, f"{key}_{protocol}.png"),
                                                   title=f"Mean {label} · {protocol}"))
    return rows, paths


def _applicable(fs: FeatureSet, scorer_name: str) -> bool:
    return (scorer_name == "mae_recon") == (fs.kind == RECON)


def run_evaluation(config: Any, outdir: str, command: str = "") -> list[dict[str, Any]]:
    """The whole evaluation; writes results.json/.csv, report.md, plots/ and features/ into ``outdir``."""
    t_start = time.perf_counter()
    scorer_names = _csv(config.scorers)
    unknown = [s for s in scorer_names if s not in SCORERS]
    if unknown:
        raise UserInputError(f"unknown scorer(s) {unknown}; choose from {sorted(SCORERS)}")
    try:
        os.makedirs(os.path.join(outdir, "plots"), exist_ok=True)
    except OSError as e:
        raise UserInputError(f"cannot write outdir {outdir}: {e.strerror}") from e
    pixel_makers = _csv(config.get("pixel_maps", ""))
    if pixel_makers:
        from ssl_ad.evaluation.pixel_maps import MAKERS

        if [m for m in pixel_makers if m not in MAKERS]:
            raise UserInputError(f"unknown pixel map maker(s) in {pixel_makers}; choose from {list(MAKERS)}")
    checkpoints = [embedding.load_checkpoint(w, int(config.step)) for w in _csv(config.checkpoint)]
    train = load_split(config.data, config.data.train_split)
    test = load_split(config.data, config.data.test_split)
    builder = FeatureBuilder(config, train, test, os.path.join(outdir, "features"))

    feature_sets: list[FeatureSet] = []
    sources = _csv(config.sources)
    if "pixels" in sources:
        feature_sets.append(builder.pixels())
    if "random_init" in sources:
        ref = checkpoints[0].config if checkpoints else config
        feature_sets.extend(builder.random_init(ref.model, ref.data if checkpoints else config.data))
    for loaded in checkpoints:
        feature_sets.extend(builder.checkpoint(loaded))
    for fs in feature_sets:
        log.info("features %-14s %-9s train %s test %s (%.1f s)", fs.name, fs.kind, fs.train.shape, fs.test.shape, fs.seconds)

    rows, plot_paths = [], []
    plot_dir = os.path.join(outdir, "plots")
    mvtec_protocol_rounds = {}
    for protocol in _csv(config.protocols):
        rounds = _rounds_for(protocol, train, test, config)
        if protocol in MVTEC_VARIANTS:
            mvtec_protocol_rounds[protocol] = rounds
        for fs in feature_sets:
            for scorer_name in scorer_names:
                if not _applicable(fs, scorer_name):
                    continue
                row, extra = score_rounds(fs, scorer_name, protocol, rounds, config)
                rows.append(row)
                log.info("%-12s %-12s %-20s AUROC %.3f ± %.3f (fit %.1f s, score %.1f s)", fs.name, scorer_name,
                         protocol, row["mean_auroc"], row["std_auroc"], row["fit_seconds"], row["score_seconds"])
                safe = fs.name.replace("/", "_")
                if scorer_name == config.roc_scorer or (fs.kind == RECON and config.roc_scorer):
                    p = plots.plot_roc_curves(extra["curves"], f"{fs.name} · {scorer_name} · {protocol}",
                                              os.path.join(plot_dir, f"roc_{protocol}_{safe}_{scorer_name}.png"))
                    plot_paths.append(p)
                if scorer_name == "kmeans" and protocol == _csv(config.protocols)[0]:
                    sc = extra["scorer"]
                    plot_paths.append(plots.plot_elbow(sc.inertias, sc.k, os.path.join(plot_dir, f"elbow_{safe}.png")))
        bars = {(r["feature"], r["scorer"]): (r["mean_auroc"], r["std_auroc"]) for r in rows if r["protocol"] == protocol}
        plot_paths.append(plots.plot_auroc_bars(bars, os.path.join(plot_dir, f"auroc_{protocol}.png"),
                                                title=f"Mean AUROC · {protocol}"))

    if pixel_makers:
        pixel_rows, pixel_paths = _pixel_stage(config, train, test, checkpoints, mvtec_protocol_rounds, builder, plot_dir)
        rows.extend(pixel_rows)
        plot_paths.extend(p for p in pixel_paths if os.path.dirname(str(p)) == plot_dir)  # overlays stay in plots/pixel/

    if config.tsne_points:
        for fs in feature_sets:
            if fs.kind == EMBEDDING:
                safe = fs.name.replace("/", "_")
                plot_paths.append(plots.plot_tsne(fs.test, test.labels, test.class_names,
                                                  os.path.join(plot_dir, f"tsne_{safe}.png"),
                                                  max_points=int(config.tsne_points), seed=int(config.seed)))
    for loaded in checkpoints:
        if loaded.can_reconstruct:
            plot_paths.append(_reconstruction_grid(loaded, test, os.path.join(plot_dir, f"recon_{loaded.name}.png"), config.seed))

    meta = {
        "config": config.to_dict(),
        "checkpoints": [{"workdir": c.workdir, "name": c.name, "step": c.step, "method": c.config.method} for c in checkpoints],
        "seed": int(config.seed),
        "version": ssl_ad.__version__,
        "dataset": {"name": train.name, "train": len(train), "test": len(test), "classes": train.class_names},
        "feature_seconds": {f"{fs.name}:{fs.kind}": fs.seconds for fs in feature_sets},
        "total_seconds": time.perf_counter() - t_start,
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
