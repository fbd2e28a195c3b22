"""Libra vs HoVLE on the same LLaMA and shards: the loss curves of their runs on one plot, and
their benchmark results (`libra-lm eval` folders) side by side (`libra-lm compare`, docs/hovle.md).

    plot_runs({"Libra pretrain": "runs/libra", "HoVLE align": "runs/hovle-align"}, "compare/loss.png")
    print(side_by_side({"Libra": "eval/libra", "HoVLE": "eval/hovle"}))
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from libra_tok.fileio import atomic_path
from libra_tok.run import METRICS, read_metrics

COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple", "tab:brown")


def _run_folder(path: str | Path) -> Path:
    folder = Path(path)
    if not (folder / METRICS).is_file():
        raise FileNotFoundError(f"{folder} is not a training run folder: no {METRICS} (give the --out-dir of "
                                "`libra-lm train`)")
    return folder


def plot_runs(runs: Mapping[str, str | Path], path: str | Path, *, key: str = "loss",
              title: str = "Libra vs HoVLE") -> Path:
    """One PNG with the `key` curve (solid) and the validation loss (markers) of every run
    against its step; the curves of a run share a colour. Written atomically."""
    from matplotlib.figure import Figure

    if not runs:
        raise ValueError("no runs to plot: give at least one LABEL=RUN_FOLDER")
    fig = Figure(figsize=(9, 5.4), dpi=100)
    ax = fig.add_subplot()
    for (label, folder), colour in zip(runs.items(), COLOURS * len(runs), strict=False):
        rows = read_metrics(_run_folder(folder) / METRICS)
        for name, style in ((key, {}), ("val_loss", {"marker": "o", "linestyle": "--"})):
            pts = [(r["step"], r[name]) for r in rows if isinstance(r.get(name), (int, float))
                   and isinstance(r.get("step"), (int, float)) and math.isfinite(r[name])]
            if pts:
                xs, ys = zip(*pts, strict=True)
                ax.plot(xs, ys, color=colour, label=label if name == key else f"{label} (validation)", **style)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path


def eval_columns(folder: str | Path) -> dict[str, str]:
    """The table columns ({"POPE rand": "85.3", ...}) of a `libra-lm eval` output folder."""
    from ..eval.results import columns
    from ..eval.tasks import get_tasks

    path = Path(folder) / "results.json"
    try:
        results = json.loads(path.read_text())["tasks"]
    except (OSError, ValueError, KeyError) as exc:
        raise FileNotFoundError(f"{path}: not the results of `libra-lm eval` ({exc})") from None
    out: dict[str, str] = {}
    for task in get_tasks(",".join(results)):
        out.update(columns(task, results[task.name]))
    return out


def side_by_side(evals: Mapping[str, str | Path]) -> str:
    """A Markdown table: one row per benchmark column, one column per eval folder ("-" where a
    folder lacks that benchmark)."""
    if not evals:
        raise ValueError("no eval folders to compare: give at least one LABEL=EVAL_FOLDER")
    cols = {label: eval_columns(folder) for label, folder in evals.items()}
    names = list(dict.fromkeys(name for c in cols.values() for name in c))
    lines = ["| benchmark | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    lines += [f"| {name} | " + " | ".join(c.get(name, "-") for c in cols.values()) + " |" for name in names]
    return "\n".join(lines)


__all__ = ["plot_runs", "eval_columns", "side_by_side"]
