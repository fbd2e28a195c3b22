"""A run's metrics: `metrics.jsonl` (one JSON object per row, each with its `step`) and, when
TensorBoard is installed, the same scalars under `tensorboard/`.

When a run starts or resumes at step s, both logs are cut back to s: rows of later steps (logged
after the last checkpoint by a run that was then stopped) and a partial last line are dropped
from the JSON lines, and TensorBoard is told to drop its events after s (`purge_step`), so no
step appears twice in either.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_text

METRICS = "metrics.jsonl"
TENSORBOARD = "tensorboard"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a line that is not a whole JSON object (the last line of a
    run killed while writing it) is skipped."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def trim_metrics(path: str | Path, step: int) -> None:
    """Make a metrics log describe the steps up to `step` (where a run starts or resumes): rows
    of later steps (logged after the checkpoint, by a run that was then stopped) and partial
    lines are dropped, the file rewritten atomically. New rows are then appended."""
    path = Path(path)
    if not path.is_file():
        return
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and not (isinstance(row.get("step"), (int, float)) and row["step"] > step):
            kept.append(line)
    if len(kept) != len(lines) or (text and not text.endswith("\n")):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


def open_tensorboard(folder: Path, first_step: int):
    """A SummaryWriter whose events from `first_step` on replace those of an earlier, stopped
    run in `folder`; None when TensorBoard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed (or broken): JSON lines only
        return None
    return SummaryWriter(str(folder), purge_step=first_step)


class MetricsLog:
    """The metric rows of a run: kept in `history` by every process, written to the run folder
    by the process that owns it (`write`)."""

    def __init__(self, out_dir: str | Path, write: bool):
        self.out = Path(out_dir)
        self.path = self.out / METRICS
        self.write = write
        self.history: list[dict[str, Any]] = []
        self._tb = None

    def start(self, step: int) -> None:
        """Cut both logs back to `step`, where the run starts or resumes."""
        if not self.write:
            return
        trim_metrics(self.path, step)  # rows after the checkpoint are logged again
        self._tb = open_tensorboard(self.out / TENSORBOARD, first_step=step + 1)

    def log(self, row: dict[str, Any]) -> None:
        """Append a row (it holds "step"); numbers other than the step also go to TensorBoard."""
        self.history.append(row)
        if not self.write:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as fh:  # append-only log (trimmed to the checkpoint on resume)
            fh.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, row["step"])

    def rows(self) -> list[dict[str, Any]]:
        """Every row of the run folder's log, this run's and those before its checkpoint."""
        return read_metrics(self.path)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


__all__ = ["METRICS", "TENSORBOARD", "read_metrics", "trim_metrics", "open_tensorboard", "MetricsLog"]
