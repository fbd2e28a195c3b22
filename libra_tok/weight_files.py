"""Reading weight files: safetensors or torch files, recognised by their content.

A file is read as safetensors when it starts like one, and as a torch checkpoint only when it
is one (a zip archive with `data.pkl`, or the legacy pickle that starts with torch's magic
number); torch files are always loaded with `weights_only=True` unless the caller trusts the
file (`trust_pickle`), since unpickling can run code. Anything else (an image, a Git LFS
pointer, text, a damaged or truncated file) is a CheckpointError naming the file and what it
looks like. Nothing here knows a model: this module maps files to dicts of tensors.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import torch


class CheckpointError(ValueError):
    """A weights file does not hold what was expected; the message says what and how to fix it."""


# torch.save's legacy (non-zip) format starts with a pickled magic number.
_TORCH_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_HEAD_BYTES = 512


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(_HEAD_BYTES)


def _looks_like_safetensors(head: bytes) -> bool:
    """A little-endian u64 header length, then the JSON header."""
    return len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 1 << 30


def _torch_zip_members(path: Path) -> list[str] | None:
    """Member names of a zip archive, or None if the zip is damaged (e.g. cut short)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"version https://git-lfs", "a Git LFS pointer, not the file itself (fetch it with `git lfs pull`)"),
)


def describe_file(path: str | Path, head: bytes | None = None) -> str:
    """What a file looks like from its first bytes ("a PNG image", "an empty file", ...),
    for messages about files that are not what a loader expected."""
    path = Path(path)
    head = _head(path) if head is None else head
    if not head:
        return "an empty file"
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return what
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a WebP image"
    if head.startswith(b"PK\x03\x04"):
        members = _torch_zip_members(path)
        if members is None:
            return "a damaged or truncated zip archive"
        if _is_torch_zip(members):
            return "a torch checkpoint (zip archive)"
        return f"a zip archive without data.pkl (members: {sample_keys(members, 3)})"
    if head[257:262] == b"ustar":
        return "a tar archive"
    if _looks_like_safetensors(head):
        return "the start of a safetensors file"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        if _TORCH_LEGACY_MAGIC in head[:32]:
            return "a torch checkpoint (legacy format)"
        return "a Python pickle that torch.save did not write"
    text = head.decode("utf-8", "ignore")
    # A multi-byte character cut at the end of `head` is no reason to call the file binary.
    if len(text.encode()) >= len(head) - 3 and all(c.isprintable() or c in "\r\n\t" for c in text):
        first = text.strip().splitlines()[0] if text.strip() else ""
        return f"text ({first[:40]!r})"
    return f"binary data starting with {head[:8].hex(' ')}"


def _is_torch_zip(members: list[str]) -> bool:
    return any(name == "data.pkl" or name.endswith("/data.pkl") for name in members)


def _file_kind(path: Path, head: bytes) -> str:
    """"safetensors", "torch" (a zip archive with a data.pkl, or the legacy pickle that starts
    with torch's magic number) or "other"; a zip archive cut short is a CheckpointError."""
    if _looks_like_safetensors(head):
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        members = _torch_zip_members(path)
        if members is None:
            raise CheckpointError(f"{path} is a damaged or truncated torch checkpoint (its zip archive is incomplete); "
                                  f"download or save it again")
        return "torch" if _is_torch_zip(members) else "other"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5 and _TORCH_LEGACY_MAGIC in head[:32]:
        return "torch"
    return "other"


def read_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a torch pickle (unwrapping `state_dict` / `model`).

    The format is recognised from the file's first bytes (a .safetensors name must hold
    safetensors; other names may hold either), so only real torch pickles are ever unpickled,
    and then only tensors unless trust_pickle=True. Anything else, damaged and truncated files
    included, is a CheckpointError naming the file and saying what it looks like."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    head = _head(path)
    kind = _file_kind(path, head)
    if kind == "safetensors":
        return _safetensors_load(path)
    if path.suffix == ".safetensors":  # torch.load would take the name for the format, so the name must be right
        raise CheckpointError(f"cannot read {path}: it looks like {describe_file(path, head)}, not a safetensors "
                              f"file; download or save it again")
    if kind == "other":
        raise CheckpointError(f"{path} is not a torch checkpoint or safetensors file: it looks like "
                              f"{describe_file(path, head)}")
    obj = _torch_load(path, trust_pickle=trust_pickle, zipped=head.startswith(b"PK\x03\x04"))
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds a dict without tensors (keys: {sample_keys(obj)})")
    if all(k.startswith("module.") for k in tensors):  # saved from DDP
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError is no ValueError/OSError subclass
        raise CheckpointError(f"cannot read {path}: a damaged or truncated safetensors file ({exc}); "
                              f"download or save it again") from None


def _unpickler_refusal(exc: BaseException) -> str | None:
    """The reason torch's weights-only unpickler gave for refusing a Python object, or None
    when the error is something else (a damaged file)."""
    text = str(exc)
    if "Unsupported global" not in text:
        return None
    line = next(line for line in text.splitlines() if "Unsupported global" in line)
    line = line.split("Unsupported global:", 1)[1].strip()
    return line.split(". Please", 1)[0]


def _torch_load(path: Path, *, trust_pickle: bool, zipped: bool) -> Any:
    """torch.load of a file `_file_kind` recognised: tensors only unless trust_pickle."""
    try:
        # Memory-map the zip format (large files load lazily); the legacy format cannot be.
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=zipped)
    except pickle.UnpicklingError as exc:
        refused = None if trust_pickle else _unpickler_refusal(exc)
        if refused is None:
            raise CheckpointError(f"{path} is a damaged or truncated torch checkpoint ({_first_line(exc)}); "
                                  f"download or save it again") from None
        raise CheckpointError(
            f"{path} contains Python objects besides tensors ({refused}), which are not loaded by default "
            f"because unpickling can run code. If you trust the file, load it with trust_pickle=True "
            f"(command line: --trust-pickle)."
        ) from None
    except (ImportError, AttributeError) as exc:  # trusted objects whose classes are not installed
        raise CheckpointError(f"{path} holds Python objects whose code is not installed here ({exc}); install the "
                              f"package that wrote it, or convert the file to tensors only") from None
    except Exception as exc:  # truncated data: RuntimeError, EOFError, struct.error, ...
        raise CheckpointError(f"{path} is a damaged or truncated torch checkpoint "
                              f"({type(exc).__name__}: {_first_line(exc)}); download or save it again") from None


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(exc).__name__


# Weight files of an HF or open_clip CLIP folder, in the order they are looked for.
CLIP_FOLDER_WEIGHTS = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                       "open_clip_pytorch_model.bin")


def weights_in_folder(folder: str | Path, names: tuple[str, ...] = CLIP_FOLDER_WEIGHTS) -> Path | None:
    """The first of `names` that is a file in `folder`, or None."""
    return next((Path(folder) / name for name in names if (Path(folder) / name).is_file()), None)


def sample_keys(keys: Any, n: int = 6) -> str:
    keys = list(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


def key_problems(missing: list[str], unexpected: list[str], mismatched: list[str]) -> list[str]:
    """Human-readable summaries of a state dict that does not fit a model (empty if it fits)."""
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {sample_keys(missing, 10)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {sample_keys(unexpected, 10)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): " + "; ".join(mismatched[:10]))
    return problems



__all__ = ["CheckpointError", "read_state_dict", "describe_file", "weights_in_folder", "CLIP_FOLDER_WEIGHTS",
           "sample_keys", "key_problems"]
