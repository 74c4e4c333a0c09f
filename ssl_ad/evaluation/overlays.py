"""Overlay figures of pixel-level anomaly maps (the visualiser of anomalib's map / metric /
visualiser split): the image with its ground-truth contour, and the map over it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ssl_ad.figures import new_figure, save_figure


def plot_anomaly_overlays(
    images: np.ndarray, masks: np.ndarray, maps: np.ndarray, titles: Sequence[str], path: str | Path
) -> Path:
    """One column per image: the image with the ground-truth contour (red), then the anomaly map
    (one colour scale for all columns, so columns compare) over the image with the same contour.

    ``images`` (n, H, W, 3) uint8 or floats in [0, 1]; ``masks`` (n, H, W) 0/1; ``maps`` (n, H, W).
    """
    images, masks, maps = np.asarray(images), np.asarray(masks), np.asarray(maps, dtype=np.float32)
    n = images.shape[0]
    if n == 0:
        raise ValueError("no images to plot.")
    if masks.shape != images.shape[:3] or maps.shape != masks.shape or len(titles) != n:
        raise ValueError(
            f"images {images.shape}, masks {masks.shape}, maps {maps.shape} and {len(titles)} titles disagree."
        )
    if images.dtype == np.uint8:
        images = images.astype(np.float32) / 255.0
    finite = maps[np.isfinite(maps)]
    vmin, vmax = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    fig = new_figure(2.2 * n + 0.6, 4.6)
    axes = fig.subplots(2, n, squeeze=False)
    for j in range(n):
        for i in range(2):
            ax = axes[i, j]
            ax.imshow(np.clip(images[j], 0.0, 1.0))
            if i == 1:
                im = ax.imshow(maps[j], cmap="jet", alpha=0.5, vmin=vmin, vmax=vmax)
            if masks[j].any():
                ax.contour(masks[j].astype(np.float32), levels=[0.5], colors="red", linewidths=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
        axes[0, j].set_title(str(titles[j]), fontsize="small")
    axes[0, 0].set_ylabel("image · ground truth")
    axes[1, 0].set_ylabel("anomaly map")
    fig.colorbar(im, ax=axes[1, :].tolist(), fraction=0.04, pad=0.02)
    return save_figure(fig, path)


def overlay_picks(is_anomaly: np.ndarray, n: int) -> np.ndarray:
    """Up to ``n`` positions into ``is_anomaly`` (bool, (N,)): anomalous images evenly spread, plus one
    normal image when there is room; sorted, int64."""
    if n <= 0:
        return np.zeros((0,), np.int64)
    bad, good = np.flatnonzero(is_anomaly), np.flatnonzero(~is_anomaly)
    n_bad = min(bad.size, n - 1 if (good.size and n > 1) else n)
    picks = list(bad[np.linspace(0, bad.size - 1, n_bad).round().astype(int)]) if n_bad else []
    picks += list(good[: n - len(picks)])
    return np.asarray(sorted(set(int(i) for i in picks)), np.int64)


def round_overlays(test: Any, name: str, protocol: str, rnd: Any, maps: np.ndarray, scores: np.ndarray, n: int,
                   plot_dir: str) -> str:
    """The overlay figure of one protocol round: ``plot_dir/pixel/<protocol>/<name>_<round>.png``.

    ``test`` is the ImageSplit (images, masks, labels, class_names); ``rnd`` a protocol Round whose
    ``test_idx`` (R,) indexes ``test``; ``maps`` (R, H, W) and ``scores`` (R,) follow ``rnd.test_idx``;
    ``n`` is the number of columns (see :func:`overlay_picks`). Returns the path written.
    """
    pick = overlay_picks(rnd.test_is_anomaly, n)
    idx = rnd.test_idx[pick]
    names = test.class_names
    titles = [
        f"{names[int(test.labels[j])] if int(test.labels[j]) < len(names) else test.labels[j]}"
        f"{' (defect)' if rnd.test_is_anomaly[i] else ''} · {scores[i]:.3g}"
        for i, j in zip(pick, idx)
    ]
    safe = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in f"{name}_{rnd.name}")
    path = os.path.join(plot_dir, "pixel", protocol, f"{safe}.png")
    return str(plot_anomaly_overlays(test.images[idx], test.masks[idx], maps[pick], titles, path))
