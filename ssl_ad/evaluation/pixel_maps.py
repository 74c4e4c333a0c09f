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

This module only makes maps (anomalib's anomaly-map stage); their metrics are in
:mod:`ssl_ad.evaluation.pixel_metrics`, the overlay figures in
:mod:`ssl_ad.evaluation.overlays`, and :mod:`ssl_ad.evaluation.pixel_eval` runs the
makers over the rounds of the MVTec protocols.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import scipy.ndimage

from ssl_ad.data.pipeline import preprocess_eval
from ssl_ad.data.sources import ImageSplit
from ssl_ad.evaluation import embedding
from ssl_ad.evaluation.features import cached_array, recon_fingerprint
from ssl_ad.evaluation.scorers import KNNScorer
from ssl_ad.methods import can_reconstruct

MAKERS = ("patch_knn", "mae_recon")

__all__ = [
    "MAKERS",
    "MapSource",
    "bank_indices",
    "patch_knn_maps",
    "patch_tokens",
    "recon_maps",
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
        """'patch_knn' always; 'mae_recon' when the method reconstructs and its decoder is loaded."""
        if maker == "mae_recon":
            return can_reconstruct(self.method, self.method_params)
        return True


def _in_chunks(images: np.ndarray, fn: Callable[[np.ndarray], np.ndarray], size: int, norm: Any, batch_size: int):
    """fn over preprocessed chunks of uint8 ``images`` (chunks are whole batches, so results do not
    depend on the chunking)."""
    bs = max(batch_size // jax.device_count(), 1) * jax.device_count()
    chunk = bs * max(1, 1024 // bs)
    out = [fn(preprocess_eval(images[i:i + chunk], size, norm.mean, norm.std)) for i in range(0, images.shape[0], chunk)]
    return np.concatenate(out, axis=0)


def patch_tokens(src: MapSource, images: np.ndarray, batch_size: int) -> np.ndarray:
    """(N, P, D) patch tokens (CLS dropped) of ``src``'s encoder for uint8 ``images`` (N, H, W, 3)."""
    fn = lambda x: embedding.embed_patch_tokens(src.model, src.params, x, batch_size)  # noqa: E731
    return _in_chunks(images, fn, src.model.image_size, src.norm, batch_size)


def recon_maps(src: MapSource, test: ImageSplit, num_masks: int, seed: int, batch_size: int,
               cache_path: Callable[[str, int, ImageSplit, str], str] | None = None) -> np.ndarray:
    """(N, grid, grid) float32 MAE reconstruction-error maps of ``test``, averaged over ``num_masks`` masks.

    With ``cache_path`` the maps share the cached file of the ``mae_recon`` scorer's features
    (same fingerprint), so they are computed once per checkpoint.
    """
    size = src.model.image_size

    def compute():
        fn = lambda x: embedding.reconstruction_error_maps(  # noqa: E731
            src.method, src.method_params, x, num_masks, seed, batch_size
        )
        err = _in_chunks(test.images, fn, size, src.norm, batch_size)
        return err.reshape(err.shape[0], -1)

    if cache_path is None:
        flat = compute()
    else:
        wanted = recon_fingerprint(src.method, src.method_params, test, size, src.norm, num_masks, seed, batch_size)
        flat, _ = cached_array(cache_path(src.name, src.step, test, f"recon{num_masks}-{size}px"), compute,
                               fingerprint=wanted)
    grid = int(round(flat.shape[1] ** 0.5))
    return flat.reshape(-1, grid, grid).astype(np.float32)
