"""Image inputs: folders, file lists and webdataset-style tar shards; decoding that never
raises on a bad file (the reason is returned and counted instead).

A record names one image: a file path, or a tar member (`shard.tar` + member name, read
by offset without extracting). Captions come from a sidecar `.txt` beside a file or from
the `.txt` / `.json` member of the same key in a tar.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from .preprocess import normalize, preprocess_image, to_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LIST_EXTENSIONS = (".txt", ".lst")
DEFAULT_MAX_PIXELS = 1 << 28  # 268 M pixels; larger images are refused (decompression bombs)


@dataclass(frozen=True)
class ImageRecord:
    source: str  # file path, or tar path for tar members
    member: str | None = None  # tar member name
    offset: int = 0  # byte offset of the member's data in the tar
    size: int = 0  # member size in bytes
    caption: str | None = None

    @classmethod
    def from_meta(cls, meta: dict) -> "ImageRecord":
        """The record of a shard sample's metadata (`libra_tok.shards`), to read its image again."""
        return cls(str(meta["source"]), meta.get("member"), int(meta.get("offset", 0)), int(meta.get("size", 0)),
                   meta.get("caption"))

    @property
    def name(self) -> str:
        return f"{self.source}::{self.member}" if self.member else self.source

    def read_bytes(self) -> bytes:
        if self.member is None:
            return Path(self.source).read_bytes()
        with open(self.source, "rb") as fh:
            fh.seek(self.offset)
            data = fh.read(self.size)
        if len(data) != self.size:
            raise OSError(f"tar member truncated ({len(data)} of {self.size} bytes)")
        return data


class ImageReadError(Exception):
    """An input could not be decoded; `str(err)` is the reason, recorded, never fatal."""


def _is_image(path: str | Path) -> bool:
    return str(path).lower().endswith(IMAGE_EXTENSIONS)


def _sidecar_caption(path: Path) -> str | None:
    txt = path.with_suffix(".txt")
    if txt.is_file():
        try:
            return txt.read_text(encoding="utf-8", errors="replace").strip()
        except OSError:
            return None
    return None


_FILE_KEYS = ("file", "image", "path", "file_name", "filename")
_TEXT_KEYS = ("caption", "text", "alt", "prompt")


def _caption_table(folder: Path) -> dict[str, str]:
    """Captions from `captions.jsonl` or `captions.csv` in `folder`: relative image path ->
    caption (columns/keys: file|image|path|file_name and caption|text|alt|prompt)."""
    rows: list[dict] = []
    jsonl, csv_path = folder / "captions.jsonl", folder / "captions.csv"
    if jsonl.is_file():
        for n, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{jsonl}:{n}: not a JSON object ({exc.msg})") from None
    elif csv_path.is_file():
        import csv

        with open(csv_path, newline="", encoding="utf-8") as fh:
            rows = list(csv.DictReader(fh))
    table = {}
    for row in rows:
        if not isinstance(row, dict):
            continue
        name = next((row[k] for k in _FILE_KEYS if row.get(k)), None)
        text = next((row[k] for k in _TEXT_KEYS if row.get(k)), None)
        if name and text:
            table[Path(str(name)).as_posix().removeprefix("./")] = str(text).strip()
    return table


def _tar_records(path: Path) -> list[ImageRecord]:
    """Image members of a webdataset-style tar (key.ext groups), captions from key.txt/key.json."""
    images: list[tarfile.TarInfo] = []
    captions: dict[str, str] = {}
    with tarfile.open(path, "r:") as tar:  # uncompressed: members are read by offset later
        for info in tar:
            if not info.isfile():
                continue
            key, ext = os.path.splitext(info.name)
            ext = ext.lower()
            if ext in IMAGE_EXTENSIONS:
                images.append(info)
            elif ext in (".txt", ".json"):
                data = tar.extractfile(info).read().decode("utf-8", errors="replace")
                if ext == ".json":
                    try:
                        obj = json.loads(data)
                    except json.JSONDecodeError:
                        continue
                    text = obj.get("caption") or obj.get("text") if isinstance(obj, dict) else None
                    if text and key not in captions:
                        captions[key] = str(text).strip()
                else:
                    captions[key] = data.strip()
    return [
        ImageRecord(str(path), info.name, info.offset_data, info.size, captions.get(os.path.splitext(info.name)[0]))
        for info in images
    ]


def list_images(inputs: Iterable[str | Path], recursive: bool = True) -> list[ImageRecord]:
    """Expand folders (recursively, sorted), list files (.txt/.lst: one path per line, relative
    to the list), tar shards and single image files into records, in a stable order."""
    records: list[ImageRecord] = []
    for item in inputs:
        path = Path(item).expanduser()
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            files = sorted(p for p in path.glob(pattern) if p.is_file() and _is_image(p))
            table = _caption_table(path)
            records.extend(ImageRecord(str(p), caption=_sidecar_caption(p) or table.get(p.relative_to(path).as_posix()))
                           for p in files)
            records.extend(r for t in sorted(path.glob(pattern)) if t.suffix == ".tar" for r in _tar_records(t))
        elif path.is_file() and path.suffix == ".tar":
            records.extend(_tar_records(path))
        elif path.is_file() and path.suffix.lower() in LIST_EXTENSIONS:
            for line in path.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    entry = Path(line) if Path(line).is_absolute() else path.parent / line
                    records.append(ImageRecord(str(entry), caption=_sidecar_caption(entry)))
        elif path.is_file():
            records.append(ImageRecord(str(path), caption=_sidecar_caption(path)))
        else:
            raise FileNotFoundError(f"input {path} does not exist (expected an image folder, file list, tar shard or image)")
    return records


def decode_image_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes to 8-bit RGB; any failure is an ImageReadError with the reason
    (empty, not an image, corrupt/truncated, too many pixels, degenerate size)."""
    if not data:
        raise ImageReadError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            if width * height > max_pixels:
                raise ImageReadError(f"too many pixels ({width}x{height} > {max_pixels})")
            if width < 1 or height < 1:
                raise ImageReadError(f"degenerate size {width}x{height}")
            image.load()
            return to_rgb(image)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"too many pixels: {exc}") from None
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        reason = "not an image" if type(exc).__name__ == "UnidentifiedImageError" else f"corrupt image: {exc}"
        raise ImageReadError(reason) from None


def read_image(record: ImageRecord, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Read and decode a record to 8-bit RGB; failures become an ImageReadError with the reason."""
    try:
        data = record.read_bytes()
    except PermissionError:
        raise ImageReadError("permission denied") from None
    except OSError as exc:
        raise ImageReadError(f"cannot read: {exc.strerror or exc}") from None
    return decode_image_bytes(data, max_pixels)


class EvalImages(Dataset):
    """Records -> (index, pixels (3, R, R) CLIP-normalised) or (index, reason) for bad files."""

    def __init__(self, records: Sequence[ImageRecord], resolution: int, pad_mode: str = "pad",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        from .config import CLIP_MEAN, CLIP_STD

        self.records = list(records)
        self.resolution = resolution
        self.pad_mode = pad_mode
        self.mean = tuple(mean or CLIP_MEAN)
        self.std = tuple(std or CLIP_STD)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        try:
            image = read_image(self.records[index])
        except ImageReadError as err:
            return index, str(err)
        return index, preprocess_image(image, self.resolution, self.pad_mode, self.mean, self.std)


class TrainImages(Dataset):
    """Random-resized-crop + flip training views. Items are keyed by (index, sample_seed) so
    an augmentation depends only on its key: identical across workers, restarts and ranks."""

    def __init__(self, records: Sequence[ImageRecord], resolution: int, crop_scale: tuple[float, float] = (0.5, 1.0),
                 flip: bool = True, mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 cache: bool = False):
        from .config import CLIP_MEAN, CLIP_STD

        self.records = list(records)
        self.resolution = resolution
        self.crop_scale = tuple(crop_scale)
        self.flip = flip
        self.mean = tuple(mean or CLIP_MEAN)
        self.std = tuple(std or CLIP_STD)
        self.cache: dict[int, Image.Image] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.records)

    def _image(self, index: int) -> Image.Image:
        if self.cache is not None and index in self.cache:
            return self.cache[index]
        image = read_image(self.records[index])
        if self.cache is not None:
            # Shrink what is kept: a crop of >= 1/4 of the area still needs no upsampling.
            side = 2 * self.resolution
            if min(image.size) > side:
                scale = side / min(image.size)
                image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                                     Image.Resampling.BICUBIC)
            self.cache[index] = image
        return image

    def __getitem__(self, key: tuple[int, int]):
        index, sample_seed = key
        try:
            image = self._image(index)
        except ImageReadError as err:
            return index, str(err)
        from torchvision.transforms import RandomResizedCrop
        from torchvision.transforms.functional import InterpolationMode, hflip, pil_to_tensor, resized_crop

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            top, left, h, w = RandomResizedCrop.get_params(image, list(self.crop_scale), [3 / 4, 4 / 3])
            flip = self.flip and bool(torch.rand(()) < 0.5)
        r = self.resolution
        view = resized_crop(image, top, left, h, w, [r, r], interpolation=InterpolationMode.BICUBIC, antialias=True)
        if flip:
            view = hflip(view)
        pixels = pil_to_tensor(view).float() / 255.0
        return index, normalize(pixels, self.mean, self.std)


def collate_images(batch):
    """Stack good items; bad ones (a reason string instead of pixels) are returned apart."""
    good = [(i, x) for i, x in batch if isinstance(x, torch.Tensor)]
    bad = [(i, x) for i, x in batch if not isinstance(x, torch.Tensor)]
    indices = torch.tensor([i for i, _ in good], dtype=torch.long)
    pixels = torch.stack([x for _, x in good]) if good else None
    return indices, pixels, bad


__all__ = [
    "IMAGE_EXTENSIONS",
    "ImageRecord",
    "ImageReadError",
    "list_images",
    "read_image",
    "decode_image_bytes",
    "EvalImages",
    "TrainImages",
    "collate_images",
]
