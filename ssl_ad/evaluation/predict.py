"""Scoring new, unlabelled images: fit a scorer on normal images, score the new ones, decide.

``run_prediction(config, outdir)`` (``predict.py``) embeds the normal images
(``config.normal_dir``) and the new ones (``config.images``: a folder or a glob) with one
checkpoint's encoder (``config.checkpoint``; ``''`` = raw pixels), fits ``config.scorer``
(any feature scorer of :mod:`ssl_ad.evaluation.scorers`, with the evaluation's
``scorer_args`` / ``pca_dims``) on all normal features and scores every new image.

The decision threshold is chosen on the normal images at the false-positive rate
``config.fpr``: each normal image is scored by a scorer fit on the other folds
(``config.folds``-fold cross-fitting, seeded), and the threshold is the ``1 - fpr`` quantile
of those out-of-fold scores (``numpy.quantile``, 'higher' method), so a new normal image is
called anomalous with probability about ``fpr``. (Scoring normals with the scorer fit on them
would put the threshold too low: each would find itself.)

Outputs in ``outdir``: ``scores.csv`` (file, score, anomalous 0/1, in the order the files were
listed), ``prediction.json`` (threshold, fpr, counts, checkpoint, seconds, images per second),
``features/`` (cached, fingerprinted like evaluation's), and for ViT checkpoints
``overlays.png``: patch-kNN heat maps (patch tokens of the new image to the normal images' patch
tokens, :mod:`ssl_ad.evaluation.pixel_maps`) of the ``config.overlays`` highest-scoring images.
"""

from __future__ import annotations

import csv
import glob
import json
import logging
import os
import time
from typing import Any

import numpy as np

import ssl_ad
from ssl_ad import sharding
from ssl_ad.atomic import atomic_write_text
from ssl_ad.data.image_folder import SquareResizer, decode, image_extensions
from ssl_ad.data.pipeline import preprocess_eval
from ssl_ad.data.split import array_digest
from ssl_ad.errors import UserInputError
from ssl_ad.evaluation import embedding
from ssl_ad.evaluation.features import cached_array, fingerprint, params_digest, signature
from ssl_ad.evaluation.overlays import plot_anomaly_overlays
from ssl_ad.evaluation.pixel_maps import bank_indices, patch_knn_maps, upsample_maps
from ssl_ad.evaluation.scorers import SCORERS, build_scorer
from ssl_ad.evaluation.scoring import scorer_kwargs

log = logging.getLogger(__name__)

FEATURE_SCORERS = tuple(sorted(s for s in SCORERS if s != "mae_recon"))  # mae_recon needs a decoder, not features
PIXEL_SIZE = 28  # raw-pixel features when no checkpoint is given: images made this many pixels square


def list_images(spec: str, what: str) -> list[str]:
    """Image files of ``spec``: a folder (every image file in it and below, sorted) or a glob pattern
    (``**`` recursive). Only extensions Pillow decodes are kept.

    Raises:
      UserInputError: when ``spec`` is empty or matches no image file.
    """
    spec = os.path.expanduser(str(spec or ""))
    if not spec:
        raise UserInputError(f"config.{what} is empty; give a folder of images or a glob like 'shots/*.png'")
    exts = set(image_extensions())
    if os.path.isdir(spec):
        found = [os.path.join(d, f) for d, _, files in os.walk(spec) for f in files]
    else:
        found = glob.glob(spec, recursive=True)
    files = sorted(f for f in found if os.path.isfile(f) and os.path.splitext(f)[1].lower() in exts)
    if not files:
        raise UserInputError(f"config.{what}={spec!r} holds no image file (looked for {', '.join(sorted(exts)[:6])}, ...)")
    return files


def load_images(files: list[str], size: int, resize_mode: str) -> np.ndarray:
    """(N, size, size, 3) uint8: each file decoded to RGB and made square by ``resize_mode``."""
    resizer = SquareResizer(int(size), resize_mode)
    out = np.stack([decode(f, resizer) for f in files])
    resizer.report(f"{len(files)} images")
    return out


def out_of_fold_scores(features: np.ndarray, make_scorer, folds: int, seed: int) -> np.ndarray:
    """(N,) scores of ``features`` (N, D), each from a scorer fit on the other folds (seeded split).

    Raises:
      UserInputError: with fewer than 2 normal images per fold.
    """
    n = features.shape[0]
    folds = min(int(folds), n)
    if n < 2 * max(folds, 2):
        raise UserInputError(f"{n} normal images are too few to choose a threshold with {folds}-fold cross-fitting; "
                             f"give at least {2 * max(folds, 2)}")
    order = np.random.default_rng(seed).permutation(n)
    scores = np.empty(n, np.float64)
    for part in np.array_split(order, folds):
        rest = np.setdiff1d(order, part)
        scores[part] = make_scorer().fit(features[rest]).score(features[part])
    return scores


def threshold_at_fpr(normal_scores: np.ndarray, fpr: float) -> float:
    """The ``1 - fpr`` quantile of normal images' scores (higher = more anomalous)."""
    return float(np.quantile(np.asarray(normal_scores, np.float64), 1.0 - float(fpr), method="higher"))


class _Source:
    """The encoder that embeds (a checkpoint's, or raw pixels when ``workdir`` is '')."""

    def __init__(self, config: Any):
        self.loaded = None
        if str(config.checkpoint or ""):
            self.loaded = embedding.load_checkpoint(str(config.checkpoint), int(config.step))
            which = config.which if self.loaded.config.method == "dino" else "default"
            self.model = self.loaded.encoder()
            self.params = self.loaded.encoder_params(which)
            self.norm = self.loaded.config.data
            self.size = int(self.model.image_size)
            self.name = self.loaded.name
        else:
            self.model = self.params = self.norm = None
            self.size, self.name = int(config.get("pixel_size", PIXEL_SIZE)), "pixels"

    def describe(self) -> dict[str, Any]:
        if self.loaded is None:
            return {"kind": "pixels", "size": self.size}
        return {"kind": "vit", "model": signature(self.model), "params": params_digest(self.params),
                "mean": [float(v) for v in self.norm.mean], "std": [float(v) for v in self.norm.std]}

    def features(self, images: np.ndarray, pooling: str, batch_size: int) -> np.ndarray:
        if self.loaded is None:
            return embedding.pixel_features(images)
        x = preprocess_eval(images, self.size, self.norm.mean, self.norm.std)
        return embedding.embed_images(self.model, self.params, x, pooling, batch_size)

    def patch_tokens(self, images: np.ndarray, batch_size: int) -> np.ndarray:
        x = preprocess_eval(images, self.size, self.norm.mean, self.norm.std)
        return embedding.embed_patch_tokens(self.model, self.params, x, batch_size)


def _check(config: Any) -> str:
    name = str(config.scorer)
    if name not in FEATURE_SCORERS:
        raise UserInputError(f"config.scorer={name!r}; choose a feature scorer: {list(FEATURE_SCORERS)}")
    if not 0.0 < float(config.fpr) < 1.0:
        raise UserInputError(f"config.fpr={config.fpr!r}; expected a false-positive rate in (0, 1), e.g. 0.05")
    return name


def run_prediction(config: Any, outdir: str, command: str = "") -> dict[str, Any]:
    """Scores ``config.images`` against ``config.normal_dir``; writes scores.csv and prediction.json
    (and overlays.png) into ``outdir`` and returns the prediction.json dict.

    Raises:
      UserInputError: bad scorer or fpr, no images, unreadable files, too few normal images, or
        started as one of several processes (it runs on one host).
    """
    t0 = time.perf_counter()
    sharding.require_one_process("predict.py")
    scorer_name = _check(config)
    normal_files = list_images(config.normal_dir, "normal_dir")
    new_files = list_images(config.images, "images")
    os.makedirs(os.path.join(outdir, "features"), exist_ok=True)
    source = _Source(config)
    mode = str(config.get("resize_mode", "crop"))
    normal = load_images(normal_files, source.size, mode)
    new = load_images(new_files, source.size, mode)
    pooling = str(config.pooling[0] if isinstance(config.pooling, (tuple, list)) else config.pooling)

    def feats(images: np.ndarray, tag: str) -> np.ndarray:
        wanted = fingerprint(images=array_digest(images), source=source.describe(), pooling=pooling)
        path = os.path.join(outdir, "features", f"{source.name}-{tag}-{pooling}.npz")
        return cached_array(path, lambda: source.features(images, pooling, int(config.batch_size)),
                            fingerprint=wanted)[0]

    t_embed = time.perf_counter()
    normal_f, new_f = feats(normal, "normal"), feats(new, "new")
    embed_s = time.perf_counter() - t_embed
    kwargs = scorer_kwargs(config, scorer_name)
    make = lambda: build_scorer(scorer_name, **kwargs)  # noqa: E731
    threshold = threshold_at_fpr(out_of_fold_scores(normal_f, make, int(config.folds), int(config.seed)), float(config.fpr))
    scores = make().fit(normal_f).score(new_f)
    anomalous = scores > threshold

    with open(os.path.join(outdir, "scores.csv"), "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["file", "score", "anomalous"])
        w.writerows([path, f"{s:.6g}", int(a)] for path, s, a in zip(new_files, scores, anomalous))
    overlay = None
    if source.loaded is not None and int(config.overlays) > 0:
        overlay = _overlays(source, normal, new, scores, new_files, config, outdir)
    seconds = time.perf_counter() - t0
    summary = {
        "checkpoint": str(config.checkpoint or ""), "source": source.name, "scorer": scorer_name, "pooling": pooling,
        "fpr": float(config.fpr), "folds": int(config.folds), "threshold": threshold,
        "normal_images": len(normal_files), "new_images": len(new_files), "anomalous": int(anomalous.sum()),
        "seconds": seconds, "embed_seconds": embed_s, "new_images_per_second": len(new_files) / max(seconds, 1e-9),
        "overlays": overlay, "command": command, "version": ssl_ad.__version__,
    }
    atomic_write_text(os.path.join(outdir, "prediction.json"), json.dumps(summary, indent=2))
    log.info("%d of %d new images anomalous at threshold %.4g (FPR %.3g on %d normal images); %s",
             summary["anomalous"], len(new_files), threshold, float(config.fpr), len(normal_files),
             os.path.join(outdir, "scores.csv"))
    return summary


def _overlays(source: _Source, normal: np.ndarray, new: np.ndarray, scores: np.ndarray, files: list[str],
              config: Any, outdir: str) -> str:
    """Patch-kNN maps of the highest-scoring new images over the images; returns the PNG path."""
    top = np.argsort(-scores, kind="stable")[: int(config.overlays)]
    bank_tokens = source.patch_tokens(normal, int(config.batch_size))
    img, tok = bank_indices(bank_tokens.shape[0], bank_tokens.shape[1], int(config.pixel.max_bank) or None, int(config.seed))
    maps = patch_knn_maps(bank_tokens[img, tok], source.patch_tokens(new[top], int(config.batch_size)),
                          k=int(config.pixel.k), metric=str(config.pixel.metric))
    full = upsample_maps(maps, new.shape[1:3], float(config.pixel.sigma) * new.shape[1] / 256.0)
    titles = [f"{os.path.basename(files[i])} · {scores[i]:.3g}" for i in top]
    path = os.path.join(outdir, "overlays.png")
    plot_anomaly_overlays(new[top], np.zeros(full.shape, np.uint8), full, titles, path)
    return path
