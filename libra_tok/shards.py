"""Id shards on disk: written all-or-nothing, read by memory map.

A shard set is a folder of shard folders, each complete or absent:

    SHARD_DIR/shard-00000/manifest.json   format, tokenizer config + hashes, grid, codebooks,
                                          samples, input slice, failed inputs, per-file sha256
    SHARD_DIR/shard-00000/ids.u16         uint16 (n, tokens, codebooks), C order, little endian
    SHARD_DIR/shard-00000/meta.jsonl      one JSON object per sample: source, member, size, caption
    SHARD_DIR/shard-00000/features.f16    optional float16 (n, tokens, feature_dim)
    SHARD_DIR/skipped_inputs.json         inputs left out while listing (when there were any)

A shard is written in a hidden temporary folder and renamed into place when complete, so a
crash never leaves a shard that looks whole, and independent processes (ranks, machines)
write disjoint shards into one folder without coordination.

Every manifest records the plan of the whole set (input count, shard size, number of
shards), so `verify_shards` can tell a deleted shard folder from a set that never had it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

SHARD_FORMAT = "libra-shards"
SHARD_VERSION = 1
MANIFEST = "manifest.json"
IDS_FILE = "ids.u16"
META_FILE = "meta.jsonl"
FEATURES_FILE = "features.f16"
SKIPPED_FILE = "skipped_inputs.json"
_SHARD_DIR = re.compile(r"shard-(\d+)")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def shard_folders(root: str | Path) -> list[tuple[int, Path]]:
    """(index, path) of the complete shard folders under `root`, in shard order (temporary
    folders of writers in progress, and other names, are not shards)."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        match = _SHARD_DIR.fullmatch(path.name)
        if match and shard_name(int(match.group(1))) == path.name and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def is_plain_name(name: Any) -> bool:
    """A file name that stays inside the shard folder: no separators, not '.' or '..'."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "/" not in name and "\\" not in name
            and "\0" not in name)


def planned_layout(manifest: dict[str, Any]) -> tuple[int, int, int]:
    """(inputs, shard size, number of shards) of the set a shard belongs to. Manifests
    written before the plan was recorded are inferred from their slice and shard index:
    every shard but the last holds exactly `shard size` inputs."""
    inputs = manifest["inputs"]
    count = int(inputs["count"])
    start, end = (int(x) for x in inputs["slice"])
    size = inputs.get("shard_size")
    if size is None:
        index = int(manifest["shard"])
        size = start // index if index > 0 else (end - start if end < count else max(count, 1))
    size = int(size)
    if size < 1:
        raise ValueError(f"shard size {size} in the manifest of shard {manifest.get('shard')}")
    total = inputs.get("num_shards")
    return count, size, int(total) if total is not None else math.ceil(count / size)


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


class ShardWriter:
    """Streams one shard into a temporary folder; `commit()` renames it into place."""

    def __init__(self, root: str | Path, index: int, tokens: int, codebooks: int, feature_dim: int | None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.index = index
        self.final = self.root / shard_name(index)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{shard_name(index)}.", suffix=".tmp", dir=self.root))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(self.tmp, 0o777 & ~umask)  # mkdtemp makes 0700; shards are ordinary folders
        self.tokens, self.codebooks, self.feature_dim = tokens, codebooks, feature_dim
        self._ids = open(self.tmp / IDS_FILE, "wb")
        self._meta = open(self.tmp / META_FILE, "w", encoding="utf-8")
        self._features = open(self.tmp / FEATURES_FILE, "wb") if feature_dim else None
        self.count = 0

    def add(self, ids: np.ndarray, meta: Sequence[dict[str, Any]], features: np.ndarray | None = None) -> None:
        """ids (b, tokens, codebooks) ints < 65536; meta: b dicts; features (b, tokens, C)."""
        if ids.shape[1:] != (self.tokens, self.codebooks):
            raise ValueError(f"ids of shape {ids.shape[1:]} do not fit a shard of ({self.tokens}, {self.codebooks})")
        if len(meta) != ids.shape[0]:
            raise ValueError("one metadata record per sample is needed")
        self._ids.write(np.ascontiguousarray(ids, dtype="<u2").tobytes())
        for row in meta:
            self._meta.write(json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n")
        if self._features is not None:
            if features is None or features.shape != (ids.shape[0], self.tokens, self.feature_dim):
                raise ValueError(f"features of shape (b, {self.tokens}, {self.feature_dim}) are required in this shard")
            self._features.write(np.ascontiguousarray(features, dtype="<f2").tobytes())
        self.count += ids.shape[0]

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Close the files, hash them, write the manifest, rename the folder into place."""
        files = [self._ids, self._meta] + ([self._features] if self._features is not None else [])
        for fh in files:
            fh.close()
        hashes = {}
        for name in (IDS_FILE, META_FILE) + ((FEATURES_FILE,) if self._features is not None else ()):
            path = self.tmp / name
            _fsync(path)
            hashes[name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        manifest = {
            "format": SHARD_FORMAT,
            "format_version": SHARD_VERSION,
            "shard": self.index,
            "num_samples": self.count,
            "ids": {"file": IDS_FILE, "dtype": "uint16", "shape": [self.count, self.tokens, self.codebooks]},
            "features": ({"file": FEATURES_FILE, "dtype": "float16", "shape": [self.count, self.tokens, self.feature_dim]}
                         if self._features is not None else None),
            "meta": {"file": META_FILE},
            **manifest,
            "files": hashes,
        }
        (self.tmp / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
        _fsync(self.tmp / MANIFEST)
        if self.final.exists():
            raise FileExistsError(f"{self.final} appeared while it was being written (two writers for one shard?)")
        os.rename(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        for fh in (self._ids, self._meta, self._features):
            if fh is not None and not fh.closed:
                fh.close()
        shutil.rmtree(self.tmp, ignore_errors=True)


def remove_stale_temporaries(root: str | Path, indices: Sequence[int] | None = None) -> int:
    """Delete temporary folders left by killed writers (only for `indices`, if given)."""
    root = Path(root)
    removed = 0
    if not root.is_dir():
        return 0
    wanted = {shard_name(i) for i in indices} if indices is not None else None
    for tmp in root.glob(".shard-*.tmp"):
        if wanted is None or tmp.name.split(".")[1] in wanted:
            shutil.rmtree(tmp, ignore_errors=True)
            removed += 1
    return removed


def read_manifest(shard: Path) -> dict[str, Any]:
    path = shard / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: JSON or UTF-8 decoding
        raise ValueError(f"{path}: unreadable shard manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != SHARD_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path} is not a {SHARD_FORMAT} manifest (format {found!r})")
    if int(manifest.get("format_version", 0)) > SHARD_VERSION:
        raise ValueError(f"{path} was written by a newer libra (format {manifest['format_version']}); upgrade the package")
    return manifest


def _declared_files(manifest: dict[str, Any]) -> dict[str, Any]:
    """What each data file of the shard is called: {"ids": name, "meta": name[, "features": name]}."""
    files = {"ids": manifest["ids"]["file"], "meta": manifest["meta"]["file"]}
    if manifest.get("features") is not None:
        files["features"] = manifest["features"]["file"]
    return files


def _layout_problems(manifest: dict[str, Any]) -> list[str]:
    """Manifest fields that contradict each other or name files outside the shard (no file is read)."""
    problems = []
    for role, name in _declared_files(manifest).items():
        if not is_plain_name(name):
            problems.append(f"its {role} file {name!r} is not a plain file name inside the shard")
    for name in manifest.get("files") or {}:
        if not is_plain_name(name):
            problems.append(f"its files list names {name!r}, which is not a plain file name inside the shard")
    n = manifest.get("num_samples")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        problems.append(f"num_samples {n!r} is not a number of samples")
        return problems
    for role in ("ids", "features"):
        spec = manifest.get(role)
        if spec is not None and (not isinstance(spec.get("shape"), list) or spec["shape"][:1] != [n]):
            problems.append(f"num_samples is {n} but the {role} shape is {spec.get('shape')}")
    return problems


# ---- reading ----------------------------------------------------------------------------------------
@dataclass
class Sample:
    ids: np.ndarray  # (tokens, codebooks) uint16
    meta: dict[str, Any]
    features: np.ndarray | None  # (tokens, C) float16, when stored


class Shard:
    def __init__(self, path: Path):
        self.path = path
        self.manifest = read_manifest(path)
        try:
            problems = _layout_problems(self.manifest)
        except (KeyError, TypeError, AttributeError) as exc:
            problems = [f"a field is missing or malformed ({type(exc).__name__}: {exc})"]
        if problems:  # never follow a name out of the shard, never index past the data
            raise ValueError(f"{path / MANIFEST}: {problems[0]}; the shard is damaged or was edited "
                             f"(`libra-tok verify {path.parent}` lists every problem)")
        self.num_samples = int(self.manifest["num_samples"])
        self._ids: np.ndarray | None = None
        self._features: np.ndarray | None = None
        self._meta: list[dict[str, Any]] | None = None

    def _map(self, spec: dict[str, Any]) -> np.ndarray:
        shape = tuple(spec["shape"])
        dtype = np.dtype(spec["dtype"]).newbyteorder("<")
        if shape[0] == 0:
            return np.zeros(shape, dtype=dtype)
        path = self.path / spec["file"]
        expected = math.prod(shape) * dtype.itemsize
        if path.stat().st_size != expected:
            raise ValueError(f"{path}: {path.stat().st_size} bytes, its shape {list(shape)} needs {expected} "
                             f"(damaged shard; `libra-tok verify {self.path.parent}` checks every file)")
        return np.memmap(path, dtype=dtype, mode="r", shape=shape)

    @property
    def ids(self) -> np.ndarray:
        if self._ids is None:
            self._ids = self._map(self.manifest["ids"])
        return self._ids

    @property
    def features(self) -> np.ndarray | None:
        spec = self.manifest.get("features")
        if spec is None:
            return None
        if self._features is None:
            self._features = self._map(spec)
        return self._features

    @property
    def meta(self) -> list[dict[str, Any]]:
        if self._meta is None:
            path = self.path / self.manifest["meta"]["file"]
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
            if len(rows) != self.num_samples:
                raise ValueError(f"{path} has {len(rows)} lines for {self.num_samples} samples "
                                 f"(damaged shard; `libra-tok verify {self.path.parent}` checks every file)")
            self._meta = rows
        return self._meta

    def verify(self) -> list[str]:
        """Problems of this shard alone (empty list: every declared file is listed, present, of
        its recorded size and sha256, and agrees with num_samples); see `verify_shards`."""
        return _shard_problems(self.path, self.manifest)


def _count_lines(path: Path) -> int:
    lines, last = 0, b"\n"
    with open(path, "rb") as fh:
        while block := fh.read(1 << 22):
            lines += block.count(b"\n")
            last = block[-1:]
    return lines + (last != b"\n")  # a last line without its newline counts too


def _file_problems(folder: Path, files: Any) -> list[str]:
    """Each listed file: a plain name, present, a regular file, of its recorded size and sha256."""
    if not isinstance(files, dict):
        return [f"{folder / MANIFEST}: no files list (nothing to check the shard's files against)"]
    problems = []
    for name, rec in files.items():
        if not is_plain_name(name):
            problems.append(f"{folder / MANIFEST}: the files list names {name!r}, which is not a plain file name "
                            "inside the shard (refused, not read)")
            continue
        path = folder / name
        if not isinstance(rec, dict) or not isinstance(rec.get("bytes"), int) or not isinstance(rec.get("sha256"), str):
            problems.append(f"{path}: the manifest records no size and sha256 for it")
        elif not path.exists():
            problems.append(f"{path}: missing")
        elif not path.is_file():
            problems.append(f"{path}: not a regular file")
        elif path.stat().st_size != rec["bytes"]:
            problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {rec['bytes']}")
        elif sha256_file(path) != rec["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest (corrupted or modified)")
    return problems


def _shard_problems(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Every problem of one shard: its files (listed, hashed, intact) and its sample count,
    checked against the declared shapes, the file sizes, the metadata lines and its input slice."""
    where = folder / MANIFEST
    try:
        problems = _file_problems(folder, manifest.get("files"))
        files = manifest.get("files") if isinstance(manifest.get("files"), dict) else {}
        declared = _declared_files(manifest)
        for role, name in declared.items():
            if not is_plain_name(name):
                problems.append(f"{where}: its {role} file {name!r} is not a plain file name inside the shard "
                                "(refused, not read)")
            elif name not in files:
                problems.append(f"{folder / name}: the {role} file is not listed in the manifest's files "
                                "(no size and sha256 to check it against)")
        m = _SHARD_DIR.fullmatch(folder.name)
        if m and manifest.get("shard") != int(m.group(1)):
            problems.append(f"{where}: written as shard {manifest.get('shard')!r}, found in {folder.name}")
        n = manifest.get("num_samples")
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            return problems + [f"{where}: num_samples {n!r} is not a number of samples"]
        # The sample count against everything else that knows it.
        tokens = math.prod(manifest["grid"]) if manifest.get("grid") else None
        for role, width in (("ids", manifest.get("num_codebooks")), ("features", manifest.get("feature_dim"))):
            spec = manifest.get(role)
            if spec is None:
                continue
            shape = spec.get("shape")
            expected_shape = [n, tokens, width]
            if not isinstance(shape, list) or len(shape) != 3 or any(
                    want is not None and got != want for got, want in zip(shape, expected_shape)):
                problems.append(f"{where}: {role} shape {shape}, but num_samples {n}, grid {manifest.get('grid')} "
                                f"and {'num_codebooks' if role == 'ids' else 'feature_dim'} {width} make "
                                f"{[x if x is not None else '?' for x in expected_shape]}")
                continue
            path = folder / spec["file"]
            if is_plain_name(spec["file"]) and path.is_file():
                need = math.prod(shape) * np.dtype(spec["dtype"]).itemsize
                if path.stat().st_size != need:
                    problems.append(f"{path}: {path.stat().st_size} bytes, but {n} samples of shape {shape[1:]} "
                                    f"need {need}")
        meta = folder / declared["meta"]
        if is_plain_name(declared["meta"]) and meta.is_file() and (lines := _count_lines(meta)) != n:
            problems.append(f"{meta}: {lines} lines for num_samples {n}")
        inputs = manifest.get("inputs") or {}
        if "slice" in inputs:
            start, end = inputs["slice"]
            failed = len(manifest.get("failed") or [])
            if n + failed != end - start:
                problems.append(f"{where}: num_samples {n} + {failed} failed input(s) do not account for the "
                                f"{end - start} inputs of its slice [{start}, {end})")
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        problems.append(f"{where}: a field is missing or malformed ({type(exc).__name__}: {exc})")
    return problems


def _set_problems(root: Path, found: list[tuple[int, Path]], manifests: dict[int, dict[str, Any]]) -> list[str]:
    """Shards of one plan: the same inputs and tokenizer, the planned slices, none missing."""
    problems = []
    plan = None  # (key, layout, index) of the first readable manifest
    slices = {}
    for k, manifest in manifests.items():
        try:
            layout = planned_layout(manifest)
            key = (manifest["inputs"].get("list_sha256"), manifest["tokenizer"]["architecture_hash"],
                   manifest["tokenizer"]["weights_sha256"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            problems.append(f"{root / shard_name(k) / MANIFEST}: no readable input plan ({type(exc).__name__}: {exc})")
            continue
        slices[k] = list(manifest["inputs"]["slice"])
        if plan is None:
            plan = (key, layout, k)
            continue
        first = shard_name(plan[2])
        if key[0] != plan[0][0] or layout != plan[1]:
            problems.append(f"{root / shard_name(k)}: written for another input list or shard size than {first} "
                            "(two encodes mixed in one folder)")
        elif key[1:] != plan[0][1:]:
            problems.append(f"{root / shard_name(k)}: written by another tokenizer than {first}")
    if plan is None:
        return problems
    count, size, total = plan[1]
    present = {k for k, _ in found}
    for k in sorted(present):
        if k >= total:
            problems.append(f"{root / shard_name(k)}: not part of the set, planned as {total} shard(s) for {count} inputs")
        elif k in slices and slices[k] != [k * size, min(count, (k + 1) * size)]:
            problems.append(f"{root / shard_name(k) / MANIFEST}: input slice {slices[k]}, "
                            f"planned [{k * size}, {min(count, (k + 1) * size)}]")
    for k in range(total):
        if k not in present:
            problems.append(f"{root / shard_name(k)}: missing (the set was planned as {total} shard(s) for "
                            f"{count} inputs)")
    return problems


def verify_shards(root: str | Path) -> list[str]:
    """Every problem of a shard folder, one line each (empty list: the set is whole and every
    file matches). Damaged manifests are reported, not raised, so that one run lists them all."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"shard folder {root} does not exist")
    found = shard_folders(root)
    if not found:
        raise FileNotFoundError(f"{root} holds no shards (shard-*/manifest.json); create them with `libra-tok encode`")
    problems: list[str] = []
    manifests: dict[int, dict[str, Any]] = {}
    for k, folder in found:
        try:
            manifest = read_manifest(folder)
        except ValueError as exc:
            problems.append(str(exc))
            continue
        manifests[k] = manifest
        problems += _shard_problems(folder, manifest)
    problems += _set_problems(root, found, manifests)
    skipped = root / SKIPPED_FILE
    if skipped.exists():
        try:
            rows = json.loads(skipped.read_text(encoding="utf-8"))
            if not isinstance(rows, list):
                raise ValueError("not a list")
        except (OSError, ValueError) as exc:
            problems.append(f"{skipped}: unreadable list of skipped inputs ({exc})")
    return problems


class ShardSet:
    """Random access over all complete shards of a folder, in shard order."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"shard folder {self.root} does not exist")
        self.shards = [Shard(p) for _, p in shard_folders(self.root)]
        if not self.shards:
            raise FileNotFoundError(f"{self.root} holds no shards (shard-*/manifest.json); create them with `libra-tok encode`")
        self._offsets = np.cumsum([0] + [s.num_samples for s in self.shards])
        first = self.shards[0].manifest
        for s in self.shards[1:]:
            if s.manifest["tokenizer"]["architecture_hash"] != first["tokenizer"]["architecture_hash"]:
                raise ValueError(f"{s.path} was written by another tokenizer than {self.shards[0].path}")

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def manifest(self) -> dict[str, Any]:
        """The first shard's manifest (tokenizer, grid and codebooks are shared by all)."""
        return self.shards[0].manifest

    @property
    def tokenizer_config(self) -> dict[str, Any]:
        return self.manifest["tokenizer"]["config"]

    @property
    def has_features(self) -> bool:
        return all(s.manifest.get("features") for s in self.shards)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [f for s in self.shards for f in s.manifest.get("failed", [])]

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """Inputs left out while listing (symlink loops, duplicates, damaged tars...), with reasons."""
        path = self.root / SKIPPED_FILE
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else []

    def locate(self, index: int) -> tuple[Shard, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        index %= len(self)
        k = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self.shards[k], index - int(self._offsets[k])

    def __getitem__(self, index: int) -> Sample:
        shard, i = self.locate(index)
        feats = shard.features
        return Sample(ids=np.asarray(shard.ids[i]), meta=shard.meta[i],
                      features=None if feats is None else np.asarray(feats[i]))

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def verify(self) -> list[str]:
        """Problems of the whole folder (see `verify_shards`)."""
        return verify_shards(self.root)


def open_shards(root: str | Path) -> ShardSet:
    """Open a folder written by `libra-tok encode` for random access by sample index."""
    return ShardSet(root)


__all__ = ["ShardWriter", "ShardSet", "Shard", "Sample", "open_shards", "read_manifest", "remove_stale_temporaries",
           "sha256_file", "shard_name", "shard_folders", "is_plain_name", "planned_layout", "verify_shards",
           "SKIPPED_FILE"]
