"""Reconstruction evaluation: a tokenizer on images, or two folders (originals vs reconstructions).

    from libra_tok.evaluate import EvalOptions, MetricModels, evaluate_tokenizer, evaluate_folders
    models = MetricModels.load(lpips_nets=("alex", "vgg"), fid=True)     # weights from the torch hub cache
    result = evaluate_tokenizer(tok, ["val_images/"], EvalOptions(also=(256,)), models)
    print(result.format_table()); result.write_json("eval.json"); result.write_csv("eval.csv")

Protocol (the same in both modes, so that saving a tokenizer's reconstructions as PNG and
evaluating the two folders gives the tokenizer mode's numbers):
- originals: decoded to RGB, made square by the tokenizer's rule (`pad`: official expand2square on
  the CLIP-mean colour; `crop`: centre square), resized to the resolution with PIL bicubic;
- reconstructions: the decoder output rounded to 8 bits, as a PNG would hold it (in folder mode,
  files not already at the resolution go through the same square + bicubic resize);
- `also` resolutions: both sides resized from the evaluation resolution with torch bicubic,
  antialias=True (PIL-like), clamped to [0, 1];
- metrics in `libra_tok.metrics`; unreadable files, and inputs left out while listing (damaged
  tars, symlink loops, duplicates...), are counted and listed in `failed`, never fatal.
"""

from __future__ import annotations

import csv
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .config import CLIP_MEAN, CLIP_STD
from .data import EvalImages, ImageRecord, collate_images, scan_inputs
from .fileio import atomic_path, atomic_write_json
from .metrics import (
    LPIPS_NETS,
    IdUsage,
    ReconstructionMetrics,
    bits_per_pixel,
    build_lpips,
    check_metric_weights,
    fid_weights_path,
    load_fid_inception,
)
from .preprocess import clip_to_unit

DEFAULT_FOLDER_RESOLUTION = 336  # libra-l336
RESIZE_ORIGINAL = "square ({pad_mode}) then PIL bicubic to {resolution}"
RESIZE_ALSO = "torch bicubic, antialias=True, from the evaluation resolution, clamped to [0, 1]"


@dataclass
class EvalOptions:
    resolution: int | None = None  # tokenizer mode: must equal the tokenizer's; folders: default 336
    also: tuple[int, ...] = ()  # additional resolutions (both sides resized)
    pad_mode: str | None = None  # "pad" | "crop"; default: the tokenizer's, "pad" for folders
    batch_size: int = 16
    max_images: int | None = None
    num_workers: int = 0
    precision: str = "auto"  # tokenizer autocast (see ImageTokenizer.encode)
    device: str | None = None  # default: cuda if available
    progress: bool = True

    def torch_device(self) -> torch.device:
        return torch.device(self.device or ("cuda" if torch.cuda.is_available() else "cpu"))


@dataclass
class MetricModels:
    """The networks behind LPIPS and rFID (none: those metrics are skipped)."""

    lpips: dict[str, nn.Module] = field(default_factory=dict)
    inception: nn.Module | None = None
    inception_source: str | None = None

    @classmethod
    def load(cls, lpips_nets: Sequence[str] = LPIPS_NETS, fid: bool = True, inception_weights: str | Path | None = None,
             weights_dir: str | Path | None = None, device: str | torch.device = "cpu") -> "MetricModels":
        """Load from disk only; every missing file is named in one MissingWeightsError first."""
        lpips_nets = tuple(dict.fromkeys(lpips_nets))
        check_metric_weights(lpips_nets, fid, inception_weights, weights_dir)
        inception = load_fid_inception(inception_weights, device, weights_dir) if fid else None
        source = str(fid_weights_path(inception_weights, weights_dir)) if fid else None
        return cls({n: build_lpips(n, weights_dir, device=device) for n in lpips_nets}, inception, source)

    def to(self, device: torch.device) -> "MetricModels":
        for model in self.lpips.values():
            model.to(device)
        if self.inception is not None:
            self.inception.to(device)
        return self


@dataclass
class EvalResult:
    summary: dict
    rows: list[dict]  # one per evaluated image, in input order

    def write_json(self, path: str | Path) -> None:
        atomic_write_json(path, _json_safe(self.summary))

    def write_csv(self, path: str | Path) -> None:
        columns = list(self.rows[0]) if self.rows else ["name"]
        with atomic_path(path) as tmp, open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=columns)
            writer.writeheader()
            writer.writerows(self.rows)

    def format_table(self) -> str:
        s = self.summary
        metrics = s["metrics"]
        resolutions = list(metrics)
        names = list(dict.fromkeys(k for r in resolutions for k in metrics[r]))
        lines = [f"{'metric':<16}" + "".join(f"{r + ' px':>12}" for r in resolutions)]
        for name in names:
            cells = []
            for r in resolutions:
                v = metrics[r].get(name)
                cells.append(f"{'n/a':>12}" if v is None else f"{v:>12.4f}")
            lines.append(f"{name:<16}" + "".join(cells))
        lines.append(f"images          {s['num_images']} evaluated, {s['num_failed']} unreadable")
        if "unmatched_originals" in s:
            lines.append(f"unpaired        {s['unmatched_originals']} originals, "
                         f"{s['unmatched_reconstructions']} reconstructions")
        usage = s.get("id_usage")
        if usage:
            for j, cb in enumerate(usage["codebooks"]):
                lines.append(f"codebook {j}      usage {cb['used']}/{s['codebook_size']} ({100 * cb['usage']:.1f}%), "
                             f"perplexity {cb['perplexity']:.1f}")
            if "joint" in usage:
                lines.append(f"joint id        {usage['joint']['used']} distinct, perplexity "
                             f"{usage['joint']['perplexity']:.1f}")
            lines.append(f"bits per pixel  {s['bits_per_pixel']:.4f} raw, {s['bits_per_pixel_entropy']:.4f} at the "
                         "empirical per-codebook entropy")
        return "\n".join(lines)


def _json_safe(obj):
    """inf/nan (PSNR of identical images) as strings: the JSON stays standard."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_json_safe(v) for v in obj]
    return obj


def resize_unit(images: torch.Tensor, size: int) -> torch.Tensor:
    """[0, 1] batch -> size x size with bicubic + antialias (PIL-like), clamped to [0, 1]."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)


def quantize_8bit(images01: torch.Tensor) -> torch.Tensor:
    """Round to the 8-bit levels a PNG holds (as libra_tok.preprocess.to_pil does)."""
    return (images01.clamp(0, 1) * 255.0).round_() / 255.0


class _Accumulator:
    """Per-resolution metrics, per-image rows and failures of one evaluation."""

    def __init__(self, resolution: int, also: Sequence[int], models: MetricModels):
        self.resolutions = [resolution] + [r for r in dict.fromkeys(also) if r != resolution]
        self.metrics = {r: ReconstructionMetrics(models.lpips, models.inception) for r in self.resolutions}
        self.rows: list[dict] = []
        self.failed: list[dict] = []

    def add(self, rows: list[dict], originals: torch.Tensor, reconstructions: torch.Tensor) -> None:
        for r in self.resolutions:
            values = self.metrics[r].update(resize_unit(originals, r), resize_unit(reconstructions, r))
            for name, v in values.items():
                for row, x in zip(rows, v.tolist(), strict=True):
                    row[f"{name}_{r}"] = x
        self.rows.extend(rows)

    def summary(self) -> dict:
        return {
            "num_images": len(self.rows),
            "num_failed": len(self.failed),
            "metrics": {str(r): m.summary() for r, m in self.metrics.items()},
        }


def _limit(records: list, max_images: int | None) -> list:
    if max_images is not None and max_images < 1:
        raise ValueError(f"max_images must be a positive number of images, got {max_images}")
    return records[:max_images] if max_images else records


def _protocol(options: EvalOptions, resolution: int, pad_mode: str, models: MetricModels, reconstruction: str) -> dict:
    return {
        "resolution": resolution,
        "also": [r for r in dict.fromkeys(options.also) if r != resolution],
        "original_resize": RESIZE_ORIGINAL.format(pad_mode=pad_mode, resolution=resolution),
        "reconstruction": reconstruction,
        "also_resize": RESIZE_ALSO,
        "psnr": "data_range 1 on [0, 1], per image then mean",
        "ssim": "Wang et al. 2004: 11x11 Gaussian sigma 1.5, K1 0.01, K2 0.03, population covariance, "
                "data_range 1, per channel averaged, per image then mean",
        "ssim_uniform7": "scikit-image default: 7x7 uniform window, sample covariance, data_range 1",
        "lpips": {n: f"lpips v0.1, {n} trunk" for n in models.lpips},
        "rfid": None if models.inception is None else
                f"pytorch-fid InceptionV3 pool3 (2048-d, bilinear resize to 299), weights {models.inception_source}, "
                "Frechet distance in float64",
    }


def evaluate_tokenizer(tokenizer, inputs: Iterable[str | Path] | Sequence[ImageRecord],
                       options: EvalOptions | None = None,
                       models: MetricModels | None = None) -> EvalResult:
    """Encode and decode every input image with `tokenizer` and score the reconstructions."""
    options = options or EvalOptions()
    models = models or MetricModels()
    cfg = tokenizer.config
    resolution = cfg.resolution
    if options.resolution is not None and options.resolution != resolution:
        raise ValueError(f"the tokenizer works at {resolution} px but resolution {options.resolution} was asked; "
                         f"leave it out (or {resolution}) and add --also {options.resolution} to score resized "
                         "images too")
    pad_mode = options.pad_mode or cfg.pad_mode
    inputs = list(inputs)
    skipped: list[dict] = []
    if inputs and isinstance(inputs[0], ImageRecord):
        records = inputs
    else:
        scan = scan_inputs(inputs)
        records, skipped = scan.records, scan.skipped
    records = _limit(records, options.max_images)
    if not records:
        raise ValueError(f"no images found in {[str(i) for i in inputs]}" + _skipped_note(skipped))

    device = options.torch_device()
    tokenizer = tokenizer.to(device).eval()
    models.to(device)
    acc = _Accumulator(resolution, options.also, models)
    acc.failed.extend(_skipped_rows(skipped))
    usage = IdUsage(cfg.num_codebooks, cfg.codebook_size)
    dataset = EvalImages(records, resolution, pad_mode, cfg.image_mean, cfg.image_std)
    for index, pixels, bad in _batches(dataset, options, len(records)):
        acc.failed.extend({"name": records[i].name, "reason": reason} for i, reason in bad)
        if pixels is None:
            continue
        with torch.inference_mode():
            out = tokenizer.encode(pixels, precision=options.precision)
            usage.update(out.ids)
            reconstructions = quantize_8bit((tokenizer.decode(out.ids, precision=options.precision) + 1) / 2)
            originals = ((tokenizer.target(pixels.to(device)) + 1) / 2).clamp_(0, 1)
            acc.add([{"name": records[i].name} for i in index.tolist()], originals, reconstructions)

    id_usage = usage.summary()
    raw_bpp = bits_per_pixel(tokenizer.num_tokens, cfg.num_bits, resolution)
    entropy_bits = sum(cb["entropy_bits"] for cb in id_usage["codebooks"])
    summary = {
        "mode": "tokenizer",
        "inputs": [str(i.name if isinstance(i, ImageRecord) else i) for i in inputs],
        "protocol": _protocol(options, resolution, pad_mode, models, "decoder output rounded to 8 bits"),
        **acc.summary(),
        "codebook_size": cfg.codebook_size,
        "id_usage": id_usage,
        "bits_per_pixel": raw_bpp,
        "bits_per_pixel_entropy": bits_per_pixel(tokenizer.num_tokens, entropy_bits, resolution),
        "failed": acc.failed,
    }
    return EvalResult(summary, acc.rows)


def _skipped_rows(skipped: list[dict], prefix: str = "") -> list[dict]:
    """Inputs left out while listing as rows of `failed`: {"name", "reason"}."""
    return [{"name": f"{s['source']}::{s['member']}" if s.get("member") else s["source"],
             "reason": prefix + s["reason"]} for s in skipped]


def _skipped_note(skipped: list[dict]) -> str:
    if not skipped:
        return ""
    return f" ({len(skipped)} input(s) skipped, e.g. {skipped[0]['source']}: {skipped[0]['reason']})"


def _pair_key(record: ImageRecord, root: Path) -> str:
    """Relative path without its extension, so cat.jpg pairs with cat.png."""
    if record.member is not None:
        return os.path.splitext(record.member)[0]
    return os.path.splitext(Path(record.source).relative_to(root).as_posix())[0]


def _keyed(folder: Path) -> tuple[dict[str, ImageRecord], list[dict]]:
    """The images of `folder` by pairing key, and the inputs left out while listing it."""
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder (two-folder mode compares ORIGINALS and RECONSTRUCTIONS "
                                "folders)")
    out: dict[str, ImageRecord] = {}
    scan = scan_inputs([folder])
    for record in scan.records:
        key = _pair_key(record, folder)
        if key in out:
            raise ValueError(f"{folder} holds two images for {key!r} ({out[key].name} and {record.name}): "
                             "pairs are matched by relative path without the extension")
        out[key] = record
    return out, scan.skipped


class PairedImages(Dataset):
    """(index, original, reconstruction), both CLIP-normalised at one resolution, or (index, reason)."""

    def __init__(self, pairs: Sequence[tuple[ImageRecord, ImageRecord]], resolution: int, pad_mode: str):
        self.originals = EvalImages([a for a, _ in pairs], resolution, pad_mode, CLIP_MEAN, CLIP_STD)
        self.reconstructions = EvalImages([b for _, b in pairs], resolution, pad_mode, CLIP_MEAN, CLIP_STD)

    def __len__(self) -> int:
        return len(self.originals)

    def __getitem__(self, index: int):
        _, a = self.originals[index]
        if isinstance(a, str):
            return index, f"original: {a}"
        _, b = self.reconstructions[index]
        if isinstance(b, str):
            return index, f"reconstruction: {b}"
        return index, torch.stack([a, b])


def evaluate_folders(originals: str | Path, reconstructions: str | Path, options: EvalOptions | None = None,
                     models: MetricModels | None = None) -> EvalResult:
    """Score RECONSTRUCTIONS against ORIGINALS, paired by relative path without the extension."""
    options = options or EvalOptions()
    models = models or MetricModels()
    originals, reconstructions = Path(originals).expanduser(), Path(reconstructions).expanduser()
    resolution = options.resolution or DEFAULT_FOLDER_RESOLUTION
    pad_mode = options.pad_mode or "pad"
    (a, skipped_a), (b, skipped_b) = _keyed(originals), _keyed(reconstructions)
    keys = [k for k in a if k in b]
    if not keys:
        raise ValueError(f"no image in {reconstructions} has a counterpart in {originals} "
                         f"({len(a)} originals, {len(b)} reconstructions; pairs share the relative path without the "
                         "extension)")
    pairs = [(a[k], b[k]) for k in _limit(keys, options.max_images)]

    device = options.torch_device()
    models.to(device)
    acc = _Accumulator(resolution, options.also, models)
    acc.failed.extend(_skipped_rows(skipped_a, "original: ") + _skipped_rows(skipped_b, "reconstruction: "))
    dataset = PairedImages(pairs, resolution, pad_mode)
    for index, both, bad in _batches(dataset, options, len(pairs)):
        acc.failed.extend({"name": pairs[i][0].name, "reason": reason} for i, reason in bad)
        if both is None:
            continue
        with torch.inference_mode():
            both = clip_to_unit(both.to(device)).clamp_(0, 1)
            rows = [{"name": pairs[i][0].name, "reconstruction": pairs[i][1].name} for i in index.tolist()]
            acc.add(rows, both[:, 0], both[:, 1])

    summary = {
        "mode": "folders",
        "inputs": [str(originals), str(reconstructions)],
        "protocol": _protocol(options, resolution, pad_mode, models,
                              f"read from files; those not {resolution}x{resolution} resized like the originals"),
        **acc.summary(),
        "unmatched_originals": len(a) - len(keys),
        "unmatched_reconstructions": len(b) - len(keys),
        "failed": acc.failed,
    }
    return EvalResult(summary, acc.rows)


def _batches(dataset: Dataset, options: EvalOptions, total: int):
    if options.batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {options.batch_size}")
    loader = DataLoader(dataset, batch_size=options.batch_size, shuffle=False, num_workers=options.num_workers,
                        collate_fn=collate_images)
    with tqdm(total=total, unit="img", desc="eval", disable=not options.progress) as bar:
        for index, pixels, bad in loader:
            yield index, pixels, bad
            bar.update(len(index) + len(bad))


__all__ = [
    "EvalOptions",
    "MetricModels",
    "EvalResult",
    "PairedImages",
    "evaluate_tokenizer",
    "evaluate_folders",
    "resize_unit",
    "quantize_8bit",
]
