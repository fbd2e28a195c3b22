"""End-to-end `libra-tok encode` throughput beside a bare CLIP forward on the same batches.

    python bench/encode.py --preset libra-l336 --num-images 16          # CPU
    python bench/encode.py --preset libra-l336 --num-images 2048 --batch-size 64 --num-workers 8   # GPU

End to end = JPEG decode in DataLoader workers, preprocessing, CLIP (pruned after the last
feature layer), quantizer, shard writing. Bare = the full open_clip visual tower on tensors
prepared beforehand (what a user would time as "the CLIP forward"). Their ratio is the
pipeline's overhead. On CUDA it also reports the speed-up of bf16 autocast and how many ids
agree with fp32 (bf16 can flip an id whose pre-sign value is near zero).
"""

from __future__ import annotations

import argparse
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from libra_tok.data import list_images  # noqa: E402
from libra_tok.encoder import build_clip_tower  # noqa: E402
from libra_tok.pipeline import encode_to_shards, load_tokenizer  # noqa: E402
from libra_tok.precision import autocast_for  # noqa: E402


def make_jpeg_folder(folder: Path, n: int) -> None:
    """n JPEGs (quality 90) cycled from the sample photos."""
    from PIL import Image

    sources = sorted(p for p in (ROOT / "assets").iterdir() if p.suffix.lower() in (".png", ".jpg"))
    for i in range(n):
        with Image.open(sources[i % len(sources)]) as im:
            im.convert("RGB").save(folder / f"{i:06d}.jpg", quality=90)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_bare_clip(tok, batches, precision: str) -> float:
    """Seconds of the full (unpruned) visual tower over the prepared batches."""
    tower = build_clip_tower(tok.config).to(tok.device).eval()
    tower.load_state_dict(tok.encoder.tower.state_dict(), strict=False)  # same weights where they exist
    device = tok.device
    with torch.no_grad(), autocast_for(device, precision):
        tower(batches[0].to(device))  # warm-up
        sync(device)
        start = time.perf_counter()
        for x in batches:
            tower(x.to(device, non_blocking=True))
        sync(device)
    return time.perf_counter() - start


def time_end_to_end(tok, folder: Path, batches, args, precision: str) -> float:
    out = Path(tempfile.mkdtemp(prefix="libra-bench-shards-"))
    try:
        tok.encode(batches[0], precision=precision)  # warm-up
        sync(tok.device)
        start = time.perf_counter()
        encode_to_shards([folder], out / "run", tok, batch_size=args.batch_size, shard_size=10**9,
                         num_workers=args.num_workers, precision=precision, progress=False)
        sync(tok.device)
        return time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)


def id_agreement(tok, batches) -> float:
    same = total = 0
    for x in batches:
        a = tok.encode(x, precision="fp32").ids
        b = tok.encode(x, precision="bf16").ids
        same += int((a == b).sum())
        total += a.numel()
    return same / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="tiny", help="tokenizer preset (fresh weights) if no --checkpoint")
    parser.add_argument("--checkpoint", default=None, help="tokenizer folder or official vqgan.ckpt")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()

    tok = load_tokenizer(args.checkpoint, None if args.checkpoint else args.preset, args.device)
    device = tok.device
    folder = Path(tempfile.mkdtemp(prefix="libra-bench-jpeg-"))
    try:
        make_jpeg_folder(folder, args.num_images)
        pixels = tok.preprocess([r.source for r in list_images([folder])])
        batches = list(pixels.split(args.batch_size))
        precisions = ["fp32"] + (["bf16"] if device.type == "cuda" else [])
        rows = []
        for precision in precisions:
            bare = time_bare_clip(tok, batches, precision)
            e2e = time_end_to_end(tok, folder, batches, args, precision)
            rows.append((precision, args.num_images / e2e, args.num_images / bare, e2e / bare))
        agreement = id_agreement(tok, batches) if device.type == "cuda" else None
    finally:
        shutil.rmtree(folder, ignore_errors=True)

    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{platform.processor() or 'CPU'}, {torch.get_num_threads()} threads"
    print(f"# libra-tok encode benchmark: {tok.config.clip_model} at {tok.config.resolution} px, "
          f"{args.num_images} JPEGs, "
          f"batch {args.batch_size}, {args.num_workers} workers, {device.type} ({name}), torch {torch.__version__}")
    print("| precision | end to end (img/s) | bare CLIP forward (img/s) | time ratio e2e / bare |")
    print("|---|---|---|---|")
    for precision, e2e, bare, ratio in rows:
        print(f"| {precision} | {e2e:.2f} | {bare:.2f} | {ratio:.3f} |")
    if len(rows) == 2:
        print(f"bf16 speed-up end to end: {rows[1][1] / rows[0][1]:.2f}x; ids equal to fp32: {100 * agreement:.3f} %")


if __name__ == "__main__":
    main()
