"""Pixel-level anomaly-localisation metrics: pixel AUROC and the PRO (per-region overlap) score.

PRO follows MVTec AD's definition (Bergmann et al., "The MVTec Anomaly
Detection Dataset", IJCV 2021) and its reference implementation:

* the ground truth of each image is split into connected components
  (``scipy.ndimage.label``, 8-connectivity as in the reference code);
* at a threshold t, PRO(t) = mean over ALL components (of all images) of the
  fraction of the component's pixels with score >= t, and FPR(t) = fraction of
  the normal pixels (mask 0, of every test image) with score >= t;
* the curve (FPR, PRO), starting at (0, 0), is integrated with the trapezoid
  rule from FPR 0 to ``max_fpr`` (the curve is interpolated linearly at exactly
  ``max_fpr``) and divided by ``max_fpr``, so a perfect map scores 1.0.

The curve is exact over every distinct threshold: scores are sorted once,
each anomalous pixel adds 1/(|C| * n_components) to PRO and each normal pixel
1/n_normal to FPR as the threshold passes it, and points are taken only where
the score changes (tied pixels enter together).
"""

from __future__ import annotations

import numpy as np
import scipy.ndimage
from sklearn.metrics import roc_auc_score

__all__ = ["pixel_auroc", "pro_curve", "pro_score", "integrate_to"]

_EIGHT = np.ones((3, 3), dtype=int)


def _check(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    m = np.asarray(masks)
    s = np.asarray(maps)
    if m.ndim != 3:
        raise ValueError(f"masks must be (N, H, W); got shape {m.shape}.")
    if s.shape != m.shape:
        raise ValueError(f"maps {s.shape} and masks {m.shape} differ in shape.")
    if m.size and not np.isin(m, (0, 1)).all():
        raise ValueError("masks must be 0/1 (or boolean).")
    m = m.astype(bool)
    if m.all() or not m.any():
        raise ValueError("masks must contain both normal and anomalous pixels.")
    if not np.issubdtype(s.dtype, np.floating):
        s = s.astype(np.float64)
    if not np.all(np.isfinite(s)):
        raise ValueError(f"maps contain {int(np.sum(~np.isfinite(s)))} NaN/Inf value(s).")
    return m, s


def pixel_auroc(masks: np.ndarray, maps: np.ndarray) -> float:
    """AUROC over all pixels of all images, anomalous pixels (mask 1) positive."""
    m, s = _check(masks, maps)
    return float(roc_auc_score(m.ravel(), s.ravel()))


def pro_curve(masks: np.ndarray, maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, pro) at every distinct threshold, from high to low, starting at (0, 0) and ending at (1, 1)."""
    m, s = _check(masks, maps)
    pro_step = np.zeros(m.shape, np.float64)
    n_components = 0
    labelled = []
    for i in range(m.shape[0]):
        lab, n = scipy.ndimage.label(m[i], structure=_EIGHT)
        labelled.append((lab, n))
        n_components += n
    for i, (lab, n) in enumerate(labelled):
        if n:
            sizes = np.bincount(lab.ravel(), minlength=n + 1).astype(np.float64)
            weight = np.zeros(n + 1)
            weight[1:] = 1.0 / (sizes[1:] * n_components)
            pro_step[i] = weight[lab]
    normal = ~m
    n_normal = int(normal.sum())

    order = np.argsort(s.ravel(), kind="stable")[::-1]  # descending score
    sorted_scores = s.ravel()[order]
    fp_count = np.cumsum(normal.ravel()[order], dtype=np.int64)
    pro = np.cumsum(pro_step.ravel()[order])
    del order
    last_of_run = np.append(sorted_scores[1:] != sorted_scores[:-1], True)
    fpr = fp_count[last_of_run] / n_normal
    pro = np.minimum(pro[last_of_run], 1.0)  # summation error only
    pro[-1] = 1.0  # every component is fully covered at the lowest threshold
    return np.concatenate([[0.0], fpr]), np.concatenate([[0.0], pro])


def integrate_to(x: np.ndarray, y: np.ndarray, x_max: float) -> float:
    """Trapezoid area under (x, y) for x in [x[0], x_max]; x non-decreasing, y interpolated at x_max."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    inside = int(np.searchsorted(x, x_max, side="right"))  # points with x <= x_max
    if inside == 0:
        return 0.0
    xs, ys = x[:inside], y[:inside]
    area = float(np.sum(0.5 * (ys[1:] + ys[:-1]) * np.diff(xs)))
    if inside < x.size and xs[-1] < x_max:
        x0, x1, y0, y1 = x[inside - 1], x[inside], y[inside - 1], y[inside]
        y_at = y0 + (y1 - y0) * (x_max - x0) / (x1 - x0)
        area += 0.5 * (y0 + y_at) * (x_max - x0)
    return area


def pro_score(masks: np.ndarray, maps: np.ndarray, max_fpr: float = 0.3) -> float:
    """Normalised area under the PRO curve up to FPR ``max_fpr`` (1.0 = perfect)."""
    if not 0.0 < max_fpr <= 1.0:
        raise ValueError(f"max_fpr must be in (0, 1]; got {max_fpr}.")
    fpr, pro = pro_curve(masks, maps)
    return integrate_to(fpr, pro, max_fpr) / max_fpr
