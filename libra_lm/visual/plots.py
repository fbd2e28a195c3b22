"""The pictures of the attention analysis, drawn with matplotlib's object API (no pyplot state):
the difference curves of Fig. 4 b, c and the answer's attention over the image of Fig. 4 a."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from libra_tok.fileio import atomic_path

if TYPE_CHECKING:
    from PIL import Image


def plot_differences(results: Sequence[Any], path: str | Path) -> Path:
    """Two panels, cross-layer and inner-layer difference against the layer (1-based), one
    curve per model (`results`: objects with label, samples, cross_layer and inner_layer, as
    attention_maps.ModelAttention); written atomically."""
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    fig = Figure(figsize=(11, 4.2), dpi=100, layout="constrained")
    panels = fig.subplots(1, 2)
    for ax, key, title in ((panels[0], "cross_layer", "(b) cross-layer attention difference"),
                           (panels[1], "inner_layer", "(c) inner-layer attention difference")):
        for r in results:
            values = getattr(r, key)
            ax.plot(range(1, len(values) + 1), values, marker="o", markersize=3, label=f"{r.label} ({r.samples})")
        ax.set_xlabel("layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("difference (attention / global max)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(title="model (samples)")
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def save_heatmaps(path: str | Path, picture: Image.Image, maps: torch.Tensor, layers: Sequence[int],
                  title: str) -> Path:
    """The picture, then for each layer the attention `maps` (k, grid, grid) over it: each map
    scaled to its own maximum (the pattern, not the level, is what differs across layers),
    upsampled to the picture without smoothing (one square per patch); written atomically."""
    from matplotlib.figure import Figure

    image = np.asarray(picture.convert("RGB"))
    maps = maps.detach().float().cpu()
    k = maps.shape[0]
    fig = Figure(figsize=(2.6 * (k + 1), 3.0), dpi=100, layout="constrained")
    axes = fig.subplots(1, k + 1)
    axes[0].imshow(image)
    axes[0].set_title("image")
    extent = (0, image.shape[1], image.shape[0], 0)
    for ax, layer, m in zip(axes[1:], layers, maps, strict=True):
        ax.imshow(image, extent=extent)
        ax.imshow((m / m.max().clamp(min=1e-12)).numpy(), cmap="jet", alpha=0.5, extent=extent,
                  interpolation="nearest", vmin=0, vmax=1)
        ax.set_title(f"layer {layer}")
    for ax in axes:
        ax.set_axis_off()
    fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


__all__ = ["plot_differences", "save_heatmaps"]
