"""What a run records besides its answers: digests of the model and tokenizers (so that a rerun
in the same folder continues the same evaluation), library versions, and the table of the
paper's columns."""

from __future__ import annotations

import hashlib
import platform
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from libra_tok.shards import sha256_file

from .tasks import PAPER_COLUMNS, Task


def model_files(folder: Path) -> list[Path]:
    """The files that define an LM folder's answers: config.json and the weight files."""
    from ..checkpoint import weight_files

    return sorted({folder / "config.json", *weight_files(folder)})


def file_stats(files: Sequence[Path], root: Path) -> dict[str, list[int]]:
    return {str(f.relative_to(root)): [f.stat().st_size, f.stat().st_mtime_ns] for f in files}


def model_digest(folder: Path, cached: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """{"sha256": digest of the folder's config and weights, "files": their sizes and times}.
    `cached` (a digest recorded earlier) is reused when no file changed, so a rerun does not
    read 20 GB again."""
    folder = Path(folder)
    files = model_files(folder)
    stats = file_stats(files, folder)
    if cached and cached.get("files") == stats and cached.get("sha256"):
        return dict(cached)
    digest = hashlib.sha256()
    for f in files:
        digest.update(f"{f.relative_to(folder)}:{sha256_file(f)}\n".encode())
    return {"sha256": digest.hexdigest(), "files": stats}


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for dist in ("libra", "torch", "sentencepiece", "pycocoevalcap", "open_clip_torch", "numpy"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    return out


def _lookup(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if isinstance(value, (int, float)) else None


def columns(task: Task, entry: Mapping[str, Any]) -> dict[str, str]:
    """The task's paper columns and their printed values ("submit" for submission files)."""
    out = {}
    for column, key in task.columns.items():
        if not key:
            out[column] = "submit"
            continue
        value = _lookup(entry.get("metrics") or {}, key)
        out[column] = "-" if value is None else f"{value:.1f}"
    return out


def paper_table(tasks: Sequence[Task], results: Mapping[str, Mapping[str, Any]], model_name: str) -> str:
    """The columns of the tasks run, in the order of the paper's Tab. 1 and Tab. 2."""
    blocks = []
    for table, order in PAPER_COLUMNS.items():
        cells: list[tuple[int, str, str]] = []
        for task in tasks:
            if task.table != table or task.name not in results:
                continue
            for column, value in columns(task, results[task.name]).items():
                base = column.split(" ")[0]
                cells.append((order.index(base) if base in order else len(order), column, value))
        if not cells:
            continue
        cells.sort(key=lambda c: c[0])
        widths = [max(len(c[1]), len(c[2])) for c in cells]
        name_width = max(len(model_name), len(f"Table {table}"))
        pairs = list(zip(cells, widths, strict=True))
        head = f"{'Table ' + str(table):<{name_width}}  " + "  ".join(f"{c[1]:>{w}}" for c, w in pairs)
        row = f"{model_name:<{name_width}}  " + "  ".join(f"{c[2]:>{w}}" for c, w in pairs)
        blocks.append(f"{head}\n{row}")
    return "\n\n".join(blocks)


__all__ = ["model_files", "model_digest", "versions", "columns", "paper_table"]
