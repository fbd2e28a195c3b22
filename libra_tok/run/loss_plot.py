"""`loss.png` of a run folder: the loss curves of its metrics log, drawn with matplotlib."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..fileio import atomic_path

# (metrics key, legend label, colour) of each curve; a trainer passes its own.
Series = Sequence[tuple[str, str, str]]


def plot_losses(rows: Sequence[dict[str, Any]], path: str | Path, series: Series, title: str) -> Path:
    """A PNG of the `series` found in the metric `rows` against their step (validation-like
    series, drawn from few rows, get markers). Written atomically."""
    # The object API, not pyplot: no global backend or figure state, safe inside any process.
    from matplotlib.figure import Figure

    points = {key: [(r["step"], r[key]) for r in rows if isinstance(r.get(key), (int, float))
                    and isinstance(r.get("step"), (int, float)) and math.isfinite(r[key])] for key, _, _ in series}
    fig = Figure(figsize=(9, 5.4), dpi=100)
    ax = fig.add_subplot()
    for key, label, colour in series:
        if points[key]:
            xs, ys = zip(*points[key], strict=True)
            ax.plot(xs, ys, label=label, color=colour, marker="o" if key.startswith("val") or len(xs) == 1 else None)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if any(points.values()):
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)
    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


__all__ = ["Series", "plot_losses"]
