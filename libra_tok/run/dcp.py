"""Sharded training checkpoints (`torch.distributed.checkpoint`, DCP) for runs whose weights are
sharded over processes (the LM under FSDP2).

A sharded checkpoint is a folder `checkpoints/step-XXXXXXXX/` beside the single-file
`step-XXXXXXXX.pt` ones of `libra_tok.run.checkpoints`:

    .metadata, __<rank>_0.distcp   DCP: every process writes the shards it owns, in parallel
    rng-<rank>.pt                  that process's RNG states (tensors and plain values only)
    meta.json                      step, data position, options, scheduler, format (rank 0)

It is written under `step-XXXXXXXX.partial/` and renamed only when every process has written
its part and `meta.json` is there; `latest.json` is rewritten after the rename. A run killed
at any point leaves `latest.json` naming the previous complete checkpoint; a leftover
`.partial` folder is ignored and removed by the next save.

DCP stores the global shape of every tensor and which slices each file holds, so a checkpoint
written by N processes loads into M processes (or one, without a process group): each reads
the slices it now owns.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from ..fileio import atomic_write_json
from .checkpoints import LATEST, META, checkpoint_name, read_sharded_meta, rotate_checkpoints
from .distributed import Dist, barrier
from .rng import legacy_rng_globals

PARTIAL = ".partial"


def sharded_checkpoint_name(step: int) -> str:
    """The folder name of the sharded checkpoint of `step` (sorts with the .pt names)."""
    return checkpoint_name(step).removesuffix(".pt")


@contextlib.contextmanager
def _quiet_dcp():
    # Without a process group DCP warns that it assumes one process, which is what we mean.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_sharded_checkpoint(ckpt_dir: str | Path, step: int, tensors: dict[str, Any], meta: dict[str, Any],
                             rng: dict[str, Any], d: Dist, keep: int) -> Path:
    """Write the checkpoint of `step` (collective: every process calls it with its own
    `tensors` and `rng`; `meta`, plain JSON values, is written by the main process), point
    latest.json at it and keep the newest `keep` checkpoints."""
    import torch.distributed.checkpoint as dcp

    ckpt_dir = Path(ckpt_dir)
    name = sharded_checkpoint_name(step)
    final, partial = ckpt_dir / name, ckpt_dir / (name + PARTIAL)
    if d.main:
        shutil.rmtree(partial, ignore_errors=True)  # left by a run killed while saving
        partial.mkdir(parents=True)
    barrier(d)
    with _quiet_dcp():
        dcp.save(tensors, checkpoint_id=partial)  # the coordinator writes .metadata after every rank's files
    torch.save(rng, partial / f"rng-{d.rank}.pt")
    barrier(d)
    if d.main:
        atomic_write_json(partial / META, {**meta, "step": step, "world": d.world})
        _fsync_dir(partial)
        if final.exists():  # the same step saved again (a resumed run stopped where it started)
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(ckpt_dir)
        atomic_write_json(ckpt_dir / LATEST, {"file": name, "step": step})
        rotate_checkpoints(ckpt_dir, keep)
    barrier(d)
    return final


def sharded_tensor_keys(path: str | Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Every tensor a sharded checkpoint holds: flattened key -> (global shape, dtype)."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(path)).read_metadata()
    return {k: (tuple(v.size), v.properties.dtype) for k, v in metadata.state_dict_metadata.items()
            if isinstance(v, TensorStorageMetadata)}


def load_sharded(path: str | Path, state: dict[str, Any], collective: bool = True) -> None:
    """Fill `state` (plain tensors, DTensors, or nested dicts of them) in place from a sharded
    checkpoint: each process reads the slices of the checkpoint it owns in `state`.
    collective=False: this process alone reads (e.g. one exporting while the others wait)."""
    import torch.distributed.checkpoint as dcp

    with _quiet_dcp():
        dcp.load(state, checkpoint_id=str(path), no_dist=not collective)


def read_rank_rng(path: str | Path, rank: int) -> dict[str, Any]:
    """The RNG states process `rank` saved; those of rank 0 when the checkpoint was written by
    fewer processes (a resume on more processes: their RNG states cannot be those of a run
    that had them from the start)."""
    path = Path(path)
    file = path / f"rng-{rank}.pt"
    if not file.is_file():
        file = path / "rng-0.pt"
    with torch.serialization.safe_globals(legacy_rng_globals()):
        return torch.load(file, map_location="cpu", weights_only=True)


__all__ = ["META", "sharded_checkpoint_name", "write_sharded_checkpoint", "read_sharded_meta", "sharded_tensor_keys",
           "load_sharded", "read_rank_rng"]
