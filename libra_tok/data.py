"""Image inputs: folders, file lists and webdataset-style tar shards; decoding that never
raises on a bad file (the reason is returned and counted instead).

A record names one image: a file path, or a tar member (`shard.tar` + member name, read
by offset without extracting). Captions come from a sidecar `.txt` beside a file or from
the `.txt` / `.json` member of the same key in a tar.

Listing (`scan_inputs`) never raises for damaged data: a truncated tar keeps the members
before the damage, and every input left out (symlink loop, dangling link, unlistable
folder, FIFO or device, duplicate) is returned with its reason. Reading a record is
bounded: non-regular files are never opened and oversized files never read.
"""

from __future__ import annotations

import errno
import io
import json
import os
import stat
import tarfile
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from .config import CLIP_MEAN, CLIP_STD
from .jsonl import iter_json_lines
from .preprocess import normalize, preprocess_image, to_rgb

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
LIST_EXTENSIONS = (".txt", ".lst")
DEFAULT_MAX_PIXELS = 1 << 28  # 268 M pixels; larger images are refused (decompression bombs)
# Encoded image files are read whole into memory before decoding, so their size is capped
# before anything is read. Compressed formats stay far below this even at DEFAULT_MAX_PIXELS;
# only uncompressed BMP/TIFF above ~170 M RGB pixels are refused by it.
DEFAULT_MAX_FILE_BYTES = 512 << 20
# Caption members of a tar are read while listing; a caption is a line of text, so anything
# larger is not one (and is not read).
MAX_CAPTION_BYTES = 1 << 20


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

    def read_bytes(self, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> bytes:
        """The encoded bytes, at most `max_bytes` of them: a non-regular file (FIFO, device,
        folder) or a larger file/member is an ImageReadError before anything is read; other
        failures are OSErrors."""
        # stat before open: opening a FIFO blocks until a writer comes, a device may never end.
        if not stat.S_ISREG(os.stat(self.source).st_mode):
            raise ImageReadError("not a regular file")
        if self.member is not None and self.size > max_bytes:
            raise ImageReadError(_too_large(self.size, max_bytes))
        # O_NONBLOCK: should the path be replaced by a FIFO after the stat, open still returns.
        fd = os.open(self.source, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as fh:
            info = os.fstat(fh.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise ImageReadError("not a regular file")
            if self.member is None:
                if info.st_size > max_bytes:
                    raise ImageReadError(_too_large(info.st_size, max_bytes))
                return fh.read(info.st_size)
            fh.seek(self.offset)
            data = fh.read(self.size)
        if len(data) != self.size:
            raise OSError(f"tar member truncated ({len(data)} of {self.size} bytes)")
        return data


def _too_large(size: int, limit: int) -> str:
    return f"file too large ({size} bytes > limit of {limit} bytes)"


class ImageReadError(Exception):
    """An input could not be decoded; `str(err)` is the reason, recorded, never fatal."""


@dataclass
class InputScan:
    """What `scan_inputs` found: the records to read, and the inputs left out with their reason
    ({"source", "reason"}, plus "member" for a tar member)."""

    records: list[ImageRecord] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


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
        rows = [row for _, row in iter_json_lines(jsonl, "objects with file|image|path|file_name and "
                                                         "caption|text|alt|prompt")]
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


def _reason(exc: OSError) -> str:
    if exc.errno == errno.ELOOP:
        return "symlink loop"
    if isinstance(exc, PermissionError):
        return "permission denied"
    return exc.strerror or str(exc)


def _tail_is_zeros(fh, offset: int, limit: int = 1 << 20) -> bool:
    """Whether the bytes from `offset` on are end-of-archive zeros (the first `limit` of them)."""
    fh.seek(offset)
    left = limit
    while left > 0:
        chunk = fh.read(min(left, 1 << 16))
        if not chunk:
            return True
        if chunk.count(0) != len(chunk):
            return False
        left -= len(chunk)
    return True


class _Scanner:
    """Expands inputs into records in a stable order; everything left out goes to `skipped`."""

    def __init__(self, recursive: bool):
        self.recursive = recursive
        self.scan = InputScan()
        self.first_file: dict[str, str] = {}  # real path -> the name it was first listed under
        self.first_folder: dict[str, str] = {}  # real path of a searched folder -> its first name

    def skip(self, source: str | Path, reason: str, member: str | None = None) -> None:
        row = {"source": str(source), "reason": reason}
        if member is not None:
            row["member"] = member
        self.scan.skipped.append(row)

    def is_new(self, path: str | Path, real: str) -> bool:
        """False (and a skipped entry) when the file at `real` was listed before."""
        if real in self.first_file:
            self.skip(path, f"duplicate of {self.first_file[real]}")
            return False
        self.first_file[real] = str(path)
        return True

    def add(self, item: str | Path) -> None:
        path = Path(item).expanduser()
        try:
            info = os.stat(path)
        except FileNotFoundError:
            if os.path.islink(path):
                raise FileNotFoundError(f"input {path} is a dangling symlink (its target does not exist)") from None
            raise FileNotFoundError(
                f"input {path} does not exist (expected an image folder, file list, tar shard or image)") from None
        except OSError as exc:  # a loop, or a parent folder that cannot be searched
            self.skip(path, _reason(exc))
            return
        if stat.S_ISDIR(info.st_mode):
            self.folder(path)
        elif not stat.S_ISREG(info.st_mode):
            self.skip(path, "not a regular file")
        elif not self.is_new(path, os.path.realpath(path)):
            return
        elif path.suffix == ".tar":
            self.tar(path, info.st_size)
        elif path.suffix.lower() in LIST_EXTENSIONS:
            self.file_list(path)
        else:
            self.scan.records.append(ImageRecord(str(path), caption=_sidecar_caption(path)))

    def folder(self, root: Path) -> None:
        real = os.path.realpath(root)
        if real in self.first_folder:
            self.skip(root, f"duplicate of {self.first_folder[real]}")
            return
        found: list[tuple[Path, str]] = []  # (path as listed, real path) of images and tars
        # Depth-first with an explicit stack (deep trees would exhaust Python's recursion);
        # `ancestors` holds the real paths above a folder: a link back to one of them is a loop.
        stack = [(root, real, frozenset((real,)))]
        self.first_folder[real] = str(root)
        while stack:
            folder, folder_real, ancestors = stack.pop()
            try:
                with os.scandir(folder) as it:
                    entries = list(it)
            except OSError as exc:
                self.skip(folder, f"cannot list folder: {_reason(exc)}")
                continue
            for entry in entries:
                path = folder / entry.name
                try:
                    if entry.is_symlink():
                        try:
                            mode = os.stat(entry.path).st_mode
                        except FileNotFoundError:
                            self.skip(path, "dangling symlink")
                            continue
                        target = os.path.realpath(entry.path)
                    else:  # the type comes with the listing: no stat per file
                        mode = stat.S_IFDIR if entry.is_dir(follow_symlinks=False) else \
                            stat.S_IFREG if entry.is_file(follow_symlinks=False) else \
                            entry.stat(follow_symlinks=False).st_mode
                        target = os.path.join(folder_real, entry.name)
                except OSError as exc:
                    self.skip(path, _reason(exc))
                    continue
                if stat.S_ISDIR(mode):
                    if not self.recursive:
                        continue
                    if target in ancestors:
                        self.skip(path, "symlink loop")
                    elif target in self.first_folder:
                        self.skip(path, f"duplicate of {self.first_folder[target]}")
                    else:
                        self.first_folder[target] = str(path)
                        stack.append((path, target, ancestors | {target}))
                elif _is_image(entry.name) or path.suffix == ".tar":
                    if stat.S_ISREG(mode):
                        found.append((path, target))
                    else:  # FIFO, device, socket: never opened
                        self.skip(path, "not a regular file")
        found.sort()  # the order of Path: stable shard plans for existing datasets
        table = _caption_table(root)
        tars = []
        for path, target in found:
            if path.suffix == ".tar":
                tars.append((path, target))
            elif self.is_new(path, target):
                caption = _sidecar_caption(path) or table.get(path.relative_to(root).as_posix())
                self.scan.records.append(ImageRecord(str(path), caption=caption))
        for path, target in tars:  # after the folder's images, as always
            if self.is_new(path, target):
                try:
                    size = os.stat(path).st_size
                except OSError as exc:
                    self.skip(path, _reason(exc))
                    continue
                self.tar(path, size)

    def file_list(self, path: Path) -> None:
        try:
            lines = path.read_text().splitlines()
        except OSError as exc:
            self.skip(path, f"cannot read file list: {_reason(exc)}")
            return
        for line in lines:
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            entry = Path(line) if Path(line).is_absolute() else path.parent / line
            try:
                info = os.stat(entry)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    self.skip(entry, "symlink loop")
                else:  # kept: reading it reports the reason, and the shard plan stays as it was
                    self.scan.records.append(ImageRecord(str(entry)))
                continue
            if not stat.S_ISREG(info.st_mode):
                self.skip(entry, "not a regular file")
            elif self.is_new(entry, os.path.realpath(entry)):
                self.scan.records.append(ImageRecord(str(entry), caption=_sidecar_caption(entry)))

    def tar(self, path: Path, size: int) -> None:
        """Image members of a webdataset-style tar (key.ext groups), captions from key.txt/key.json.
        A damaged tar keeps the members before the damage and adds one skipped entry for the rest."""
        try:
            tar = tarfile.open(path, "r:")  # uncompressed: members are read by offset later
        except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
            self.skip(path, f"cannot open tar: {_tar_error(exc)}")
            return
        images: list[tarfile.TarInfo] = []
        captions: dict[str, str] = {}
        lost: str | None = None
        with tar:
            try:
                for info in tar:  # headers are read one by one: damage stops the loop here
                    if not info.isfile():
                        continue
                    key, ext = os.path.splitext(info.name)
                    ext = ext.lower()
                    if info.offset_data + info.size > size:
                        if ext in IMAGE_EXTENSIONS:
                            self.skip(path, f"data runs past the end of the file (byte {size})", info.name)
                        lost = f"truncated tar: members after byte {info.offset} lost"
                        break
                    if ext in IMAGE_EXTENSIONS:
                        if info.issparse():  # read by offset: the raw bytes of a sparse member are not the file
                            self.skip(path, "sparse tar member (not supported)", info.name)
                        else:
                            images.append(info)
                    elif ext in (".txt", ".json"):
                        if info.size > MAX_CAPTION_BYTES:
                            continue
                        data = tar.extractfile(info).read().decode("utf-8", errors="replace")
                        if ext == ".json":
                            try:
                                obj = json.loads(data)
                            except (json.JSONDecodeError, RecursionError):
                                continue
                            text = obj.get("caption") or obj.get("text") if isinstance(obj, dict) else None
                            if text and key not in captions:
                                captions[key] = str(text).strip()
                        else:
                            captions[key] = data.strip()
                else:
                    # tarfile ends quietly at a header it cannot parse after the first one:
                    # anything but end-of-archive zeros from there on is data that was lost.
                    if tar.offset < size and not _tail_is_zeros(tar.fileobj, tar.offset):
                        what = "truncated tar" if size - tar.offset < tarfile.BLOCKSIZE else \
                            f"corrupt tar (unreadable header at byte {tar.offset})"
                        lost = f"{what}: members after byte {tar.offset} lost"
            except (tarfile.TarError, OSError, EOFError, ValueError) as exc:
                what = "truncated tar" if tar.offset >= size or "unexpected end" in str(exc) else \
                    f"corrupt tar ({_tar_error(exc)})"
                lost = f"{what}: members after byte {tar.offset} lost"
        self.scan.records.extend(
            ImageRecord(str(path), info.name, info.offset_data, info.size, captions.get(os.path.splitext(info.name)[0]))
            for info in images)
        if lost:
            self.skip(path, lost)


def _tar_error(exc: BaseException) -> str:
    return _reason(exc) if isinstance(exc, OSError) and exc.errno else (str(exc) or type(exc).__name__)


def scan_inputs(inputs: Iterable[str | Path], recursive: bool = True) -> InputScan:
    """Expand folders (recursively, sorted, following symlinks), file lists (.txt/.lst: one path
    per line, relative to the list), tar shards and single image files into records, in a stable
    order, and list every input left out with its reason: damaged tars (their intact members
    are kept), symlink loops, dangling links, folders that cannot be listed, non-regular files,
    and files named more than once (listed once, at their first mention). A top-level input
    that does not exist raises FileNotFoundError."""
    scanner = _Scanner(recursive)
    for item in inputs:
        scanner.add(item)
    return scanner.scan


def list_images(inputs: Iterable[str | Path], recursive: bool = True) -> list[ImageRecord]:
    """The records of `scan_inputs` (what it skipped is not reported here)."""
    return scan_inputs(inputs, recursive).records


# Pillow refuses images above 2 * Image.MAX_IMAGE_PIXELS (a process-wide setting) when opening,
# loading or cropping them. Here `max_pixels`, checked before any pixel is decoded, is the limit
# that counts, so an image Pillow refuses but max_pixels allows is handled with Pillow's limit
# raised to its size for that one operation: never to None (off), and under a lock so that two
# such operations cannot interleave and restore a wrong value. Ordinary images never take this
# path; meanwhile other Pillow users in the process see a higher, still finite, limit.
_PILLOW_LIMIT_LOCK = threading.Lock()


def _over_pillow_limit(pixels: int) -> bool:
    return Image.MAX_IMAGE_PIXELS is not None and pixels > 2 * Image.MAX_IMAGE_PIXELS


@contextmanager
def _pillow_limit_raised(pixels: int) -> Iterator[None]:
    with _PILLOW_LIMIT_LOCK:
        saved = Image.MAX_IMAGE_PIXELS
        if saved is not None:
            Image.MAX_IMAGE_PIXELS = max(saved, pixels)
        try:
            yield
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def _decode(data: bytes, max_pixels: int) -> Image.Image:
    with Image.open(io.BytesIO(data)) as image:
        width, height = image.size
        if width * height > max_pixels:
            raise ImageReadError(f"too many pixels ({width}x{height} > {max_pixels})")
        if width < 1 or height < 1:
            raise ImageReadError(f"degenerate size {width}x{height}")
        image.load()
        return to_rgb(image)


def decode_image_bytes(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Decode encoded image bytes to 8-bit RGB; any failure is an ImageReadError with the reason
    (empty, not an image, corrupt/truncated, too many pixels, degenerate size). `max_pixels`
    is honoured even above Pillow's own decompression-bomb limit."""
    if not data:
        raise ImageReadError("empty file")
    try:
        try:
            return _decode(data, max_pixels)
        except Image.DecompressionBombError:
            if not _over_pillow_limit(max_pixels):
                raise
        with _pillow_limit_raised(max_pixels):
            return _decode(data, max_pixels)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as exc:
        raise ImageReadError(f"too many pixels: {exc}") from None
    except MemoryError:
        raise  # the machine's limit, not the file's fault: never reported as a corrupt image
    except Exception as exc:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError...)
        reason = "not an image" if type(exc).__name__ == "UnidentifiedImageError" else f"corrupt image: {exc}"
        raise ImageReadError(reason) from None


def read_image(record: ImageRecord, max_pixels: int = DEFAULT_MAX_PIXELS, max_bytes: int | None = None) -> Image.Image:
    """Read and decode a record to 8-bit RGB; failures become an ImageReadError with the reason.
    Reading is bounded: a non-regular file (FIFO, device) is refused without being opened, a
    file above `max_bytes` (default DEFAULT_MAX_FILE_BYTES) without being read."""
    try:
        data = record.read_bytes() if max_bytes is None else record.read_bytes(max_bytes)
    except PermissionError:
        raise ImageReadError("permission denied") from None
    except OSError as exc:
        raise ImageReadError(f"cannot read: {exc.strerror or exc}") from None
    return decode_image_bytes(data, max_pixels)


def load_image(path: str | Path, max_pixels: int | None = None) -> Image.Image:
    """Read an image file and convert it to RGB, with the bounds of `read_image` (a FIFO or
    device is refused, not opened; oversized files and images are refused). A missing file is
    a FileNotFoundError, any other unusable file a ValueError naming it."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image {path} does not exist")
    try:
        return read_image(ImageRecord(str(path)), max_pixels or DEFAULT_MAX_PIXELS)
    except ImageReadError as err:
        raise ValueError(f"cannot read image {path}: {err}") from None


class EvalImages(Dataset):
    """Records -> (index, pixels (3, R, R) CLIP-normalised) or (index, reason) for bad files."""

    def __init__(self, records: Sequence[ImageRecord], resolution: int, pad_mode: str = "pad",
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
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
        with _pillow_limit_raised(h * w) if _over_pillow_limit(h * w) else nullcontext():  # see decode_image_bytes
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
    "InputScan",
    "scan_inputs",
    "list_images",
    "DEFAULT_MAX_PIXELS",
    "DEFAULT_MAX_FILE_BYTES",
    "read_image",
    "load_image",
    "decode_image_bytes",
    "EvalImages",
    "TrainImages",
    "collate_images",
]
