"""Training checkpoints in a run folder: `checkpoints/step-XXXXXXXX.pt` and `latest.json`
(sharded runs write `step-XXXXXXXX/` folders instead: libra_tok.run.dcp; both are listed,
rotated and resumed here).

A checkpoint holds tensors and plain values only and is read with weights_only=True, so a file
someone else put in the folder cannot run code. Files are written under a temporary name and
renamed when complete; `latest.json` is written after the file it names, and only the newest
`keep` checkpoints stay on disk.
"""

from __future__ import annotations

import json
import pickle
import shutil
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_path, atomic_write_json
from .rng import legacy_rng_globals

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"
META = "meta.json"  # in a sharded checkpoint folder (libra_tok.run.dcp): step, data position, options
DCP_METADATA = ".metadata"  # written by DCP once every process has written its shards

CheckpointCheck = Callable[[dict[str, Any]], "str | None"]  # a problem of a loaded state, or None


class UnusableCheckpoint(ValueError):
    """A checkpoint file that cannot be resumed from: damaged, foreign, or refused because it
    holds Python objects (`refused`); `reason` says why."""

    def __init__(self, path: Path, reason: str, refused: bool = False):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.refused = path, reason, refused


def checkpoint_name(step: int) -> str:
    """The file name of the checkpoint of `step` (zero-padded: names sort by step)."""
    return f"step-{step:08d}.pt"


def checkpoint_files(ckpt_dir: Path) -> list[Path]:
    """The checkpoints of a run, oldest first: step-*.pt files and complete or damaged sharded
    step-* folders (not the .partial folders of a save that was cut short)."""
    found = [p for p in Path(ckpt_dir).glob("step-*") if p.suffix == ".pt" or (p.is_dir() and not p.suffix)]
    return sorted(found, key=lambda p: (p.name.removesuffix(".pt"), p.suffix))


def rotate_checkpoints(ckpt_dir: Path, keep: int) -> None:
    """Delete all but the newest `keep` (at least 1) checkpoints."""
    kept = checkpoint_files(ckpt_dir)
    for old in kept[: max(0, len(kept) - max(1, keep))]:
        if old.is_dir():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)


def write_checkpoint(ckpt_dir: str | Path, step: int, state: dict[str, Any], keep: int) -> Path:
    """Write `state` as the checkpoint of `step`, point latest.json at it, then delete all but
    the newest `keep` (at least 1) checkpoints. A crash at any point leaves latest.json naming
    a complete file."""
    ckpt_dir = Path(ckpt_dir)
    name = checkpoint_name(step)
    with atomic_path(ckpt_dir / name) as tmp:
        torch.save(state, tmp)
    atomic_write_json(ckpt_dir / LATEST, {"file": name, "step": step})
    rotate_checkpoints(ckpt_dir, keep)
    return ckpt_dir / name


def missing_keys(state: dict[str, Any], keys: Sequence[str]) -> str | None:
    """"no a, b" for the `keys` a loaded state lacks, or None (a `CheckpointCheck` helper)."""
    missing = [k for k in keys if k not in state]
    return f"no {', '.join(missing)}" if missing else None


def _error_text(exc: BaseException) -> str:
    """The informative line of a torch.load error (its wrapper text dropped), shortened."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else ""
    line = line.split(". This is an internal")[0]  # miniz's advice that follows the cause
    line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def read_checkpoint(path: str | Path, validate: CheckpointCheck | None = None) -> dict[str, Any]:
    """A training checkpoint, loaded with weights_only=True: tensors and plain values only,
    nothing that unpickling could run. `validate(state)` returns a problem or None. A damaged,
    foreign or unsafe file raises UnusableCheckpoint with the reason."""
    path = Path(path)
    if path.is_dir():  # a sharded checkpoint: its meta.json (the tensors load later, each process its own)
        state = read_sharded_meta(path)
        problem = validate(state) if validate else None
        if problem:
            raise UnusableCheckpoint(path, f"not a training checkpoint of this trainer: {problem}")
        return state
    if path.stat().st_size == 0:
        raise UnusableCheckpoint(path, "empty file")
    try:
        with torch.serialization.safe_globals(legacy_rng_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (MemoryError, PermissionError):
        raise  # not the file's fault
    except pickle.UnpicklingError as exc:
        try:
            allowed = {f"{g.__module__}.{g.__qualname__}" for g in legacy_rng_globals()}
            unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
        except Exception:  # too damaged to list what it refers to
            unsafe = []
        if unsafe:
            raise UnusableCheckpoint(path, f"it holds Python objects besides tensors ({', '.join(unsafe[:3])}), which "
                                     "training checkpoints never contain, and unpickling them could run code",
                                     refused=True) from None
        raise UnusableCheckpoint(path, _error_text(exc)) from None
    except Exception as exc:  # a truncated zip, bytes that are no pickle, ...: torch raises many kinds
        raise UnusableCheckpoint(path, _error_text(exc)) from None
    problem = "not a dict" if not isinstance(state, dict) else (validate(state) if validate else None)
    if problem:
        raise UnusableCheckpoint(path, f"not a training checkpoint of this trainer: {problem}")
    return state


def read_sharded_meta(path: str | Path) -> dict[str, Any]:
    """meta.json of a complete sharded checkpoint; UnusableCheckpoint when it is incomplete."""
    path = Path(path)
    if not (path / DCP_METADATA).is_file():
        raise UnusableCheckpoint(path, f"no {DCP_METADATA} (not a complete DCP checkpoint)")
    try:
        meta = json.loads((path / META).read_text())
    except FileNotFoundError:
        raise UnusableCheckpoint(path, f"no {META}") from None
    except (OSError, ValueError) as exc:
        raise UnusableCheckpoint(path, f"{META} cannot be read ({exc})") from None
    if not isinstance(meta, dict):
        raise UnusableCheckpoint(path, f"{META} is not a mapping")
    return {**meta, "sharded": True}


def latest_name(ckpt_dir: Path) -> str | None:
    """The file latest.json names (a bare file name), or None when it is missing or unreadable."""
    try:
        name = json.loads((Path(ckpt_dir) / LATEST).read_text())["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and name and Path(name).name == name else None


def newest_intact(files: Sequence[Path], validate: CheckpointCheck | None) -> tuple[Path, dict[str, Any]] | None:
    """(path, state) of the newest of `files` that reads, or None."""
    for path in reversed(files):
        try:
            return path, read_checkpoint(path, validate)
        except UnusableCheckpoint:
            continue
    return None


__all__ = ["CHECKPOINT_DIR", "LATEST", "META", "read_sharded_meta",
           "CheckpointCheck", "UnusableCheckpoint", "checkpoint_name", "checkpoint_files",
           "write_checkpoint", "rotate_checkpoints", "missing_keys", "read_checkpoint", "latest_name", "newest_intact"]
