"""Pixel-level evaluation over the rounds of the MVTec protocols: for each map source and maker
(:mod:`ssl_ad.evaluation.pixel_maps`), maps at the masks' resolution, then image AUROC from the
map maximum, pixel AUROC and PRO (:mod:`ssl_ad.evaluation.pixel_metrics`, over the test images
whose masks are ground truth: ``ImageSplit.mask_valid``) per round, and overlay
figures (:mod:`ssl_ad.evaluation.overlays`). A round that fails is recorded in its row's
``failed_rounds`` and the other rounds go on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from ssl_ad.config_lists import as_names
from ssl_ad.data.sources import ImageSplit
from ssl_ad.evaluation import embedding, metrics
from ssl_ad.evaluation.overlays import round_overlays
from ssl_ad.evaluation.pixel_maps import (
    MAKERS,
    MapSource,
    bank_indices,
    patch_knn_maps,
    patch_tokens,
    recon_maps,
    upsample_maps,
)
from ssl_ad.evaluation.pixel_metrics import pixel_auroc, pro_score
from ssl_ad.evaluation.features import random_init_baselines
from ssl_ad.evaluation.protocols import Round

log = logging.getLogger(__name__)


def _summarise(per_round: dict[str, float]) -> tuple[float, float]:
    """metrics.summarise over the rounds that worked; NaN when none did."""
    return metrics.summarise(per_round) if per_round else (float("nan"), float("nan"))


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
        return patch_tokens(src, split.images, self.batch_size)

    def _recon(self, src: MapSource) -> np.ndarray:
        return recon_maps(src, self.test, int(self.config.mae_recon.num_masks), self.seed, self.batch_size,
                          self.cache_path)

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

    def _mask_valid(self, test_idx: np.ndarray, left_out: set[int]) -> np.ndarray:
        """(len(test_idx),) bool: which of these test images have ground-truth masks (ImageSplit.mask_valid);
        the others are added to ``left_out``."""
        if self.test.mask_valid is None:
            return np.ones(test_idx.shape[0], bool)
        valid = self.test.mask_valid[test_idx]
        left_out.update(int(j) for j in test_idx[~valid])
        return valid

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
        left_out: set[int] = set()  # test images without ground-truth masks, left out of the pixel metrics
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
                    valid = self._mask_valid(rnd.test_idx, left_out)
                    pix_auc[rnd.name] = pixel_auroc(masks[valid], maps[valid])
                    pro[rnd.name] = pro_score(masks[valid], maps[valid], self.max_fpr)
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
        if left_out:
            without = test.info.get("defects_without_masks", [])
            warnings.append(f"pixel AUROC and PRO leave out {len(left_out)} test image(s) of defect type(s) without "
                            f"ground-truth masks {without}; image AUROC uses them.")
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
        return round_overlays(self.test, f"{src.name}_{maker}", protocol, rnd, maps, scores, self.overlays, plot_dir)


def map_sources(config: Any, checkpoints: Sequence[Any]) -> list[MapSource]:
    """The models to make pixel maps with: the random-init baselines (when ``config.sources`` has
    'random_init'; one per architecture, see ``random_init_baselines``) and each loaded checkpoint
    (DINO: the encoder named by ``config.which``)."""
    sources = []
    if "random_init" in as_names(config.sources, "sources"):
        for b in random_init_baselines(checkpoints, config):
            sources.append(MapSource(b.name, 0, b.model, embedding.random_init_params(b.model, config.seed), b.norm))
    for loaded in checkpoints:
        which = config.which if loaded.config.method == "dino" else "default"
        sources.append(MapSource(loaded.name, loaded.step, loaded.encoder(), loaded.encoder_params(which),
                                 loaded.config.data, loaded.method, loaded.params))
    return sources
