"""Id shards: the one on-disk format between the tokenizer and the LM. This module owns all of
it: the manifest (`ShardManifest`), the writer (`ShardWriter`, all-or-nothing), the reader
(`ShardSet` over one or many shard folders, memory maps, metadata read per sample) and the
checks (`verify_shards`).

A shard set is a folder of shard folders, each complete or absent:

    SHARD_DIR/shard-00000/manifest.json   format and version, shard index, sample count, the file
                                          specs, tokenizer identity, grid, codebooks, feature size,
                                          precision, input plan, failed inputs, per-file sha256
    SHARD_DIR/shard-00000/ids.u16         uint16 (n, tokens, codebooks), C order, little endian
    SHARD_DIR/shard-00000/meta.jsonl      one JSON object per sample: source, member, size, caption
    SHARD_DIR/shard-00000/meta.idx        (format 2) per sample 9 bytes: the uint64 little-endian
                                          byte offset of its meta.jsonl line, uint8 1 if it has a caption
    SHARD_DIR/shard-00000/features.f16    optional float16 (n, tokens, feature_dim)
    SHARD_DIR/skipped_inputs.json         inputs left out while listing (when there were any)

A shard is written in a hidden temporary folder and renamed into place when complete, so a
crash never leaves a shard that looks whole, and independent processes (ranks, machines)
write disjoint shards into one folder without coordination.

Every manifest records the plan of the whole set (input count, shard size, number of
shards), so `verify_shards` can tell a deleted shard folder from a set that never had it.
Format 1 sets (no meta.idx) stay readable: their metadata index is built by parsing
meta.jsonl once, when it is first needed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .fileio import current_umask

log = logging.getLogger("libra_tok.shards")

SHARD_FORMAT = "libra-shards"
SHARD_VERSION = 2  # 2: meta.idx (per-sample metadata offsets and caption flags)
MANIFEST = "manifest.json"
IDS_FILE = "ids.u16"
META_FILE = "meta.jsonl"
META_INDEX_FILE = "meta.idx"
FEATURES_FILE = "features.f16"
SKIPPED_FILE = "skipped_inputs.json"
# One record per sample, packed (9 bytes): where its meta.jsonl line starts, and whether it has a caption.
META_INDEX_DTYPE = np.dtype([("offset", "<u8"), ("captioned", "u1")])
_SHARD_DIR = re.compile(r"shard-(\d+)")
_VERIFY_HINT = "`libra-tok verify {}` checks every file"


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


def has_caption(meta: Any) -> bool:
    """Whether a metadata record carries a caption (a non-empty string)."""
    return isinstance(meta, dict) and isinstance(meta.get("caption"), str) and meta["caption"] != ""


def sha256_file(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


# ---- the manifest -----------------------------------------------------------------------------------
@dataclass
class ArraySpec:
    """A memory-mappable array file of a shard: its name, numpy dtype and shape."""

    file: str
    dtype: str
    shape: list[int]

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "dtype": self.dtype, "shape": list(self.shape)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ArraySpec:
        return cls(str(data["file"]), str(data["dtype"]), [int(x) for x in data["shape"]])


@dataclass
class MetaSpec:
    """The metadata file (JSON lines) and, from format 2 on, its index file."""

    file: str
    index: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, **({"index": self.index} if self.index is not None else {})}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetaSpec:
        index = data.get("index")
        return cls(str(data["file"]), None if index is None else str(index))


# Fields a manifest of this version defines; anything else is kept as written in `extras`.
_FIELDS = ("format", "format_version", "shard", "num_samples", "ids", "features", "meta", "tokenizer", "grid",
           "num_codebooks", "codebook_size", "feature_dim", "precision", "max_pixels", "inputs", "failed", "files")


@dataclass
class ShardManifest:
    """What a shard's manifest.json holds: written by `ShardWriter.commit`, checked when read.

    tokenizer: the identity of the image tokenizer that wrote the ids (`config`,
    `architecture_hash`, `weights_sha256`, `source`); inputs: the plan of the whole set
    (`count`, `list_sha256`, `slice` [start, end), `shard_size`, `num_shards`); failed: the
    inputs of this shard's slice that could not be read, with the reason; files: name ->
    {"sha256", "bytes"} of every data file."""

    shard: int
    num_samples: int
    ids: ArraySpec
    meta: MetaSpec
    tokenizer: dict[str, Any]
    grid: list[int]
    num_codebooks: int
    codebook_size: int
    feature_dim: int
    features: ArraySpec | None = None
    precision: str | None = None
    max_pixels: int | None = None
    inputs: dict[str, Any] = field(default_factory=dict)
    failed: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, dict[str, Any]] = field(default_factory=dict)
    format: str = SHARD_FORMAT
    format_version: int = SHARD_VERSION
    extras: dict[str, Any] = field(default_factory=dict)  # fields this version does not define

    @property
    def num_tokens(self) -> int:
        return int(self.ids.shape[1])

    @property
    def tokenizer_key(self) -> tuple[Any, Any]:
        """(architecture hash, weights sha256): shards read together must agree on it."""
        return self.tokenizer.get("architecture_hash"), self.tokenizer.get("weights_sha256")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "format": self.format,
            "format_version": self.format_version,
            "shard": self.shard,
            "num_samples": self.num_samples,
            "ids": self.ids.to_dict(),
            "features": self.features.to_dict() if self.features is not None else None,
            "meta": self.meta.to_dict(),
            "tokenizer": self.tokenizer,
            "grid": list(self.grid),
            "num_codebooks": self.num_codebooks,
            "codebook_size": self.codebook_size,
            "feature_dim": self.feature_dim,
            "inputs": self.inputs,
            "failed": self.failed,
            "files": self.files,
        }
        for name in ("precision", "max_pixels"):  # absent from older manifests: written only when known
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return {**self.extras, **out}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardManifest:
        """The manifest of a JSON dict; a missing or malformed field is a ValueError naming it."""
        try:
            features = data.get("features")
            return cls(
                shard=int(data["shard"]),
                num_samples=int(data["num_samples"]),
                ids=ArraySpec.from_dict(data["ids"]),
                meta=MetaSpec.from_dict(data["meta"]),
                tokenizer=dict(data["tokenizer"]),
                grid=[int(x) for x in data["grid"]],
                num_codebooks=int(data["num_codebooks"]),
                codebook_size=int(data["codebook_size"]),
                feature_dim=int(data["feature_dim"]),
                features=None if features is None else ArraySpec.from_dict(features),
                precision=data.get("precision"),
                max_pixels=None if data.get("max_pixels") is None else int(data["max_pixels"]),
                inputs=dict(data.get("inputs") or {}),
                failed=list(data.get("failed") or []),
                files=dict(data.get("files") or {}),
                format=str(data.get("format", SHARD_FORMAT)),
                format_version=int(data.get("format_version", 1)),
                extras={k: v for k, v in data.items() if k not in _FIELDS},
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"a field is missing or malformed ({type(exc).__name__}: {exc})") from None

    # The JSON dict's reading, for callers written against manifest dicts (prefer the attributes).

def planned_layout(manifest: dict[str, Any] | ShardManifest) -> tuple[int, int, int]:
    """(inputs, shard size, number of shards) of the set a shard belongs to. Manifests
    written before the plan was recorded are inferred from their slice and shard index:
    every shard but the last holds exactly `shard size` inputs."""
    if isinstance(manifest, ShardManifest):
        manifest = manifest.to_dict()
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


def read_manifest(shard: Path) -> dict[str, Any]:
    """The manifest.json of a shard folder as written (a dict), with its format and version
    checked; `load_manifest` also checks its fields and gives the `ShardManifest`."""
    path = Path(shard) / MANIFEST
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:  # ValueError: JSON or UTF-8 decoding
        raise ValueError(f"{path}: unreadable shard manifest ({exc})") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != SHARD_FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise ValueError(f"{path} is not a {SHARD_FORMAT} manifest (format {found!r})")
    if int(manifest.get("format_version", 0)) > SHARD_VERSION:
        raise ValueError(f"{path} was written by a newer libra (format {manifest['format_version']}); "
                         "upgrade the package")
    return manifest


def load_manifest(shard: Path) -> ShardManifest:
    """The checked manifest of a shard folder: fields that contradict each other or name files
    outside the shard are refused (no data file is read)."""
    shard = Path(shard)
    raw = read_manifest(shard)
    try:
        problems = _layout_problems(raw)
    except (KeyError, TypeError, AttributeError) as exc:
        problems = [f"a field is missing or malformed ({type(exc).__name__}: {exc})"]
    if not problems:
        try:
            return ShardManifest.from_dict(raw)
        except ValueError as exc:
            problems = [str(exc)]
    # Never follow a name out of the shard, never index past the data.
    raise ValueError(f"{shard / MANIFEST}: {problems[0]}; the shard is damaged or was edited "
                     f"(`libra-tok verify {shard.parent}` lists every problem)")


def _declared_files(manifest: dict[str, Any]) -> dict[str, Any]:
    """What each data file of the shard is called: {"ids", "meta"[, "meta index"][, "features"]: name}."""
    files = {"ids": manifest["ids"]["file"], "meta": manifest["meta"]["file"]}
    if manifest["meta"].get("index") is not None:
        files["meta index"] = manifest["meta"]["index"]
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


# ---- writing ------------------------------------------------------------------------------------------
class ShardWriter:
    """Streams one shard into a temporary folder; `commit()` renames it into place."""

    def __init__(self, root: str | Path, index: int, tokens: int, codebooks: int, feature_dim: int | None):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.index = index
        self.final = self.root / shard_name(index)
        self.tmp = Path(tempfile.mkdtemp(prefix=f".{shard_name(index)}.", suffix=".tmp", dir=self.root))
        os.chmod(self.tmp, 0o777 & ~current_umask())  # mkdtemp makes 0700; shards are ordinary folders
        self.tokens, self.codebooks, self.feature_dim = tokens, codebooks, feature_dim
        self._ids = open(self.tmp / IDS_FILE, "wb")
        self._meta = open(self.tmp / META_FILE, "wb")
        self._meta_index = open(self.tmp / META_INDEX_FILE, "wb")
        self._features = open(self.tmp / FEATURES_FILE, "wb") if feature_dim else None
        self._meta_bytes = 0
        self.count = 0

    def add(self, ids: np.ndarray, meta: Sequence[dict[str, Any]], features: np.ndarray | None = None) -> None:
        """ids (b, tokens, codebooks) ints < 65536; meta: b dicts; features (b, tokens, C)."""
        if ids.shape[1:] != (self.tokens, self.codebooks):
            raise ValueError(f"ids of shape {ids.shape[1:]} do not fit a shard of ({self.tokens}, {self.codebooks})")
        if len(meta) != ids.shape[0]:
            raise ValueError("one metadata record per sample is needed")
        self._ids.write(np.ascontiguousarray(ids, dtype="<u2").tobytes())
        index = np.zeros(len(meta), META_INDEX_DTYPE)
        for k, row in enumerate(meta):
            line = (json.dumps(row, ensure_ascii=False, sort_keys=True) + "\n").encode("utf-8")
            index[k] = (self._meta_bytes, has_caption(row))
            self._meta.write(line)
            self._meta_bytes += len(line)
        self._meta_index.write(index.tobytes())
        if self._features is not None:
            if features is None or features.shape != (ids.shape[0], self.tokens, self.feature_dim):
                raise ValueError(f"features of shape (b, {self.tokens}, {self.feature_dim}) are required in this shard")
            self._features.write(np.ascontiguousarray(features, dtype="<f2").tobytes())
        self.count += ids.shape[0]

    def _files(self) -> list[Any]:
        return [self._ids, self._meta, self._meta_index] + ([self._features] if self._features is not None else [])

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Close the files, hash them, write the manifest (this shard's layout and files, plus the
        fields of `manifest`: tokenizer, grid, codebooks, feature_dim, precision, inputs, failed
        ...), rename the folder into place."""
        for fh in self._files():
            fh.close()
        hashes = {}
        for fh in self._files():
            path = Path(fh.name)
            _fsync(path)
            hashes[path.name] = {"sha256": sha256_file(path), "bytes": path.stat().st_size}
        features = (ArraySpec(FEATURES_FILE, "float16", [self.count, self.tokens, self.feature_dim])
                    if self._features is not None else None)
        record = ShardManifest.from_dict({
            **manifest,
            "format": SHARD_FORMAT,
            "format_version": SHARD_VERSION,
            "shard": self.index,
            "num_samples": self.count,
            "ids": ArraySpec(IDS_FILE, "uint16", [self.count, self.tokens, self.codebooks]).to_dict(),
            "features": features.to_dict() if features is not None else None,
            "meta": MetaSpec(META_FILE, META_INDEX_FILE).to_dict(),
            "files": hashes,
        })
        (self.tmp / MANIFEST).write_text(json.dumps(record.to_dict(), indent=1, sort_keys=True) + "\n")
        _fsync(self.tmp / MANIFEST)
        if self.final.exists():
            raise FileExistsError(f"{self.final} appeared while it was being written (two writers for one shard?)")
        os.rename(self.tmp, self.final)
        return self.final

    def abort(self) -> None:
        for fh in self._files():
            if not fh.closed:
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


# ---- reading ----------------------------------------------------------------------------------------
def index_meta_lines(path: str | Path) -> np.ndarray:
    """The metadata index of a meta.jsonl built by parsing it (format 1 sets, and files edited
    after writing): per non-empty line its byte offset and whether it has a caption."""
    path = Path(path)
    offsets, captioned = [], []
    position = 0
    with open(path, "rb") as fh:
        for number, line in enumerate(fh, 1):
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError as exc:  # JSON or UTF-8 decoding
                    raise ValueError(f"{path}:{number}: not a JSON object ({exc}); the shard is damaged") from None
                offsets.append(position)
                captioned.append(has_caption(row))
            position += len(line)
    index = np.zeros(len(offsets), META_INDEX_DTYPE)
    index["offset"] = offsets
    index["captioned"] = captioned
    return index


@dataclass
class Sample:
    ids: np.ndarray  # (tokens, codebooks) uint16
    meta: dict[str, Any]
    features: np.ndarray | None  # (tokens, C) float16, when stored


class Shard:
    """One complete shard folder: its checked manifest, memory maps of its arrays, and its
    metadata read one sample at a time through the index (meta.idx, or parsed for format 1)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = load_manifest(self.path)
        self.num_samples = self.manifest.num_samples
        self._ids: np.ndarray | None = None
        self._features: np.ndarray | None = None
        self._index: np.ndarray | None = None

    def __getstate__(self) -> dict[str, Any]:
        # Memory maps are reopened in each process (data-loader workers).
        return {**self.__dict__, "_ids": None, "_features": None, "_index": None}

    def _damaged(self, what: str) -> ValueError:
        return ValueError(f"{what} (damaged shard; {_VERIFY_HINT.format(self.path.parent)})")

    def _map(self, spec: ArraySpec | tuple[str, np.dtype, tuple[int, ...]]) -> np.ndarray:
        name, dtype, shape = ((spec.file, np.dtype(spec.dtype), tuple(spec.shape)) if isinstance(spec, ArraySpec)
                              else spec)
        dtype = dtype.newbyteorder("<") if dtype.fields is None else dtype
        if shape[0] == 0:
            return np.zeros(shape, dtype=dtype)
        path = self.path / name
        expected = math.prod(shape) * dtype.itemsize
        if path.stat().st_size != expected:
            raise self._damaged(f"{path}: {path.stat().st_size} bytes, its shape {list(shape)} needs {expected}")
        return np.memmap(path, dtype=dtype, mode="r", shape=shape)

    @property
    def ids(self) -> np.ndarray:
        if self._ids is None:
            self._ids = self._map(self.manifest.ids)
        return self._ids

    @property
    def features(self) -> np.ndarray | None:
        if self.manifest.features is None:
            return None
        if self._features is None:
            self._features = self._map(self.manifest.features)
        return self._features

    @property
    def meta_path(self) -> Path:
        return self.path / self.manifest.meta.file

    @property
    def index(self) -> np.ndarray:
        """(num_samples,) records `offset` (of the sample's meta.jsonl line), `captioned`."""
        if self._index is None:
            spec = self.manifest.meta
            recorded = (self.manifest.files.get(spec.file) or {}).get("bytes")
            if spec.index is not None and recorded == self.meta_path.stat().st_size:
                self._index = self._map((spec.index, META_INDEX_DTYPE, (self.num_samples,)))
            else:
                if spec.index is not None:  # the index belongs to another meta.jsonl than this one
                    log.warning("%s is not the file its index %s was written for (edited?): indexing it by "
                                "parsing; %s", self.meta_path, spec.index, _VERIFY_HINT.format(self.path.parent))
                index = index_meta_lines(self.meta_path)
                if len(index) != self.num_samples:
                    raise self._damaged(f"{self.meta_path} has {len(index)} lines for {self.num_samples} samples")
                self._index = index
        return self._index

    @property
    def captioned(self) -> np.ndarray:
        """(num_samples,) bool: which samples have a caption."""
        return np.asarray(self.index["captioned"], dtype=bool)

    def read_meta(self, i: int) -> dict[str, Any]:
        """Metadata of sample `i` of this shard (source, member, size, caption ...)."""
        offset = int(self.index["offset"][i])
        with open(self.meta_path, "rb") as fh:
            fh.seek(max(offset - 1, 0))
            if offset and fh.read(1) != b"\n":
                raise self._damaged(f"{self.meta_path}: its index says sample {i} starts at byte {offset}, which "
                                    "does not start a line")
            line = fh.readline()
        try:
            return json.loads(line)
        except ValueError:
            raise self._damaged(f"{self.meta_path}: the line of sample {i} (byte {offset}) is not a JSON object") \
                from None

    def iter_meta(self) -> Iterator[dict[str, Any]]:
        """Metadata of every sample in order, streamed (a line count that disagrees with
        num_samples is a ValueError at the end: sample numbers would not match the ids)."""
        count = 0
        with open(self.meta_path, encoding="utf-8") as fh:
            for line in fh:
                if line.strip():
                    count += 1
                    yield json.loads(line)
        if count != self.num_samples:
            raise self._damaged(f"{self.meta_path} has {count} lines for {self.num_samples} samples")

    def verify(self) -> list[str]:
        """Problems of this shard alone (empty list: every declared file is listed, present, of
        its recorded size and sha256, and agrees with num_samples); see `verify_shards`."""
        return _shard_problems(self.path, read_manifest(self.path))


class ShardSet:
    """Random access over every complete shard of one or more shard folders (in the order
    given, each in shard order), all written by one image tokenizer."""

    def __init__(self, roots: str | os.PathLike | Sequence[str | os.PathLike]):
        roots = [roots] if isinstance(roots, (str, os.PathLike)) else list(roots)
        if not roots:
            raise ValueError("no shard folder given")
        self.roots = [Path(r) for r in roots]
        self.shards: list[Shard] = []
        for root in self.roots:
            if not root.is_dir():
                raise FileNotFoundError(f"shard folder {root} does not exist")
            found = [Shard(p) for _, p in shard_folders(root)]
            if not found:
                raise FileNotFoundError(f"{root} holds no shards (shard-*/manifest.json); create them with "
                                        "`libra-tok encode`")
            self.shards += found
        self._offsets = np.cumsum([0] + [s.num_samples for s in self.shards])
        first = self.shards[0]
        for s in self.shards[1:]:
            if s.manifest.tokenizer_key == first.manifest.tokenizer_key:
                continue
            if s.path.parent == first.path.parent:
                raise ValueError(f"{s.path} was written by another tokenizer than {first.path}")
            raise ValueError(f"{s.path.parent} was encoded by another image tokenizer than {first.path.parent}; "
                             "all shard folders read together must come from one tokenizer")

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def root(self) -> Path:
        """The (first) folder the set was opened on."""
        return self.roots[0]

    @property
    def manifest(self) -> ShardManifest:
        """The first shard's manifest (tokenizer, grid and codebooks are shared by all)."""
        return self.shards[0].manifest

    @property
    def tokenizer(self) -> dict[str, Any]:
        """The identity of the image tokenizer that wrote the ids (config, hashes, source)."""
        return self.manifest.tokenizer

    @property
    def tokenizer_config(self) -> dict[str, Any]:
        return self.tokenizer["config"]

    @property
    def num_tokens(self) -> int:
        return self.manifest.num_tokens

    @property
    def num_codebooks(self) -> int:
        return self.manifest.num_codebooks

    @property
    def codebook_size(self) -> int:
        return self.manifest.codebook_size

    @property
    def feature_dim(self) -> int:
        return self.manifest.feature_dim

    @property
    def has_features(self) -> bool:
        return all(s.manifest.features is not None for s in self.shards)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [f for s in self.shards for f in s.manifest.failed]

    @property
    def skipped(self) -> list[dict[str, Any]]:
        """Inputs left out while listing (symlink loops, duplicates, damaged tars...), with reasons."""
        rows = []
        for root in self.roots:
            path = root / SKIPPED_FILE
            if path.is_file():
                rows += json.loads(path.read_text(encoding="utf-8"))
        return rows

    @property
    def captioned(self) -> np.ndarray:
        """(len,) bool: which samples have a caption (from the metadata indexes)."""
        return np.concatenate([s.captioned for s in self.shards])

    def locate(self, index: int) -> tuple[Shard, int]:
        if not -len(self) <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        index %= len(self)
        k = int(np.searchsorted(self._offsets, index, side="right")) - 1
        return self.shards[k], index - int(self._offsets[k])

    def ids(self, index: int) -> np.ndarray:
        """(tokens, codebooks) uint16 ids of sample `index`."""
        shard, i = self.locate(index)
        return np.asarray(shard.ids[i])

    def features(self, index: int) -> np.ndarray | None:
        """(tokens, C) float16 CLIP features of sample `index`, when stored."""
        shard, i = self.locate(index)
        feats = shard.features
        return None if feats is None else np.asarray(feats[i])

    def meta(self, index: int) -> dict[str, Any]:
        """Metadata of sample `index` (source, member, size, caption ...), read from its shard."""
        shard, i = self.locate(index)
        return shard.read_meta(i)

    def iter_meta(self) -> Iterator[dict[str, Any]]:
        """Metadata of every sample in order, streamed."""
        for shard in self.shards:
            yield from shard.iter_meta()

    def __getitem__(self, index: int) -> Sample:
        shard, i = self.locate(index)
        feats = shard.features
        return Sample(ids=np.asarray(shard.ids[i]), meta=shard.read_meta(i),
                      features=None if feats is None else np.asarray(feats[i]))

    def __iter__(self) -> Iterator[Sample]:
        for i in range(len(self)):
            yield self[i]

    def verify(self) -> list[str]:
        """Problems of every folder of the set (see `verify_shards`)."""
        return [p for root in self.roots for p in verify_shards(root)]


def open_shards(roots: str | os.PathLike | Sequence[str | os.PathLike]) -> ShardSet:
    """Open one folder written by `libra-tok encode`, or several as one set, for random access
    by sample index."""
    return ShardSet(roots)


# ---- verifying ----------------------------------------------------------------------------------------
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


def _index_problems(index: Path, meta: Path, n: int) -> list[str]:
    """The stored metadata index against the one parsing meta.jsonl gives."""
    if index.stat().st_size != n * META_INDEX_DTYPE.itemsize:
        return [f"{index}: {index.stat().st_size} bytes, but {n} samples need {n * META_INDEX_DTYPE.itemsize}"]
    try:
        parsed = index_meta_lines(meta)
    except ValueError as exc:
        return [str(exc)]
    stored = np.fromfile(index, dtype=META_INDEX_DTYPE)
    if len(parsed) == n and not np.array_equal(stored, parsed):
        return [f"{index}: does not index {meta} (line offsets or caption flags differ)"]
    return []


def _shard_problems(folder: Path, manifest: dict[str, Any]) -> list[str]:
    """Every problem of one shard: its files (listed, hashed, intact) and its sample count,
    checked against the declared shapes, the file sizes, the metadata lines and index, and its
    input slice."""
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
                    want is not None and got != want for got, want in zip(shape, expected_shape, strict=True)):
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
        lines = None
        if is_plain_name(declared["meta"]) and meta.is_file() and (lines := _count_lines(meta)) != n:
            problems.append(f"{meta}: {lines} lines for num_samples {n}")
        index = declared.get("meta index")
        if index is not None and is_plain_name(index) and (folder / index).is_file() and lines is not None:
            problems += _index_problems(folder / index, meta, n)
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
            problems.append(f"{root / shard_name(k)}: not part of the set, planned as {total} shard(s) "
                            f"for {count} inputs")
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


__all__ = ["ShardManifest", "ArraySpec", "MetaSpec", "ShardWriter", "ShardSet", "Shard", "Sample", "open_shards",
           "read_manifest", "load_manifest", "index_meta_lines", "has_caption", "remove_stale_temporaries",
           "sha256_file", "shard_name", "shard_folders", "is_plain_name", "planned_layout", "verify_shards",
           "SKIPPED_FILE", "SHARD_VERSION", "META_INDEX_DTYPE"]
