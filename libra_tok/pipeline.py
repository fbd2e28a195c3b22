"""Dataset-scale tokenizer runs: images -> id shards (`encode`), shards -> images (`decode`),
and side-by-side reconstructions with PSNR (`reconstruct`).

Encoding splits the sorted input list into fixed slices, one shard each; rank r of w writes the
shards k with k % w == r. A rerun skips complete shards and redoes the rest, so a killed run
loses at most the shards in flight and never duplicates or drops a sample.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .data import DEFAULT_MAX_PIXELS, ImageReadError, ImageRecord, list_images, read_image
from .fileio import atomic_path, atomic_save_image, atomic_write_json
from .config import PRESETS, TokenizerConfig
from .model import ImageTokenizer
from .metrics import psnr_signed
from .preprocess import preprocess_image, side_by_side, to_pil
from .shards import ShardWriter, open_shards, read_manifest, remove_stale_temporaries, shard_name

log = logging.getLogger("libra_tok.pipeline")


def load_tokenizer(checkpoint: str | Path | None = None, preset: str | None = None,
                   device: str | torch.device | None = None) -> ImageTokenizer:
    """A tokenizer from a checkpoint (folder or official vqgan.ckpt), or a preset with random
    weights, CLIP included (for tests, smoke runs and timing only)."""
    if checkpoint is None and preset is None:
        raise ValueError("give a tokenizer: --checkpoint PATH (a trained or converted tokenizer) or --preset NAME")
    if checkpoint is not None:
        tok = ImageTokenizer.from_pretrained(checkpoint)
    else:
        log.warning("preset %r with random weights: ids are not meaningful", preset)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)  # the same random weights on every run, so reruns resume
            tok = ImageTokenizer(TokenizerConfig.from_preset(preset, clip_pretrained=None))
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return tok.to(device).eval()


def weights_digest(tok: ImageTokenizer) -> str:
    """sha256 of every tensor of the tokenizer (names, shapes, bytes): equal digests, equal ids."""
    digest = hashlib.sha256()
    for name, tensor in tok.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def tokenizer_identity(tok: ImageTokenizer, source: str | None) -> dict[str, Any]:
    return {"config": tok.config.to_dict(), "architecture_hash": tok.config.architecture_hash(),
            "weights_sha256": weights_digest(tok), "source": source}


def load_tokenizer_matching(identity: dict[str, Any], path: str | Path | None = None,
                            device: str | torch.device | None = None, *, what: str = "the ids",
                            hint: str = "pass the tokenizer with --checkpoint PATH") -> ImageTokenizer:
    """The tokenizer whose identity (`tokenizer_identity`) is `identity`: `path` if given, else
    the source the identity records, else the preset of that architecture with the reproducible
    random weights of `load_tokenizer(preset=...)`. Its weights digest must match, so ids and
    features stay those of `what` (e.g. "the shards"); otherwise a ValueError says so."""
    source = path or identity.get("source")
    if source and Path(source).expanduser().exists():
        tok = load_tokenizer(source, device=device)
    else:
        names = [n for n, cfg in PRESETS.items() if cfg.architecture_hash() == identity["architecture_hash"]]
        if not names:
            raise FileNotFoundError(f"the image tokenizer of {what} ({source or 'source not recorded'}) is not here; "
                                    f"{hint}")
        tok = load_tokenizer(preset=names[0], device=device)
    if tok.config.architecture_hash() != identity["architecture_hash"] or weights_digest(tok) != identity["weights_sha256"]:
        where = f" ({path})" if path else (f" ({source})" if source else "")
        raise ValueError(f"the image tokenizer{where} differs from the one of {what} (weights digest): its ids and "
                         f"features would not match; {hint}")
    return tok


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world}")
    return rank, world


def plan_shards(n: int, shard_size: int | None = None, num_shards: int | None = None) -> list[tuple[int, int]]:
    """[start, end) input slices: `num_shards` equal ones, else slices of `shard_size`."""
    if num_shards is not None:
        if num_shards < 1:
            raise ValueError("num_shards must be >= 1")
        shard_size = -(-n // num_shards)
    shard_size = max(1, shard_size or 1000)
    return [(start, min(n, start + shard_size)) for start in range(0, n, shard_size)]


class _Items(Dataset):
    """Record index -> (index, pixels or failure reason, original size)."""

    def __init__(self, records: Sequence[ImageRecord], tok_config, max_pixels: int):
        self.records = records
        self.cfg = tok_config
        self.max_pixels = max_pixels

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int):
        try:
            image = read_image(self.records[index], self.max_pixels)
        except ImageReadError as err:
            return index, str(err), None
        cfg = self.cfg
        return index, preprocess_image(image, cfg.resolution, cfg.pad_mode, cfg.image_mean, cfg.image_std), image.size


def _collate(batch):
    good = [(i, x, s) for i, x, s in batch if isinstance(x, torch.Tensor)]
    bad = [(i, x) for i, x, _ in batch if not isinstance(x, torch.Tensor)]
    pixels = torch.stack([x for _, x, _ in good]) if good else None
    return [i for i, _, _ in good], pixels, [s for _, _, s in good], bad


def _batches_within(slices: Sequence[tuple[int, int]], batch_size: int) -> list[list[int]]:
    """Index batches that never cross a shard boundary, in order."""
    return [list(range(b, min(b + batch_size, end))) for start, end in slices for b in range(start, end, batch_size)]


def _meta(record: ImageRecord, size: tuple[int, int]) -> dict[str, Any]:
    row: dict[str, Any] = {"source": record.source, "width": size[0], "height": size[1]}
    if record.member is not None:  # where the member's bytes are, to read it again without a scan
        row.update(member=record.member, offset=record.offset, size=record.size)
    if record.caption is not None:
        row["caption"] = record.caption
    return row


def _failure(record: ImageRecord, reason: str) -> dict[str, Any]:
    row = {"source": record.source, "reason": reason}
    if record.member is not None:
        row["member"] = record.member
    return row


@dataclass
class EncodeSummary:
    out_dir: Path
    inputs: int
    shards_total: int
    shards_written: list[int] = field(default_factory=list)
    shards_already_done: list[int] = field(default_factory=list)
    samples: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)
    processed: int = 0  # inputs read in this run (complete shards from earlier runs excluded)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def encode_images(
    inputs: Sequence[str | Path],
    out_dir: str | Path,
    tokenizer: ImageTokenizer,
    *,
    tokenizer_source: str | None = None,
    batch_size: int = 32,
    shard_size: int | None = 1000,
    num_shards: int | None = None,
    save_features: bool = False,
    rank: int | None = None,
    world_size: int | None = None,
    num_workers: int = 4,
    precision: str = "auto",
    max_pixels: int = DEFAULT_MAX_PIXELS,
    progress: bool = True,
) -> EncodeSummary:
    """Encode image folders / file lists / tar shards into id shards under `out_dir`.

    Rerunning with the same inputs resumes: complete shards are kept, partial ones redone.
    `rank`/`world_size` (default: torchrun's RANK/WORLD_SIZE) select this process's shards.
    """
    started = time.perf_counter()
    records = list_images(inputs)
    if not records:
        raise ValueError(f"no images found in {', '.join(map(str, inputs))}")
    rank, world = _rank_and_world(rank, world_size)
    out_dir = Path(out_dir)
    slices = plan_shards(len(records), shard_size, num_shards)
    mine = [k for k in range(len(slices)) if k % world == rank]
    remove_stale_temporaries(out_dir, mine)

    list_hash = hashlib.sha256("\n".join(r.name for r in records).encode()).hexdigest()
    identity = tokenizer_identity(tokenizer, tokenizer_source)
    summary = EncodeSummary(out_dir, len(records), len(slices))
    todo = []
    for k in mine:
        path = out_dir / shard_name(k)
        if not path.is_dir():
            todo.append(k)
            continue
        manifest = read_manifest(path)
        if manifest["inputs"]["list_sha256"] != list_hash or manifest["inputs"]["slice"] != list(slices[k]):
            raise ValueError(f"{path} was written for another input list or shard size; rerun with the same inputs "
                             f"and --shard-size/--num-shards, or write to a new --out folder")
        if manifest["tokenizer"]["weights_sha256"] != identity["weights_sha256"]:
            raise ValueError(f"{path} was written by another tokenizer (weights differ); use the same "
                             f"--checkpoint or a new --out folder")
        summary.shards_already_done.append(k)
        summary.samples += manifest["num_samples"]
        summary.failed += manifest.get("failed", [])

    cfg = tokenizer.config
    feature_dim = cfg.feature_dim if save_features else None
    todo_slices = [slices[k] for k in todo]
    loader = DataLoader(_Items(records, cfg, max_pixels), batch_sampler=_batches_within(todo_slices, batch_size),
                        num_workers=num_workers, collate_fn=_collate, pin_memory=tokenizer.device.type == "cuda",
                        prefetch_factor=4 if num_workers > 0 else None)
    from tqdm.auto import tqdm

    total = sum(end - start for start, end in todo_slices)
    bar = tqdm(total=total, desc=f"encode (rank {rank}/{world})" if world > 1 else "encode", unit="img",
               disable=not progress, dynamic_ncols=True)
    owner = {i: k for k, (start, end) in zip(todo, todo_slices) for i in range(start, end)}
    writer: ShardWriter | None = None
    failed: list[dict[str, Any]] = []
    seen = 0
    try:
        for indices, pixels, sizes, bad in loader:
            k = owner[(indices or [i for i, _ in bad])[0]]
            if writer is None:
                writer = ShardWriter(out_dir, k, cfg.num_tokens, cfg.num_codebooks, feature_dim)
                failed = []
            for i, reason in bad:
                failed.append(_failure(records[i], reason))
            if pixels is not None:
                out = tokenizer.encode(pixels, precision=precision)
                feats = out.features.half().cpu().numpy() if feature_dim else None
                writer.add(out.ids.to(torch.int32).cpu().numpy(), [_meta(records[i], s) for i, s in zip(indices, sizes)], feats)
            seen += len(indices) + len(bad)
            summary.processed += len(indices) + len(bad)
            bar.update(len(indices) + len(bad))
            bar.set_postfix(failed=len(summary.failed) + len(failed))
            start, end = slices[k]
            if seen == end - start:  # shard complete
                writer.commit({
                    "tokenizer": identity,
                    "grid": [cfg.grid_size, cfg.grid_size],
                    "num_codebooks": cfg.num_codebooks,
                    "codebook_size": cfg.codebook_size,
                    "feature_dim": cfg.feature_dim,
                    "precision": precision,
                    "inputs": {"count": len(records), "list_sha256": list_hash, "slice": [start, end]},
                    "failed": failed,
                })
                summary.shards_written.append(k)
                summary.samples += writer.count
                summary.failed += failed
                writer, seen = None, 0
    finally:
        bar.close()
        if writer is not None:
            writer.abort()
    summary.seconds = time.perf_counter() - started
    return summary


# ---- decode -------------------------------------------------------------------------------------
def _stem(meta: dict[str, Any]) -> str:
    name = meta.get("member") or meta.get("source") or "image"
    return Path(str(name)).stem.replace(os.sep, "_")[:80]


def decode_shards(shard_dir: str | Path, out_dir: str | Path, tokenizer: ImageTokenizer | None = None,
                  indices: Sequence[int] | None = None, batch_size: int = 16, precision: str = "auto",
                  progress: bool = True) -> list[Path]:
    """Decode samples of a shard set to PNG files `{index:07d}_{name}.png`; the tokenizer
    defaults to the one recorded in the shards (its weights must match)."""
    shards = open_shards(shard_dir)
    recorded = shards.manifest["tokenizer"]
    if tokenizer is None:
        tokenizer = load_tokenizer_matching(recorded, what=f"the shards in {shard_dir}",
                                            hint="pass the tokenizer that encoded them with --checkpoint PATH")
    if tokenizer.config.architecture_hash() != recorded["architecture_hash"]:
        raise ValueError("this tokenizer's configuration differs from the one that wrote the shards")
    if weights_digest(tokenizer) != recorded["weights_sha256"]:
        log.warning("tokenizer weights differ from those that wrote the shards: images may not match")
    indices = list(range(len(shards))) if indices is None else list(indices)
    for i in indices:
        shards.locate(i)  # IndexError with the valid range before any work
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    written = []
    for b in tqdm(range(0, len(indices), batch_size), desc="decode", unit="batch", disable=not progress):
        chunk = indices[b:b + batch_size]
        samples = [shards[i] for i in chunk]
        ids = torch.from_numpy(np.stack([s.ids for s in samples]).astype(np.int64))
        images = tokenizer.decode(ids, precision=precision)
        for i, sample, image in zip(chunk, samples, images):
            path = out_dir / f"{i:07d}_{_stem(sample.meta)}.png"
            atomic_save_image(to_pil(image), path)
            written.append(path)
    return written


# ---- reconstruct --------------------------------------------------------------------------------
def error_heatmap(target: torch.Tensor, recon: torch.Tensor, scale: float = 0.5):
    """|target - recon| averaged over channels, 0 -> black, `scale` (in [-1,1] units) and
    above -> white, through red and yellow."""
    from PIL import Image

    err = ((target.float() - recon.float()).abs().mean(0) / scale).clamp(0, 1).cpu().numpy()
    rgb = np.stack([np.clip(3 * err, 0, 1), np.clip(3 * err - 1, 0, 1), np.clip(3 * err - 2, 0, 1)], -1)
    return Image.fromarray((rgb * 255).round().astype(np.uint8))


@dataclass
class ReconstructResult:
    rows: list[dict[str, Any]]  # name, psnr, output path
    contact_sheet: Path | None
    table: Path
    failed: list[dict[str, Any]]

    @property
    def mean_psnr(self) -> float:
        return float(np.mean([r["psnr"] for r in self.rows])) if self.rows else float("nan")


def reconstruct_images(inputs: Sequence[str | Path], out_dir: str | Path, tokenizer: ImageTokenizer,
                       batch_size: int = 16, precision: str = "auto", num_workers: int = 2,
                       max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True) -> ReconstructResult:
    """For each image a PNG of original | reconstruction | error heatmap, a contact sheet of
    all of them, and a per-image PSNR table (psnr.csv). The original is the tokenizer's view:
    padded (or cropped) to a square and resized to its resolution."""
    records = list_images(inputs)
    if not records:
        raise ValueError(f"no images found in {', '.join(map(str, inputs))}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loader = DataLoader(_Items(records, tokenizer.config, max_pixels), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate)
    from tqdm.auto import tqdm

    rows, failed, thumbs = [], [], []
    used: set[str] = set()
    for indices, pixels, _, bad in tqdm(loader, desc="reconstruct", unit="batch", disable=not progress):
        failed += [_failure(records[i], reason) for i, reason in bad]
        if pixels is None:
            continue
        recon = tokenizer.decode(tokenizer.encode(pixels, precision=precision).ids, precision=precision)
        target = tokenizer.target(pixels.to(recon.device))
        scores = psnr_signed(recon, target)
        for i, t, r, score in zip(indices, target, recon, scores):
            name = _stem({"source": records[i].source, "member": records[i].member})
            while name in used:
                name += "_"
            used.add(name)
            triple = side_by_side([[to_pil(t), to_pil(r), error_heatmap(t, r)]])
            path = out_dir / f"{name}.png"
            atomic_save_image(triple, path)
            rows.append({"name": records[i].name, "psnr": round(float(score), 4), "file": path.name})
            thumbs.append(triple if triple.width <= 3 * 256 else triple.resize((3 * 256, round(triple.height * 3 * 256 / triple.width))))
    table = out_dir / "psnr.csv"
    with atomic_path(table) as tmp:
        with open(tmp, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=["name", "psnr", "file"])
            writer.writeheader()
            writer.writerows(rows)
    sheet = None
    if thumbs:
        sheet = out_dir / "contact_sheet.png"
        atomic_save_image(side_by_side([[t] for t in thumbs]), sheet)
    if failed:
        atomic_write_json(out_dir / "failed.json", failed)
    return ReconstructResult(rows, sheet, table, failed)


__all__ = ["load_tokenizer", "load_tokenizer_matching", "tokenizer_identity", "weights_digest", "plan_shards", "encode_images", "EncodeSummary", "decode_shards",
           "reconstruct_images", "ReconstructResult", "error_heatmap"]
