"""Pictures written at the end of training: learning curves from the metrics CSV and a cross-attention
map over a sample image. matplotlib (Agg backend) is imported only here, inside the functions."""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from pathlib import Path

from torch import Tensor

__all__ = ["plot_attention", "plot_learning_curves", "read_metrics"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``metrics.csv`` → ``{name: [(step, value), ...]}`` for every non-empty numeric cell."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            step = int(float(row.get("step") or 0))
            for key, value in row.items():
                if key in ("step", "epoch") or value in ("", None):
                    continue
                try:
                    series[key].append((step, float(value)))
                except ValueError:
                    continue
    return dict(series)


def plot_learning_curves(metrics_csv: str | Path, out_path: str | Path) -> Path | None:
    """One panel per metric (``loss``, ``acc``, …), the train/val/test variants of it overlaid, against
    the optimizer step. Returns the PNG path, or None when the CSV holds no curves yet."""
    series = read_metrics(metrics_csv)
    groups: dict[str, dict[str, list[tuple[int, float]]]] = defaultdict(dict)
    for key, points in series.items():
        split, _, metric = key.partition("/")
        if not metric:
            split, metric = "", key
        if metric.endswith("_step"):  # keep the smoother per-epoch copies when both exist
            continue
        groups[metric.removesuffix("_epoch")][split or metric] = points
    groups = {k: v for k, v in groups.items() if any(len(p) for p in v.values())}
    if not groups:
        return None
    plt = _pyplot()
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.5 * cols, 3.2 * rows), squeeze=False)
    for ax, (metric, lines) in zip(axes.flat, sorted(groups.items())):
        for split, points in sorted(lines.items()):
            steps, values = zip(*sorted(points))
            style = "-" if len(points) > 1 else "o"
            ax.plot(steps, values, style, label=split, markersize=4)
        ax.set_title(metric)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(groups):]:
        ax.axis("off")
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path


def plot_attention(
    image: Tensor, weights: Tensor, out_path: str | Path, *, title: str = "", num_latents: int = 7
) -> Path:
    """The image, the attention averaged over heads and latents, and a few single latents.

    Args:
        image: ``[H, W, C]`` in ``[0, 1]`` (display range), channels last.
        weights: ``[heads, num_latents, h, w]`` from :func:`~perceivers.train.attention.cross_attention_maps`.
    """
    plt = _pyplot()
    image = image.detach().float().cpu().clamp(0, 1)
    weights = weights.detach().float().cpu().mean(0)  # [N, h, w]
    # latents with the most peaked (lowest-entropy) attention are the most telling
    flat = weights.flatten(1)
    entropy = -(flat * flat.clamp_min(1e-12).log()).sum(-1)
    chosen = entropy.argsort()[: max(0, min(num_latents, weights.shape[0]))].tolist()
    panels = 2 + len(chosen)
    fig, axes = plt.subplots(1, panels, figsize=(2.4 * panels, 2.7))
    shown = image[..., 0] if image.shape[-1] == 1 else image
    axes[0].imshow(shown, cmap="gray" if image.shape[-1] == 1 else None)
    axes[0].set_title("input")
    extent = (0, image.shape[1], image.shape[0], 0)
    axes[1].imshow(shown, cmap="gray" if image.shape[-1] == 1 else None)
    axes[1].imshow(weights.mean(0), alpha=0.6, cmap="inferno", extent=extent, interpolation="nearest")
    axes[1].set_title("mean over latents")
    for ax, index in zip(axes[2:], chosen):
        ax.imshow(weights[index], cmap="inferno", interpolation="nearest")
        ax.set_title(f"latent {index}")
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_path, dpi=110)
    plt.close(fig)
    return out_path
