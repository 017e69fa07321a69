"""Figures of the attention probes (paper Fig. 4-8) from a report of
:func:`megatron_spiral.analysis.probes.build_report`. Needs matplotlib (Agg backend, no display).

* ``distributions_{dynamic,all}.png`` — per metric (rows: entropy, LAM): a ridgeline of head-wise
  histograms per loop (left) and box plots per loop with the loop-wise mean as a black dot
  connected across loops (right). Fig. 4 / 6 (dynamic heads) and Fig. 8 (all heads).
* ``heatmaps.png`` — layer x head heatmaps of the cross-loop ranges Delta H and Delta LAM,
  min-max normalised per heatmap, dynamic heads boxed. Fig. 5 / 7.
"""

from __future__ import annotations

import os
from typing import Dict, List

import numpy as np

from megatron_spiral.analysis.probes import METRIC_LABELS, METRICS


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _loop_labels(report: dict) -> List[str]:
    return [f"t={loop['t']}  r={loop['resolution']}" for loop in report["loops"]]


def _head_values(report: dict, metric: str, heads: str) -> List[np.ndarray]:
    """Per loop, the sample-averaged values of the selected heads."""
    values = np.asarray(report["metrics"][metric]["values"])  # [T, layers, heads]
    if heads == "all":
        return [values[t].ravel() for t in range(values.shape[0])]
    chosen = report["metrics"][metric]["dynamic_heads"]
    rows = np.array([l for l, _ in chosen]), np.array([h for _, h in chosen])
    return [values[t][rows] for t in range(values.shape[0])]


def _ridgeline(ax, per_loop: List[np.ndarray], labels: List[str], xlabel: str) -> None:
    lo = min(float(v.min()) for v in per_loop)
    hi = max(float(v.max()) for v in per_loop)
    pad = max(1e-3, 0.05 * (hi - lo))
    edges = np.linspace(lo - pad, hi + pad, 25)
    colors = _colors(len(per_loop))
    for row, (values, label) in enumerate(zip(per_loop, labels)):
        counts, _ = np.histogram(values, bins=edges)
        height = counts / max(counts.max(), 1) * 0.9
        base = len(per_loop) - 1 - row  # coarse (t = 0) on top
        ax.fill_between(edges[:-1], base, base + height, step="post", color=colors[row], alpha=0.7)
        ax.step(edges[:-1], base + height, where="post", color="black", linewidth=0.6)
        ax.axhline(base, color="grey", linewidth=0.4)
    ax.set_yticks(range(len(per_loop)))
    ax.set_yticklabels(list(reversed(labels)), fontsize=8)
    ax.set_xlabel(xlabel)


def _boxes(ax, per_loop: List[np.ndarray], labels: List[str], ylabel: str) -> None:
    positions = np.arange(len(per_loop))
    parts = ax.boxplot(per_loop, positions=positions, widths=0.5, patch_artist=True, showfliers=True)
    for patch, color in zip(parts["boxes"], _colors(len(per_loop))):
        patch.set_facecolor(color)
        patch.set_alpha(0.7)
    means = [float(np.mean(v)) for v in per_loop]
    ax.plot(positions, means, "-o", color="black", markersize=4, linewidth=1, label="mean")
    ax.set_xticks(positions)
    ax.set_xticklabels([label.split("  ")[1] for label in labels], fontsize=8)
    ax.set_xlabel("loop (resolution)")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7, loc="best")


def _colors(n: int):
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(x) for x in np.linspace(0.15, 0.85, max(n, 1))]


def _title(report: dict) -> str:
    return (f"{report.get('model_kind', 'model')} {report.get('layout', '')} "
            f"({report.get('topology', '')})\n{report.get('num_samples', '?')} samples x "
            f"{report.get('seq_length', '?')} tokens")


def plot_distributions(report: dict, path: str, heads: str = "dynamic") -> None:
    """Fig. 4 style (``heads='dynamic'``) or Fig. 8 style (``heads='all'``)."""
    plt = _pyplot()
    labels = _loop_labels(report)
    fig, axes = plt.subplots(len(METRICS), 2, figsize=(10, 3.2 * len(METRICS)), squeeze=False)
    for row, metric in enumerate(METRICS):
        per_loop = _head_values(report, metric, heads)
        which = (f"dynamic heads (top {report['dynamic_fraction']:.0%} by cross-loop range)"
                 if heads == "dynamic" else "all heads")
        _ridgeline(axes[row][0], per_loop, labels, METRIC_LABELS[metric])
        axes[row][0].set_title(f"{METRIC_LABELS[metric]}: {which}", fontsize=9)
        _boxes(axes[row][1], per_loop, labels, METRIC_LABELS[metric])
        axes[row][1].set_title(f"{len(per_loop[0])} heads per loop", fontsize=9)
    fig.suptitle(_title(report), fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_heatmaps(report: dict, path: str) -> None:
    """Fig. 5 style: normalised Delta H and Delta LAM per (layer, head), dynamic heads boxed."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    layers, heads = report["num_layers"], report["num_heads"]
    fig, axes = plt.subplots(len(METRICS), 1, figsize=(max(6.0, 0.45 * heads + 2),
                                                       (0.45 * layers + 1.4) * len(METRICS)),
                             squeeze=False)
    for row, metric in enumerate(METRICS):
        ax = axes[row][0]
        grid = np.asarray(report["metrics"][metric]["range_normalized"])
        image = ax.imshow(grid, cmap="magma", vmin=0.0, vmax=1.0, aspect="auto")
        for layer, head in report["metrics"][metric]["dynamic_heads"]:
            ax.add_patch(Rectangle((head - 0.5, layer - 0.5), 1, 1, fill=False,
                                   edgecolor="black", linewidth=1.6))
            ax.add_patch(Rectangle((head - 0.45, layer - 0.45), 0.9, 0.9, fill=False,
                                   edgecolor="white", linewidth=0.6))
        ax.set_xticks(range(heads))
        ax.set_yticks(range(layers))
        ax.set_xlabel("head h")
        ax.set_ylabel("core layer l")
        symbol = "ΔH" if metric == "entropy" else "ΔLAM"
        ax.set_title(f"{symbol} (min-max normalised); boxes: dynamic heads", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(_title(report), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


FIGURES = {
    "distributions_dynamic.png": lambda report, path: plot_distributions(report, path, "dynamic"),
    "distributions_all.png": lambda report, path: plot_distributions(report, path, "all"),
    "heatmaps.png": plot_heatmaps,
}


def write_figures(report: dict, directory: str) -> Dict[str, str]:
    """Draw every figure into ``directory``; returns {name: path}."""
    paths = {}
    for name, draw in FIGURES.items():
        path = os.path.join(directory, name)
        draw(report, path)
        paths[name] = path
    return paths
