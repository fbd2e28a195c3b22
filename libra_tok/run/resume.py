"""Where a run continues from, and the refusal to write over a run.

A fresh run refuses a folder that holds checkpoints; `--resume` loads the checkpoint
latest.json names, or (when that file is gone) the newest intact one, and names a damaged or
refused file together with the previous intact checkpoint (docs/tokenizer-training.md#resuming-safely).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from .checkpoints import (
    CHECKPOINT_DIR,
    LATEST,
    CheckpointCheck,
    UnusableCheckpoint,
    checkpoint_files,
    latest_name,
    newest_intact,
    read_checkpoint,
)

log = logging.getLogger(__name__)


def resume_state(out_dir: str | Path, resume: bool,
                 validate: CheckpointCheck | None = None) -> tuple[Path | None, dict[str, Any] | None]:
    """(checkpoint, its state) a run in `out_dir` continues from; (None, None) for a fresh run.

    Without `resume`, a folder holding checkpoints is refused (FileExistsError). With it, the
    file latest.json names is loaded; if it is gone, the newest intact step-*.pt (logged).
    A damaged or unsafe file stops with a ValueError that names it and the previous intact
    checkpoint, if any."""
    ckpt_dir = Path(out_dir) / CHECKPOINT_DIR
    files = checkpoint_files(ckpt_dir)
    named = latest_name(ckpt_dir)
    has_latest = (ckpt_dir / LATEST).exists()
    if not resume:
        if has_latest or files:
            last = named or (files[-1].name if files else LATEST)
            raise FileExistsError(f"{out_dir} already holds checkpoints (last: {last}); pass --resume to continue "
                                  "that run or choose another --out-dir")
        return None, None
    if named is not None and (ckpt_dir / named).exists():
        path = ckpt_dir / named
        try:
            return path, read_checkpoint(path, validate)
        except UnusableCheckpoint as err:
            older = [f for f in files if f.name < path.name]
            intact = newest_intact(older, validate)
            problem = (f"{path} is refused: {err.reason}" if err.refused else f"{path} is damaged ({err.reason})")
            if intact is None:
                raise ValueError(f"{problem}; no intact checkpoint is left: delete {ckpt_dir} to start the run over") \
                    from None
            raise ValueError(f"{problem}; {intact[0]} is intact: delete {path.name} to resume from it") from None
    if not files and not has_latest:
        log.info("no checkpoint in %s yet: the run starts at step 0", ckpt_dir)
        return None, None
    why = f"{LATEST} names {named}, which is missing" if named else f"{LATEST} is missing or unreadable"
    intact = newest_intact(files, validate)
    if intact is None:
        damaged = f" ({', '.join(f.name for f in files)} cannot be read)" if files else ""
        raise ValueError(f"{ckpt_dir}: {why}, and no intact checkpoint is left{damaged}; delete {ckpt_dir} to start "
                         "the run over")
    log.warning("%s; resuming from %s", why, intact[0])
    return intact


__all__ = ["resume_state"]
