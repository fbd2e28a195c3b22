"""The offline demo: train the `tiny` tokenizer on the sample images, then show what it keeps.

Runs on a laptop CPU in a few minutes with no downloads: the tiny preset's CLIP is a small
random (frozen) ViT, so the numbers show the pipeline working, not CLIP quality.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .data import ImageReadError, read_image, scan_inputs
from .fileio import atomic_save_image, atomic_write_json
from .metrics import psnr_signed
from .model import ImageTokenizer
from .preprocess import side_by_side, to_pil
from .train import TrainConfig, split_holdout, train


def default_images_dir() -> Path | None:
    """assets/ of a source checkout (editable install), if present."""
    candidate = Path(__file__).resolve().parents[1] / "assets"
    return candidate if candidate.is_dir() else None


@dataclass
class DemoResult:
    out_dir: Path
    grid: Path
    metrics: dict


def demo_config(images: Path, out_dir: Path, steps: int, max_minutes: float, seed: int) -> TrainConfig:
    """Settings that make the tiny tokenizer learn visibly within minutes on 2 CPU cores."""
    return TrainConfig(
        data=[str(images)],
        out_dir=str(out_dir / "run"),
        preset="tiny",
        steps=steps,
        batch_size=8,
        lr=2e-3,
        warmup_steps=min(20, max(1, steps // 10)),
        min_lr_ratio=0.05,
        l1_weight=1.0,
        l2_weight=1.0,
        perceptual_weight=0.0,  # LPIPS needs VGG weights, which an offline machine does not have
        disc_start=-1,  # no GAN: too few steps for it to help
        ema_decay=0.0,
        crop_scale=(0.35, 1.0),
        holdout=2,
        num_workers=0,
        cache_images=True,
        log_every=10,
        sample_every=max(1, steps),
        save_every=max(1, steps),
        max_minutes=max_minutes,
        seed=seed,
        device="cpu",
    )


def run_demo(out_dir: str | Path = "demo-output", images: str | Path | None = None, steps: int = 300,
             max_minutes: float = 6.0, seed: int = 0, progress: bool = True) -> DemoResult:
    """Train, then encode and decode every image: a side-by-side grid and PSNR per image."""
    out_dir = Path(out_dir)
    images = Path(images) if images is not None else default_images_dir()
    if images is None:
        raise FileNotFoundError("no sample images found: pass --images DIR (e.g. the assets/ folder of the repository)")
    run_dir = out_dir / "run"
    if run_dir.exists():  # a demo always starts afresh
        import shutil

        shutil.rmtree(run_dir)
    torch.manual_seed(seed)
    started = time.perf_counter()
    demo_cfg = demo_config(images, out_dir, steps, max_minutes, seed)
    result = train(demo_cfg, progress=progress)
    train_seconds = time.perf_counter() - started

    tok = ImageTokenizer.from_pretrained(result.final_tokenizer).eval()
    scan = scan_inputs([images])
    held_out = {r.name for r in split_holdout(scan.records, demo_cfg.holdout)[1]}  # as train() split them
    from tqdm.auto import tqdm

    records, pil, skipped = [], [], list(scan.skipped)
    for record in tqdm(scan.records, desc="read", disable=not progress):
        try:
            pil.append(read_image(record))
            records.append(record)
        except ImageReadError as err:  # listed with the reason, like every other command
            skipped.append({"source": record.name, "reason": str(err)})
    if not pil:
        raise ValueError(f"no readable image in {images}" + (f" ({len(skipped)} skipped)" if skipped else ""))
    pixels = tok.preprocess(pil)
    recon = []
    for start in tqdm(range(0, len(pil), 8), desc="encode+decode", disable=not progress):
        recon.append(tok.decode(tok.encode(pixels[start:start + 8]).ids))
    recon = torch.cat(recon)
    target = tok.target(pixels)
    scores = psnr_signed(recon, target)
    held_out &= {r.name for r in records}

    grid = side_by_side([[to_pil(t), to_pil(r)] for t, r in zip(target, recon, strict=True)])
    grid_path = out_dir / "reconstructions.png"
    atomic_save_image(grid, grid_path)
    per_image = {Path(r.name).name: round(float(s), 3) for r, s in zip(records, scores, strict=True)}
    metrics = {
        "psnr_mean": round(float(scores.mean()), 3),
        "psnr_held_out": round(float(scores[[r.name in held_out for r in records]].mean()), 3) if held_out else None,
        "psnr_per_image": per_image,
        "held_out_images": sorted(Path(n).name for n in held_out),
        "steps": result.step,
        "train_seconds": round(train_seconds, 1),
        "tokenizer": str(result.final_tokenizer),
        "grid": str(grid_path),
        "skipped_inputs": skipped,  # unreadable images and inputs left out while listing, with reasons
    }
    atomic_write_json(out_dir / "metrics.json", metrics)
    return DemoResult(out_dir, grid_path, metrics)


__all__ = ["run_demo", "DemoResult", "default_images_dir"]
