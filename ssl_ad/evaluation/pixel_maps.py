"""Pixel-level anomaly maps at the resolution of a split's ground-truth masks, and their evaluation.

Two map makers, both giving (N, H, W) float32 maps (H, W = the masks' size):

* ``patch_knn``: patch tokens of a ViT (CLS dropped); the memory bank is every
  patch token of the round's training (good) images, subsampled
  deterministically to ``pixel.max_bank`` tokens when larger; a test token's
  score is its mean distance to its ``pixel.k`` nearest bank tokens (the chunked
  JAX kNN of :class:`~ssl_ad.evaluation.scorers.KNNScorer`, ``pixel.metric``).
* ``mae_recon``: the MAE per-patch reconstruction error averaged over
  ``mae_recon.num_masks`` random masks (checkpoints whose method has
  ``reconstruction_error`` only).

The (grid, grid) maps are upsampled bilinearly (half-pixel centres, edges
clamped, like ``align_corners=False``) to the mask size — the model sees the
whole image resized, so the grid covers the whole mask — then smoothed with a
Gaussian of ``pixel.sigma`` pixels (0 = none).

:class:`PixelEvaluator` runs the makers over the rounds of the MVTec protocols
and returns result rows (image AUROC from the map maximum, pixel AUROC, PRO)
plus overlay figures.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.ndimage

from ssl_ad.data.pipeline import preprocess_eval
from ssl_ad.data.sources import ImageSplit
from ssl_ad.evaluation import embedding, metrics, plots
from ssl_ad.evaluation.features import cached_array, recon_fingerprint
from ssl_ad.evaluation.pixel_metrics import pixel_auroc, pro_score
from ssl_ad.evaluation.protocols import Round
from ssl_ad.evaluation.scorers import KNNScorer

log = logging.getLogger(__name__)

MAKERS = ("patch_knn", "mae_recon")

__all__ = [
    "MAKERS",
    "MapSource",
    "PixelEvaluator",
    "bank_indices",
    "patch_knn_maps",
    "upsample_maps",
]


# ---------------------------------------------------------------------------
# Map making


def _interp_matrix(n_out: int, n_in: int) -> np.ndarray:
    """(n_out, n_in) linear-interpolation weights, half-pixel centres, clamped at the edges."""
    src = np.clip((np.arange(n_out) + 0.5) * (n_in / n_out) - 0.5, 0.0, n_in - 1)
    i0 = np.floor(src).astype(np.int64)
    i1 = np.minimum(i0 + 1, n_in - 1)
    w = src - i0
    m = np.zeros((n_out, n_in), np.float64)
    rows = np.arange(n_out)
    np.add.at(m, (rows, i0), 1.0 - w)
    np.add.at(m, (rows, i1), w)
    return m


def upsample_maps(maps: np.ndarray, size: tuple[int, int], sigma: float = 0.0) -> np.ndarray:
    """(N, gh, gw) -> (N, H, W) float32: bilinear upsampling, then Gaussian smoothing (sigma in pixels)."""
    maps = np.asarray(maps, np.float32)
    if maps.ndim != 3:
        raise ValueError(f"maps must be (N, gh, gw); got shape {maps.shape}.")
    wy = _interp_matrix(int(size[0]), maps.shape[1]).astype(np.float32)
    wx = _interp_matrix(int(size[1]), maps.shape[2]).astype(np.float32)
    out = np.matmul(np.matmul(wy, maps), wx.T)
    if sigma and sigma > 0:
        out = scipy.ndimage.gaussian_filter(out, sigma=(0.0, float(sigma), float(sigma)))
    return out.astype(np.float32, copy=False)


def bank_indices(n_images: int, n_tokens: int, max_bank: int | None, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image, token) positions of the memory bank: all tokens, or ``max_bank`` of them (seeded, sorted)."""
    total = n_images * n_tokens
    if not max_bank or total <= max_bank:
        flat = np.arange(total, dtype=np.int64)
    else:
        flat = np.sort(np.random.default_rng(seed).choice(total, size=int(max_bank), replace=False))
    return flat // n_tokens, flat % n_tokens


def patch_knn_maps(
    bank: np.ndarray,
    test_tokens: np.ndarray,
    k: int = 1,
    metric: str = "l2",
    images_per_chunk: int | None = None,
) -> np.ndarray:
    """Mean distance of each test patch token to its ``k`` nearest bank tokens, as (N, grid, grid).

    ``bank`` is (M, D); ``test_tokens`` (N, P, D) with P a square number. Test
    images are scored in chunks so the float64 copies the scorer makes stay small.
    """
    n, p, d = test_tokens.shape
    grid = int(round(p**0.5))
    if grid * grid != p:
        raise ValueError(f"{p} patch tokens do not form a square grid.")
    scorer = KNNScorer(k=k, metric=metric, chunk_size=2048, train_chunk_size=4096, pca_dims=None).fit(bank)
    step = images_per_chunk or max(1, 65536 // p)
    out = [
        scorer.score(test_tokens[i:i + step].reshape(-1, d)).reshape(-1, grid, grid)
        for i in range(0, n, step)
    ]
    return np.concatenate(out, axis=0).astype(np.float32) if out else np.zeros((0, grid, grid), np.float32)


# ---------------------------------------------------------------------------
# Evaluation over protocol rounds


def _summarise(per_round: dict[str, float]) -> tuple[float, float]:
    """metrics.summarise over the rounds that worked; NaN when none did."""
    return metrics.summarise(per_round) if per_round else (float("nan"), float("nan"))


@dataclasses.dataclass
class MapSource:
    """One model to make maps with: an encoder (for patch_knn) and, for MAE checkpoints, its method."""

    name: str
    step: int
    model: Any
    params: Any
    norm: Any  # has .mean and .std (the training data config)
    method: Any = None
    method_params: Any = None

    def makes(self, maker: str) -> bool:
        if maker == "mae_recon":
            return (
                self.method is not None
                and hasattr(self.method, "reconstruction_error")
                and "decoder" in (self.method_params or {})
            )
        return True


def _in_chunks(images: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], size: int, norm: Any, batch_size: int):
    """fn over preprocessed chunks of uint8 ``images`` (chunks are whole batches, so results do not
    depend on the chunking)."""
    import jax

    bs = max(batch_size // jax.device_count(), 1) * jax.device_count()
    chunk = bs * max(1, 1024 // bs)
    out = [fn(preprocess_eval(images[i:i + chunk], size, norm.mean, norm.std)) for i in range(0, images.shape[0], chunk)]
    return np.concatenate(out, axis=0)


def _overlay_picks(is_anomaly: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` positions: anomalous images evenly spread, plus one normal image when there is room."""
    if n <= 0:
        return np.zeros((0,), np.int64)
    bad, good = np.flatnonzero(is_anomaly), np.flatnonzero(~is_anomaly)
    n_bad = min(bad.size, n - 1 if (good.size and n > 1) else n)
    picks = list(bad[np.linspace(0, bad.size - 1, n_bad).round().astype(int)]) if n_bad else []
    picks += list(good[: n - len(picks)])
    return np.asarray(sorted(set(int(i) for i in picks)), np.int64)


class PixelEvaluator:
    """Pixel-level maps and metrics of each source on every round of the MVTec protocols."""

    def __init__(
        self,
        config: Any,
        train: ImageSplit,
        test: ImageSplit,
        makers: Sequence[str],
        cache_path: Callable[[str, int, ImageSplit, str], str] | None = None,
    ):
        unknown = [m for m in makers if m not in MAKERS]
        if unknown:
            raise ValueError(f"unknown pixel map maker(s) {unknown}; choose from {list(MAKERS)}")
        if test.masks is None or test.is_anomaly is None:
            raise ValueError(f"split {test.name}/{test.split} has no ground-truth masks")
        self.config, self.train, self.test, self.makers = config, train, test, list(makers)
        self.cache_path = cache_path
        px = config.pixel
        self.k = int(px.k)
        self.max_bank = int(px.max_bank) or None
        self.sigma = float(px.sigma)
        self.overlays = int(px.overlays)
        self.metric = str(px.get("metric", "l2"))
        self.max_fpr = float(px.get("max_fpr", 0.3))
        self.seed = int(config.seed)
        self.batch_size = int(config.batch_size)
        self.size = (int(test.masks.shape[1]), int(test.masks.shape[2]))

    # -- low-resolution maps -------------------------------------------------

    def _tokens(self, src: MapSource, split: ImageSplit) -> np.ndarray:
        fn = lambda x: embedding.embed_patch_tokens(src.model, src.params, x, self.batch_size)  # noqa: E731
        return _in_chunks(split.images, fn, src.model.image_size, src.norm, self.batch_size)

    def _recon(self, src: MapSource) -> np.ndarray:
        masks = int(self.config.mae_recon.num_masks)
        size = src.model.image_size

        def compute():
            fn = lambda x: embedding.reconstruction_error_maps(  # noqa: E731
                src.method, src.method_params, x, masks, self.seed, self.batch_size
            )
            err = _in_chunks(self.test.images, fn, size, src.norm, self.batch_size)
            return err.reshape(err.shape[0], -1)

        if self.cache_path is None:
            flat = compute()
        else:  # shares the file the mae_recon scorer's features use
            wanted = recon_fingerprint(src.method, src.method_params, self.test, size, src.norm, masks, self.seed,
                                       self.batch_size)
            flat, _ = cached_array(self.cache_path(src.name, src.step, self.test, f"recon{masks}-{size}px"), compute,
                                   fingerprint=wanted)
        grid = int(round(flat.shape[1] ** 0.5))
        return flat.reshape(-1, grid, grid).astype(np.float32)

    # -- rows ----------------------------------------------------------------

    def evaluate(
        self, sources: Sequence[MapSource], protocol_rounds: dict[str, list[Round]], plot_dir: str
    ) -> tuple[list[dict[str, Any]], list[str]]:
        rows, paths = [], []
        for src in sources:
            makers = [m for m in self.makers if src.makes(m)]
            if not makers:
                continue
            t0 = time.perf_counter()
            tokens = None
            if "patch_knn" in makers:
                tokens = (self._tokens(src, self.train), self._tokens(src, self.test))
            recon = self._recon(src) if "mae_recon" in makers else None
            prep_s = time.perf_counter() - t0
            log.info("pixel maps %s: tokens/recon in %.1f s", src.name, prep_s)
            for maker in makers:
                for protocol, rounds in protocol_rounds.items():
                    row, p = self._rows(src, maker, protocol, rounds, tokens, recon, plot_dir)
                    row["fit_seconds"] += prep_s / max(len(protocol_rounds), 1)
                    rows.append(row)
                    paths += p
            del tokens, recon
        return rows, paths

    def _lowres(self, maker: str, train_idx: np.ndarray, test_idx: np.ndarray, tokens, recon) -> tuple[np.ndarray, dict]:
        if maker == "mae_recon":
            return recon[test_idx], {}
        train_tokens, test_tokens = tokens
        img, tok = bank_indices(train_idx.size, train_tokens.shape[1], self.max_bank, self.seed)
        bank = train_tokens[train_idx[img], tok]
        maps = patch_knn_maps(bank, test_tokens[test_idx], k=self.k, metric=self.metric)
        return maps, {"bank_tokens": int(bank.shape[0]), "total_tokens": int(train_idx.size * train_tokens.shape[1])}

    def _rows(self, src, maker, protocol, rounds, tokens, recon, plot_dir) -> tuple[dict[str, Any], list[str]]:
        test = self.test
        groups: dict[bytes, list[Round]] = {}
        for rnd in rounds:  # rounds fit on the same images share one bank (mvtec_study: all of them)
            groups.setdefault(b"" if maker == "mae_recon" else rnd.train_idx.tobytes(), []).append(rnd)
        img_auc, img_ap, pix_auc, pro, banks, failed, warnings = {}, {}, {}, {}, [], {}, []
        fit_s = score_s = 0.0
        paths = []
        for members in groups.values():
            try:  # a round that fails is recorded in failed_rounds; the other rounds go on
                t0 = time.perf_counter()
                union = np.unique(np.concatenate([r.test_idx for r in members]))
                low, info = self._lowres(maker, members[0].train_idx, union, tokens, recon)
                banks.append(info)
                full = upsample_maps(low, self.size, self.sigma)
                fit_s += time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001
                failed.update({rnd.name: f"{type(e).__name__}: {e}" for rnd in members})
                log.warning("%s %s %s: rounds %s failed: %s", src.name, maker, protocol, list(failed), e)
                continue
            where = {int(j): i for i, j in enumerate(union)}
            for rnd in members:
                try:
                    t1 = time.perf_counter()
                    maps = full[[where[int(j)] for j in rnd.test_idx]]
                    masks = test.masks[rnd.test_idx]
                    scores = maps.reshape(maps.shape[0], -1).max(axis=1)
                    img_auc[rnd.name] = metrics.auroc(rnd.test_is_anomaly, scores)
                    img_ap[rnd.name] = metrics.aupr(rnd.test_is_anomaly, scores)
                    pix_auc[rnd.name] = pixel_auroc(masks, maps)
                    pro[rnd.name] = pro_score(masks, maps, self.max_fpr)
                    score_s += time.perf_counter() - t1
                except Exception as e:  # noqa: BLE001
                    for d in (img_auc, img_ap, pix_auc, pro):
                        d.pop(rnd.name, None)
                    failed[rnd.name] = f"{type(e).__name__}: {e}"
                    log.warning("%s %s %s: round %r failed: %s", src.name, maker, protocol, rnd.name, e)
                    continue
                if self.overlays:
                    try:
                        paths.append(self._overlay(src, maker, protocol, rnd, maps, scores, plot_dir))
                    except Exception as e:  # noqa: BLE001 - a figure never costs the numbers
                        warnings.append(f"overlay of round {rnd.name!r} failed: {type(e).__name__}: {e}")
        if maker == "patch_knn" and banks and min(b["bank_tokens"] for b in banks) < self.k:
            warnings.append(f"pixel.k clamped from {self.k} to the smallest bank, {min(b['bank_tokens'] for b in banks)} tokens.")
        mean, std = _summarise(img_auc)
        pmean, pstd = _summarise(pix_auc)
        rmean, rstd = _summarise(pro)
        row = {
            "feature": src.name,
            "scorer": f"pixel_{maker}",
            "protocol": protocol,
            "mean_auroc": mean,
            "std_auroc": std,
            "mean_aupr": float(np.mean(list(img_ap.values()))) if img_ap else float("nan"),
            "per_round": img_auc,
            "mean_pixel_auroc": pmean,
            "std_pixel_auroc": pstd,
            "mean_pro": rmean,
            "std_pro": rstd,
            "per_round_pixel_auroc": pix_auc,
            "per_round_pro": pro,
            "pro_max_fpr": self.max_fpr,
            "map_sigma": self.sigma,
            "fit_seconds": fit_s,
            "score_seconds": score_s,
            "warnings": warnings,
            "failed_rounds": failed,
        }
        if maker == "patch_knn" and banks:  # the largest round's bank
            row.update({"pixel_k": self.k, "pixel_metric": self.metric,
                        "bank_tokens": max(b["bank_tokens"] for b in banks),
                        "bank_tokens_before_subsampling": max(b["total_tokens"] for b in banks)})
        log.info("%-12s %-16s %-12s image AUROC %.3f  pixel AUROC %.3f  PRO %.3f", src.name, row["scorer"],
                 protocol, mean, pmean, rmean)
        return row, paths

    def _overlay(self, src, maker, protocol, rnd: Round, maps, scores, plot_dir) -> str:
        test = self.test
        pick = _overlay_picks(rnd.test_is_anomaly, self.overlays)
        idx = rnd.test_idx[pick]
        names = test.class_names
        titles = [
            f"{names[int(test.labels[j])] if int(test.labels[j]) < len(names) else test.labels[j]}"
            f"{' (defect)' if rnd.test_is_anomaly[i] else ''} · {scores[i]:.3g}"
            for i, j in zip(pick, idx)
        ]
        safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{src.name}_{maker}_{rnd.name}")
        path = os.path.join(plot_dir, "pixel", protocol, f"{safe}.png")
        return str(plots.plot_anomaly_overlays(test.images[idx], test.masks[idx], maps[pick], titles, path))
