"""Writing files safely: atomic writes, and output paths checked before any work.

Everything the project writes for later use (checkpoints, shards, manifests, reports) goes
through `atomic_path`: write under a temporary name in the same folder, fsync, rename, so a
file either has its old content or its complete new content. `check_output_folder` /
`check_output_file` refuse an output path that cannot be made before anything is computed.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux tells it (/proc); elsewhere by
    setting and restoring it (a brief window in which other threads' new files get mode 0)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it replaces `path` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        # mkstemp creates the file readable by its owner only; give it the mode a plain open()
        # would (the file it replaces keeps its own mode).
        os.chmod(tmp, path.stat().st_mode & 0o7777 if path.exists() else 0o666 & ~current_umask())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def atomic_save_safetensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save_file

    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(contiguous, str(tmp), metadata=metadata)


def atomic_save_image(image: Any, path: str | Path, **save_kwargs: Any) -> None:
    """Save a PIL image atomically; the format comes from the target's suffix."""
    path = Path(path)
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG"}.get(path.suffix.lower(), path.suffix.lstrip(".").upper())
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **save_kwargs)


def check_output_folder(path: str | Path, option: str = "--out") -> Path:
    """Refuse, before any work, an output folder that cannot be made: a file stands at its
    place or at the place of one of its parents."""
    path = Path(path).expanduser()
    if path.exists() and not path.is_dir():
        raise NotADirectoryError(f"{option} {path} is a file, not a folder; choose another {option}")
    _check_parents(path, option)
    return path


def check_output_file(path: str | Path, option: str) -> Path:
    """Refuse, before any work, an output file path that is a folder or lies under a file."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise IsADirectoryError(f"{option} {path} is a folder; give a file name")
    _check_parents(path, option)
    return path


def _check_parents(path: Path, option: str) -> None:
    for parent in path.parents:  # nearest first: the first one that exists decides
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"{option} {path} lies under {parent}, which is a file, not a folder; "
                                         f"choose another {option}")
            return


__all__ = [
    "check_output_folder",
    "check_output_file",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_safetensors",
    "atomic_save_image",
]
