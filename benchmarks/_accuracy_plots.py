"""Figures of ``benchmarks/accuracy.py`` (matplotlib, Agg backend; imported only when drawing).

Every function takes plain numpy arrays / dicts and writes one PNG.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def reliability(bins: dict[str, dict], path: Path, title: str) -> None:
    """One reliability diagram per method: accuracy per confidence bin (bars) against the
    diagonal; ``bins[name]`` = ``metrics.reliability_bins`` output (lists are fine)."""
    plt = _plt()
    names = list(bins)
    cols = min(5, max(1, len(names)))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, name in zip(axes.ravel(), names):
        b = bins[name]
        edges = np.asarray(b["edges"], float)
        acc = np.asarray(b["accuracy"], float)
        conf = np.asarray(b["confidence"], float)
        width = edges[1] - edges[0]
        ax.axis("on")
        ax.bar(edges[:-1], np.nan_to_num(acc), width=width, align="edge", color="tab:blue",
               edgecolor="k", linewidth=0.4, label="accuracy")
        gap = np.nan_to_num(conf - acc)
        ax.bar(edges[:-1], gap, bottom=np.nan_to_num(acc), width=width, align="edge",
               color=np.where(gap > 0, "tab:orange", "tab:purple"), alpha=0.45,
               label="gap to confidence (orange: over-, purple: underconfident)")
        ax.plot([0, 1], [0, 1], "r--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_title(f"{name}\nECE {100 * b.get('ece', float('nan')):.1f} %", fontsize=8)
        ax.tick_params(labelsize=6)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def confusions(true_cm: np.ndarray, estimated: dict[str, np.ndarray], kinds, path: Path,
               title: str) -> None:
    """Rows: the true (empirical) CMs, then each method's estimate; columns: raters.
    Each cell a 2×2 matrix ``[i, j] = p(says i | true j)`` with its numbers."""
    plt = _plt()
    rows = [("true (empirical)", np.asarray(true_cm))] + [(k, np.asarray(v)) for k, v in estimated.items()]
    R = len(kinds)
    fig, axes = plt.subplots(len(rows), R, figsize=(1.6 * R, 1.6 * len(rows)), squeeze=False)
    for i, (name, cm) in enumerate(rows):
        for r in range(R):
            ax = axes[i, r]
            ax.imshow(cm[r], vmin=0, vmax=1, cmap="viridis")
            for a in range(cm.shape[1]):
                for b in range(cm.shape[2]):
                    ax.text(b, a, f"{cm[r, a, b]:.2f}", ha="center", va="center", fontsize=6,
                            color="w" if cm[r, a, b] < 0.6 else "k")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(kinds[r], fontsize=8)
            if r == 0:
                ax.set_ylabel(name, fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gallery(images: np.ndarray, raters: np.ndarray, reference: np.ndarray, ref_name: str,
            preds: dict[str, dict[str, np.ndarray]], path: Path, title: str,
            rater_names=None) -> None:
    """For each case three rows: image, raters and reference; each method's truth; each
    method's uncertainty (normalised entropy, magma, 0..1). ``preds[name]`` holds
    ``truth`` and ``uncertainty`` ``(K, H, W)``."""
    plt = _plt()
    K, R = raters.shape[:2]
    names = list(preds)
    cols = max(len(names), R + 2)
    fig, axes = plt.subplots(3 * K, cols, figsize=(1.1 * cols, 1.15 * 3 * K), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for k in range(K):
        names_r = list(rater_names) if rater_names is not None else [f"rater {r + 1}" for r in range(R)]
        top = [("image", images[k], "gray")] + [(names_r[r], raters[k, r], "gray")
                                                for r in range(R)] + [(ref_name, reference[k], "gray")]
        for c, (label, arr, cmap) in enumerate(top):
            ax = axes[3 * k, c]
            ax.imshow(arr, cmap=cmap, vmin=0 if label != "image" else None,
                      vmax=1 if label != "image" else None)
            ax.set_title(label, fontsize=6)
        for c, name in enumerate(names):
            ax = axes[3 * k + 1, c]
            ax.imshow(preds[name]["truth"][k], cmap="gray", vmin=0, vmax=1)
            ax.set_title(f"{name}: truth", fontsize=5)
            ax = axes[3 * k + 2, c]
            ax.imshow(preds[name]["uncertainty"][k], cmap="magma", vmin=0, vmax=1)
            ax.set_title("uncertainty", fontsize=5)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=70)
    plt.close(fig)


def sweep(levels: list[float], rater_dice: list[float], dice: dict[str, list[float]], path: Path,
          title: str) -> None:
    """Dice vs truth of each method against the raters' mean Dice at each noise level
    (the CM paper's figure 4)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    order = np.argsort(rater_dice)
    x = np.asarray(rater_dice)[order]
    for name, ys in dice.items():
        y = np.asarray(ys, float)[order]
        ax.plot(x, y, marker="o", label=name, linestyle="--" if name.startswith("fusion:") else "-")
    ax.set_xlabel("raters' mean Dice vs truth (%)")
    ax.set_ylabel("Dice vs truth (%)")
    for xi, lv in zip(x, np.asarray(levels)[order]):
        ax.annotate(f"×{lv:g}", (xi, ax.get_ylim()[0]), fontsize=6, ha="center", va="bottom")
    ax.legend(fontsize=6, ncol=2)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
