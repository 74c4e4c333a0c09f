"""PNG figures for evaluation reports.

Figures are drawn on an explicit Agg canvas (no pyplot), so plotting works on
headless machines and never touches global matplotlib state. Every function
writes one PNG to ``path`` (creating parent folders) and returns the path.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE

from ssl_ad.figures import new_figure as _new_figure
from ssl_ad.figures import save_figure as _save

__all__ = [
    "plot_roc_curves",
    "plot_auroc_bars",
    "plot_elbow",
    "plot_tsne",
    "stratified_sample",
]


def plot_roc_curves(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray, float]], title: str, path: str | Path
) -> Path:
    """One ROC line per round (as in the original study), AUROC in the legend."""
    fig = _new_figure(6, 5)
    ax = fig.add_subplot()
    for name, (fpr, tpr, auc) in curves.items():
        ax.plot(fpr, tpr, lw=1.5, label=f"{name} ({auc:.3f})")
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=1)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="False positive rate", ylabel="True positive rate", title=title)
    ax.legend(loc="lower right", fontsize="small", title="round (AUROC)")
    return _save(fig, path)


def plot_auroc_bars(
    table: Mapping[tuple[str, str], tuple[float, float]], path: str | Path, title: str = "Mean AUROC"
) -> Path:
    """Grouped bars: one group per feature source, one bar per scorer, std as error bars."""
    features = list(dict.fromkeys(f for f, _ in table))
    scorers = list(dict.fromkeys(s for _, s in table))
    width = 0.8 / max(len(scorers), 1)
    x = np.arange(len(features))
    fig = _new_figure(max(6.0, 1.2 * len(features) * max(len(scorers), 1) * 0.6), 4.5)
    ax = fig.add_subplot()
    for j, scorer in enumerate(scorers):
        means = [table.get((f, scorer), (np.nan, np.nan))[0] for f in features]
        stds = [table.get((f, scorer), (np.nan, np.nan))[1] for f in features]
        ax.bar(x + (j - (len(scorers) - 1) / 2) * width, means, width, yerr=stds, capsize=3, label=scorer)
    ax.axhline(0.5, ls="--", c="grey", lw=1)
    ax.set_xticks(x, features, rotation=20, ha="right")
    ax.set(ylim=(0, 1.05), ylabel="AUROC", title=title)
    ax.legend(fontsize="small", title="scorer")
    return _save(fig, path)


def plot_elbow(inertias: Mapping[int, float], chosen_k: int, path: str | Path) -> Path:
    """K-means inertia against k, with the elbow-chosen k marked."""
    ks = sorted(inertias)
    fig = _new_figure(5, 4)
    ax = fig.add_subplot()
    ax.plot(ks, [inertias[k] for k in ks], marker="o")
    if chosen_k in inertias:
        ax.plot([chosen_k], [inertias[chosen_k]], marker="o", ms=12, mfc="none", c="red", label=f"k={chosen_k}")
        ax.legend()
    ax.set(xlabel="k", ylabel="inertia (train)", title="Elbow")
    ax.set_xticks(ks)
    return _save(fig, path)


def stratified_sample(labels: np.ndarray, max_points: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``max_points`` rows, keeping class proportions.

    Quotas use largest-remainder rounding so they sum to exactly max_points.
    """
    labels = np.asarray(labels)
    n = labels.size
    if n <= max_points:
        return np.arange(n)
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = counts * max_points / n
    quota = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - quota), kind="stable")[: max_points - quota.sum()]:
        quota[i] += 1
    picked = [rng.choice(np.flatnonzero(labels == c), size=q, replace=False) for c, q in zip(classes, quota)]
    return np.sort(np.concatenate(picked))


def plot_tsne(
    features: np.ndarray,
    labels: np.ndarray,
    class_names: Sequence[str],
    path: str | Path,
    is_anomaly: np.ndarray | None = None,
    max_points: int = 2000,
    seed: int = 0,
    perplexity: float = 30.0,
    notes: list[str] | None = None,
) -> Path:
    """t-SNE of features (PCA to <=100 dims first), coloured by class and by anomaly.

    At most ``max_points`` stratified-random points are embedded to bound cost;
    perplexity is clamped to ``(n - 1) / 3`` (at least 1) so that it stays below
    the sample count, as t-SNE requires, and the clamp is appended to ``notes``.
    Fewer than 3 points cannot be embedded: ValueError.
    """
    features = np.asarray(features, dtype=np.float64)
    labels = np.asarray(labels)
    if max_points < 1:
        raise ValueError(f"max_points must be >= 1; got {max_points}.")
    idx = stratified_sample(labels, max_points, seed)
    x, y = features[idx], labels[idx]
    n = x.shape[0]
    if n < 3:
        raise ValueError(f"t-SNE needs at least 3 points; got {n}.")
    dims = min(100, n - 1, x.shape[1])
    z = PCA(n_components=dims, random_state=seed).fit_transform(x)
    clamped = min(perplexity, max(1.0, (n - 1) / 3))
    if clamped < perplexity and notes is not None:
        notes.append(f"perplexity clamped from {perplexity:g} to {clamped:g} ({n} points).")
    perplexity = clamped
    emb = TSNE(n_components=2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(z)

    panels = 1 if is_anomaly is None else 2
    fig = _new_figure(6 * panels, 5)
    ax = fig.add_subplot(1, panels, 1)
    for c in np.unique(y):
        m = y == c
        ax.scatter(emb[m, 0], emb[m, 1], s=6, label=str(class_names[int(c)]))
    ax.set(title="by class", xticks=[], yticks=[])
    ax.legend(fontsize="x-small", markerscale=2)
    if is_anomaly is not None:
        a = np.asarray(is_anomaly, dtype=bool)[idx]
        ax = fig.add_subplot(1, panels, 2)
        ax.scatter(emb[~a, 0], emb[~a, 1], s=6, c="tab:blue", label="normal")
        ax.scatter(emb[a, 0], emb[a, 1], s=6, c="tab:red", label="anomalous")
        ax.set(title="normal vs anomalous", xticks=[], yticks=[])
        ax.legend(fontsize="x-small", markerscale=2)
    return _save(fig, path)
