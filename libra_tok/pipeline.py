"""Dataset-scale tokenizer runs: images -> id shards (`encode_to_shards`), shards -> images
(`decode_shards`), and side-by-side reconstructions with PSNR (`reconstruct_images`).

Encoding splits the sorted input list into fixed slices, one shard each; rank r of w writes the
shards k with k % w == r. A rerun skips complete shards and redoes the rest, so a killed run
loses at most the shards in flight and never duplicates or drops a sample.
"""

from __future__ import annotations

import csv
import hashlib
import logging
import operator
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .config import PRESETS, TokenizerConfig
from .data import DEFAULT_MAX_PIXELS, ImageReadError, ImageRecord, read_image, scan_inputs
from .fileio import atomic_path, atomic_save_image, atomic_write_json, check_output_folder
from .hub import is_hub_id
from .metrics import psnr_signed
from .model import ImageTokenizer
from .precision import PRECISIONS, resolve_precision
from .preprocess import preprocess_image, side_by_side, to_pil
from .shards import SKIPPED_FILE, ShardWriter, open_shards, read_manifest, remove_stale_temporaries, shard_folders

log = logging.getLogger("libra_tok.pipeline")


def load_tokenizer(checkpoint: str | Path | None = None, preset: str | None = None,
                   device: str | torch.device | None = None, *, trust_pickle: bool = False) -> ImageTokenizer:
    """A tokenizer from a checkpoint (folder or official vqgan.ckpt), or a preset with random
    weights, CLIP included (for tests, smoke runs and timing only). `trust_pickle` allows
    Python objects in an official pickle (unpickling can run code: only for files you trust)."""
    if checkpoint is None and preset is None:
        raise ValueError("give a tokenizer: --checkpoint PATH (a trained or converted tokenizer) or --preset NAME")
    if checkpoint is not None:
        tok = ImageTokenizer.from_pretrained(checkpoint, trust_pickle=trust_pickle)
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
                            hint: str = "pass the tokenizer with --checkpoint PATH",
                            trust_pickle: bool = False) -> ImageTokenizer:
    """The tokenizer whose identity (`tokenizer_identity`) is `identity`: `path` if given, else
    the source the identity records, else the preset of that architecture with the reproducible
    random weights of `load_tokenizer(preset=...)`. Its weights digest must match, so ids and
    features stay those of `what` (e.g. "the shards"); otherwise a ValueError says so."""
    source = path or identity.get("source")
    if source and (Path(source).expanduser().exists() or is_hub_id(source)):  # a path, or a Hub id (libra_tok.hub)
        tok = load_tokenizer(source, device=device, trust_pickle=trust_pickle)
    else:
        names = [n for n, cfg in PRESETS.items() if cfg.architecture_hash() == identity["architecture_hash"]]
        if not names:
            raise FileNotFoundError(f"the image tokenizer of {what} ({source or 'source not recorded'}) is not here; "
                                    f"{hint}")
        tok = load_tokenizer(preset=names[0], device=device)
    if (tok.config.architecture_hash() != identity["architecture_hash"]
            or weights_digest(tok) != identity["weights_sha256"]):
        where = f" ({path})" if path else (f" ({source})" if source else "")
        raise ValueError(f"the image tokenizer{where} differs from the one of {what} (weights digest): its ids and "
                         f"features would not match; {hint}")
    return tok


def _positive(value: Any, name: str, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def _rank_and_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    world = int(os.environ.get("WORLD_SIZE", 1)) if world_size is None else world_size
    if world < 1:
        raise ValueError(f"world size must be >= 1, got {world}")
    if not 0 <= rank < world:
        raise ValueError(f"rank {rank} is outside world size {world}")
    return rank, world


def plan_shards(n: int, shard_size: int | None = None, num_shards: int | None = None) -> list[tuple[int, int]]:
    """[start, end) input slices: `num_shards` equal ones, else slices of `shard_size`
    (default 1000). Fewer than `num_shards` slices result when they do not divide evenly."""
    if num_shards is not None:
        _positive(num_shards, "num_shards")
        shard_size = -(-n // num_shards) or 1
    elif shard_size is None:
        shard_size = 1000
    _positive(shard_size, "shard_size")
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


def _no_images(inputs: Sequence[str | Path], skipped: list[dict[str, Any]]) -> str:
    message = f"no images found in {', '.join(map(str, inputs))}"
    if skipped:
        message += f" ({len(skipped)} input(s) skipped, e.g. {skipped[0]['source']}: {skipped[0]['reason']})"
    return message


def _failure(record: ImageRecord, reason: str) -> dict[str, Any]:
    row = {"source": record.source, "reason": reason}
    if record.member is not None:
        row["member"] = record.member
    return row


def _check_resumable(path: Path, manifest: dict[str, Any], k: int, slices: Sequence[tuple[int, int]], list_hash: str,
                     identity: dict[str, Any], save_features: bool, precision: str, max_pixels: int,
                     device: torch.device) -> None:
    """Refuse to add shards to a folder whose shard `path` holds other contents than this run
    would write; the message names the option and the value the shard was written with."""
    inputs = manifest.get("inputs") or {}
    if (inputs.get("list_sha256") != list_hash or k >= len(slices)
            or list(inputs.get("slice") or []) != list(slices[k])):
        raise ValueError(f"{path} was written for another input list or shard size; rerun with the same inputs "
                         f"and --shard-size/--num-shards, or write to a new --out folder")
    recorded = manifest.get("tokenizer") or {}
    if (recorded.get("weights_sha256"), recorded.get("architecture_hash")) != (identity["weights_sha256"],
                                                                                identity["architecture_hash"]):
        raise ValueError(f"{path} was written by another tokenizer ({recorded.get('source') or 'a --preset'}, weights "
                         f"sha256 {str(recorded.get('weights_sha256'))[:12]}; this run's: "
                         f"{identity['weights_sha256'][:12]}); use the same --checkpoint / --preset, or write to a new "
                         "--out folder")
    had = manifest.get("features") is not None
    if had != save_features:
        word = "with" if had else "without"
        raise ValueError(f"{path} was written {word} --save-features; rerun {word} --save-features to resume, "
                         "or write to a new --out folder (a shard set has features in every shard or in none)")
    written = resolve_precision(device, manifest.get("precision", "auto"))
    if written != precision:
        raise ValueError(f"{path} was written with --precision {written} (this run: {precision}), and ids can "
                         f"differ between precisions; rerun with --precision {written}, or write to a new --out folder")
    if manifest.get("max_pixels", max_pixels) != max_pixels:
        raise ValueError(f"{path} was written with --max-pixels {manifest['max_pixels']} (this run: {max_pixels}), "
                         f"which decides which images are refused; rerun with --max-pixels {manifest['max_pixels']}, "
                         "or write to a new --out folder")


@dataclass
class EncodeSummary:
    out_dir: Path
    inputs: int
    shards_total: int
    shards_written: list[int] = field(default_factory=list)
    shards_already_done: list[int] = field(default_factory=list)
    samples: int = 0
    failed: list[dict[str, Any]] = field(default_factory=list)  # unreadable inputs (in the manifests)
    skipped: list[dict[str, Any]] = field(default_factory=list)  # left out while listing (skipped_inputs.json)
    processed: int = 0  # inputs read in this run (complete shards from earlier runs excluded)
    seconds: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.processed / self.seconds if self.seconds > 0 else 0.0


def encode_to_shards(
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
    A rerun that would write shards unlike the existing ones (another tokenizer, input list,
    shard size, --save-features, precision or max_pixels) is refused: a set never mixes them.
    `rank`/`world_size` (default: torchrun's RANK/WORLD_SIZE) select this process's shards.
    """
    started = time.perf_counter()
    _positive(batch_size, "batch_size")
    if num_shards is not None:
        _positive(num_shards, "num_shards")
    elif shard_size is not None:
        _positive(shard_size, "shard_size")
    _positive(num_workers, "num_workers", minimum=0)
    _positive(max_pixels, "max_pixels")
    _check_precision(precision)
    rank, world = _rank_and_world(rank, world_size)
    out_dir = check_output_folder(out_dir)
    scan = scan_inputs(inputs)
    records = scan.records
    if not records:
        raise ValueError(_no_images(inputs, scan.skipped))
    slices = plan_shards(len(records), shard_size, num_shards)
    mine = [k for k in range(len(slices)) if k % world == rank]
    remove_stale_temporaries(out_dir, mine)

    list_hash = hashlib.sha256("\n".join(r.name for r in records).encode()).hexdigest()
    identity = tokenizer_identity(tokenizer, tokenizer_source)
    used_precision = resolve_precision(tokenizer.device, precision)
    summary = EncodeSummary(out_dir, len(records), len(slices), skipped=scan.skipped)
    existing = {}
    for k, path in shard_folders(out_dir):  # every rank's: the whole set must stay one kind
        manifest = read_manifest(path)
        _check_resumable(path, manifest, k, slices, list_hash, identity, save_features, used_precision, max_pixels,
                         tokenizer.device)
        existing[k] = manifest
    todo = []
    for k in mine:
        if k not in existing:
            todo.append(k)
            continue
        summary.shards_already_done.append(k)
        summary.samples += existing[k]["num_samples"]
        summary.failed += existing[k].get("failed", [])
    if rank == 0:  # one writer; every rank lists the same inputs
        if scan.skipped:
            atomic_write_json(out_dir / SKIPPED_FILE, scan.skipped)
        else:  # a list from an earlier scan of these inputs no longer holds
            (out_dir / SKIPPED_FILE).unlink(missing_ok=True)

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
    owner = {i: k for k, (start, end) in zip(todo, todo_slices, strict=True) for i in range(start, end)}
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
                metas = [_meta(records[i], s) for i, s in zip(indices, sizes, strict=True)]
                writer.add(out.ids.to(torch.int32).cpu().numpy(), metas, feats)
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
                    "precision": used_precision,
                    "max_pixels": max_pixels,
                    "inputs": {"count": len(records), "list_sha256": list_hash, "slice": [start, end],
                               "shard_size": slices[0][1] - slices[0][0], "num_shards": len(slices)},
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
                  progress: bool = True, *, trust_pickle: bool = False) -> list[Path]:
    """Decode samples of a shard set to PNG files `{index:07d}_{name}.png`; the tokenizer
    defaults to the one recorded in the shards (its weights must match)."""
    _positive(batch_size, "batch_size")
    _check_precision(precision)
    out_dir = check_output_folder(out_dir)
    shards = open_shards(shard_dir)
    indices = list(range(len(shards))) if indices is None else [operator.index(i) for i in indices]
    wrong = [i for i in indices if not 0 <= i < len(shards)]
    if wrong:  # before the tokenizer is loaded or anything is written
        raise ValueError(f"sample index {wrong[0]} is out of range: {shard_dir} holds {len(shards)} samples, "
                         f"numbered 0-{len(shards) - 1}")
    recorded = shards.tokenizer
    if tokenizer is None:
        tokenizer = load_tokenizer_matching(recorded, what=f"the shards in {shard_dir}",
                                            hint="pass the tokenizer that encoded them with --checkpoint PATH",
                                            trust_pickle=trust_pickle)
    if tokenizer.config.architecture_hash() != recorded["architecture_hash"]:
        raise ValueError("this tokenizer's configuration differs from the one that wrote the shards")
    if weights_digest(tokenizer) != recorded["weights_sha256"]:
        log.warning("tokenizer weights differ from those that wrote the shards: images may not match")
    out_dir.mkdir(parents=True, exist_ok=True)
    from tqdm.auto import tqdm

    written = []
    for b in tqdm(range(0, len(indices), batch_size), desc="decode", unit="batch", disable=not progress):
        chunk = indices[b:b + batch_size]
        samples = [shards[i] for i in chunk]
        ids = torch.from_numpy(np.stack([s.ids for s in samples]).astype(np.int64))
        images = tokenizer.decode(ids, precision=precision)
        for i, sample, image in zip(chunk, samples, images, strict=True):
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
    failed: list[dict[str, Any]]  # unreadable inputs and inputs skipped while listing (failed.json)

    @property
    def mean_psnr(self) -> float:
        return float(np.mean([r["psnr"] for r in self.rows])) if self.rows else float("nan")


REPORT_FILES = ("contact_sheet.png", "psnr.csv", "failed.json")  # written by reconstruct_images beside the images


def _output_names(records: Sequence[ImageRecord]) -> list[str]:
    """One PNG name per record, from its file or member name: unique (case-insensitively, for
    case-insensitive file systems) and never one of the report files."""
    taken = {name.casefold() for name in REPORT_FILES}
    names = []
    for record in records:
        stem = _stem({"source": record.source, "member": record.member})
        while f"{stem}.png".casefold() in taken:
            stem += "_"
        taken.add(f"{stem}.png".casefold())
        names.append(f"{stem}.png")
    return names


def _refuse_replacing_inputs(inputs: Sequence[str | Path], sources: Sequence[str], out_dir: Path,
                             outputs: Sequence[Path]) -> None:
    """Nothing an output writes may replace an input: refuse an --out that is an input folder,
    or any output file that is an input file (compared as files, so links and case-insensitive
    names count too)."""
    def identity(path: str | Path) -> tuple[int, int] | None:
        try:
            st = os.stat(path)
        except OSError:
            return None
        return st.st_dev, st.st_ino

    out_id = identity(out_dir)
    for item in inputs:
        if out_id is not None and Path(item).expanduser().is_dir() and identity(Path(item).expanduser()) == out_id:
            raise ValueError(f"--out {out_dir} is the input folder {item}: the results would be written among "
                             "(and could replace) the images; choose another --out folder")
    if out_id is None:
        return  # a new folder: nothing in it can be an input
    protected = {}
    for path in dict.fromkeys([*(Path(i).expanduser() for i in inputs if Path(i).expanduser().is_file()),
                               *map(Path, sources)]):  # a tar once, not once per member
        key = identity(path)
        if key is not None:
            protected[key] = path
    for path in outputs:
        key = identity(path)
        if key is not None and key in protected:
            raise ValueError(f"--out {out_dir}: writing {path.name} would replace the input {protected[key]}; "
                             "choose another --out folder")


def reconstruct_images(inputs: Sequence[str | Path], out_dir: str | Path, tokenizer: ImageTokenizer,
                       batch_size: int = 16, precision: str = "auto", num_workers: int = 2,
                       max_pixels: int = DEFAULT_MAX_PIXELS, progress: bool = True) -> ReconstructResult:
    """For each image a PNG of original | reconstruction | error heatmap, a contact sheet of
    all of them, and a per-image PSNR table (psnr.csv). The original is the tokenizer's view:
    padded (or cropped) to a square and resized to its resolution. Output names are unique and
    never replace an input (refused before any work) or a report file."""
    _positive(batch_size, "batch_size")
    _positive(num_workers, "num_workers", minimum=0)
    _positive(max_pixels, "max_pixels")
    _check_precision(precision)
    out_dir = check_output_folder(out_dir)
    scan = scan_inputs(inputs)
    records = scan.records
    if not records:
        raise ValueError(_no_images(inputs, scan.skipped))
    names = _output_names(records)
    _refuse_replacing_inputs(inputs, [*(r.source for r in records), *(s["source"] for s in scan.skipped)], out_dir,
                             [out_dir / n for n in (*names, *REPORT_FILES)])
    out_dir.mkdir(parents=True, exist_ok=True)
    loader = DataLoader(_Items(records, tokenizer.config, max_pixels), batch_size=batch_size, num_workers=num_workers,
                        collate_fn=_collate)
    from tqdm.auto import tqdm

    rows, failed, thumbs = [], list(scan.skipped), []
    for indices, pixels, _, bad in tqdm(loader, desc="reconstruct", unit="batch", disable=not progress):
        failed += [_failure(records[i], reason) for i, reason in bad]
        if pixels is None:
            continue
        recon = tokenizer.decode(tokenizer.encode(pixels, precision=precision).ids, precision=precision)
        target = tokenizer.target(pixels.to(recon.device))
        scores = psnr_signed(recon, target)
        for i, t, r, score in zip(indices, target, recon, scores, strict=True):
            triple = side_by_side([[to_pil(t), to_pil(r), error_heatmap(t, r)]])
            path = out_dir / names[i]
            atomic_save_image(triple, path)
            rows.append({"name": records[i].name, "psnr": round(float(score), 4), "file": path.name})
            if triple.width > 3 * 256:  # contact-sheet thumbnails: 256 px per image
                triple = triple.resize((3 * 256, round(triple.height * 3 * 256 / triple.width)))
            thumbs.append(triple)
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
    else:  # a report of an earlier run in this folder would describe other inputs
        (out_dir / "failed.json").unlink(missing_ok=True)
    return ReconstructResult(rows, sheet, table, failed)


__all__ = ["load_tokenizer", "load_tokenizer_matching", "tokenizer_identity", "weights_digest", "plan_shards",
           "encode_to_shards", "EncodeSummary", "decode_shards", "reconstruct_images", "ReconstructResult",
           "error_heatmap", "REPORT_FILES"]
