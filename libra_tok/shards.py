"""Id shards on disk: written all-or-nothing, read by memory map.

A shard set is a folder of shard folders, each complete or absent:

    SHARD_DIR/shard-00000/manifest.json   format, tokenizer config + hashes, grid, codebooks,
                                          samples, input slice, failed inputs, per-file sha256
    SHARD_DIR/shard-00000/ids.u16         uint16 (n, tokens, codebooks), C order, little endian
    SHARD_DIR/shard-00000/meta.jsonl      one JSON object per sample: source, member, size, caption
    SHARD_DIR/shard-00000/features.f16    optional float16 (n, tokens, feature_dim)

A shard is written in a hidden temporary folder and renamed into place when complete, so a
crash never leaves a shard that looks whole, and independent processes (ranks, machines)
write disjoint shards into one folder without coordination.
"""

from __future__ import annotations

import hashlib
import json
import os
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


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


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
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: unreadable shard manifest ({exc})") from exc
    if manifest.get("format") != SHARD_FORMAT:
        raise ValueError(f"{path} is not a {SHARD_FORMAT} manifest (format {manifest.get('format')!r})")
    if int(manifest.get("format_version", 0)) > SHARD_VERSION:
        raise ValueError(f"{path} was written by a newer libra (format {manifest['format_version']}); upgrade the package")
    return manifest


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
        self.num_samples = int(self.manifest["num_samples"])
        self._ids: np.ndarray | None = None
        self._features: np.ndarray | None = None
        self._meta: list[dict[str, Any]] | None = None

    def _map(self, spec: dict[str, Any]) -> np.ndarray:
        shape = tuple(spec["shape"])
        if shape[0] == 0:
            return np.zeros(shape, dtype=np.dtype(spec["dtype"]).newbyteorder("<"))
        return np.memmap(self.path / spec["file"], dtype=np.dtype(spec["dtype"]).newbyteorder("<"), mode="r", shape=shape)

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
            lines = (self.path / self.manifest["meta"]["file"]).read_text(encoding="utf-8").splitlines()
            self._meta = [json.loads(line) for line in lines if line]
        return self._meta

    def verify(self) -> list[str]:
        """Problems found (empty list: every file has its recorded size and sha256)."""
        problems = []
        for name, rec in self.manifest["files"].items():
            path = self.path / name
            if not path.is_file():
                problems.append(f"{path}: missing")
            elif path.stat().st_size != rec["bytes"]:
                problems.append(f"{path}: {path.stat().st_size} bytes, manifest says {rec['bytes']}")
            elif sha256_file(path) != rec["sha256"]:
                problems.append(f"{path}: sha256 differs from the manifest (corrupted or modified)")
        return problems


class ShardSet:
    """Random access over all complete shards of a folder, in shard order."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"shard folder {self.root} does not exist")
        self.shards = [Shard(p) for p in sorted(self.root.glob("shard-*")) if p.is_dir()]
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
        return [p for s in self.shards for p in s.verify()]


def open_shards(root: str | Path) -> ShardSet:
    """Open a folder written by `libra-tok encode` for random access by sample index."""
    return ShardSet(root)


__all__ = ["ShardWriter", "ShardSet", "Shard", "Sample", "open_shards", "read_manifest", "remove_stale_temporaries",
           "sha256_file", "shard_name"]
