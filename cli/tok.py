"""`libra-tok`: the image tokenizer toolkit on the command line (thin front ends)."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import dataclass_options, fail_on_errors, options_to_overrides
from libra_tok.train import TrainConfig


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="libra")
@click.option("-v", "--verbose", is_flag=True, help="Log debug messages.")
def main(verbose: bool) -> None:
    """Libra image tokenizer: frozen CLIP features -> two 9-bit LFQ ids per patch -> images.

    Every command explains its options with --help. Tokenizers are folders written by
    `save_pretrained` (config.json + model.safetensors) or the official Libra vqgan.ckpt.
    """
    import logging

    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s")


@main.command("demo")
@click.option("--out", "out_dir", default="demo-output", show_default=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the grid, the metrics and the trained tokenizer.")
@click.option("--images", default=None, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Image folder to train and reconstruct (default: the repository's assets/).")
@click.option("--steps", default=300, show_default=True, help="Training steps (batch of 8 crops each).")
@click.option("--max-minutes", default=6.0, show_default=True, help="Stop training early after this long.")
@click.option("--seed", default=0, show_default=True, help="Seed of the random CLIP, the decoder and the data order.")
@fail_on_errors
def demo(out_dir: Path, images: Path | None, steps: int, max_minutes: float, seed: int) -> None:
    """Offline demo: train the tiny tokenizer on sample images for a few minutes on the CPU,
    then encode and decode them and write a side-by-side grid and PSNR.

    Nothing is downloaded: the tiny preset's CLIP is a small random ViT (frozen), so the
    pictures show the pipeline learning, not the quality of the real model.
    """
    from libra_tok.demo import run_demo

    result = run_demo(out_dir, images, steps=steps, max_minutes=max_minutes, seed=seed)
    m = result.metrics
    held = f", held-out {m['psnr_held_out']:.2f} dB ({', '.join(m['held_out_images'])})" if m["psnr_held_out"] else ""
    click.echo(f"PSNR {m['psnr_mean']:.2f} dB mean over {len(m['psnr_per_image'])} images{held}; "
               f"{m['steps']} steps in {m['train_seconds']:.0f} s")
    click.echo(f"grid: {result.grid}   metrics: {out_dir / 'metrics.json'}   tokenizer: {m['tokenizer']}")


@main.command("train")
@click.argument("data", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--config", "config_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="YAML or JSON file of training options; command-line options override it.")
@click.option("--resume", is_flag=True, help="Continue the run in --out-dir from its latest checkpoint (its saved "
              "options are the base; options given here override them, e.g. a larger --steps).")
@dataclass_options(TrainConfig, skip=("data",))
@fail_on_errors
def train_command(data: tuple[Path, ...], config_file: Path | None, resume: bool, **options) -> None:
    """Train a tokenizer on DATA: image folders (recursive), file lists or tar shards.

    Single process by default; under `torchrun --nproc_per_node=N` every process trains on its
    own slice of each batch (DDP). Checkpoints, reconstruction grids of held-out images,
    metrics.jsonl and the final tokenizer (EMA weights) go to --out-dir.
    """
    from libra_tok.train import load_config_file, train

    overrides = options_to_overrides(options)
    base: dict = load_config_file(config_file) if config_file else {}
    out_dir = Path(overrides.get("out_dir", base.get("out_dir", TrainConfig.out_dir)))
    saved = out_dir / "train_config.json"
    if resume and not config_file and saved.is_file():
        base = load_config_file(saved)
    if data:
        overrides["data"] = [str(d) for d in data]
    result = train(TrainConfig.from_dict({**base, **overrides}), resume=resume)
    click.echo(f"trained {result.step} steps; tokenizer: {result.final_tokenizer}")
    if result.skipped_images:
        click.echo(f"skipped {len(result.skipped_images)} unreadable image(s): see {result.out_dir / 'skipped_images.json'}")


@main.command("convert-official")
@click.argument("ckpt", type=click.Path(exists=True, path_type=Path))
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", default=None, help="Config preset of the checkpoint's dimensions (default: the "
              "vision_tokenizer_config.yaml beside the checkpoint, else libra-l336).")
@click.option("--clip", "clip_model", default=None, help="open_clip model name of the CLIP tower, if the yaml "
              "names a CLIP that has no known open_clip equivalent.")
@click.option("--trust-pickle", is_flag=True, help="Allow Python objects besides tensors in the pickle "
              "(unpickling can run code: only for files you trust).")
@fail_on_errors
def convert_official(ckpt: Path, out_dir: Path, preset: str | None, clip_model: str | None, trust_pickle: bool) -> None:
    """Convert the official Libra tokenizer (CKPT: vqgan.ckpt or its folder) to OUT_DIR.

    Every tensor of the official file is mapped (HF CLIP names to open_clip, q/k/v fused,
    training-only loss.* dropped) and its shape checked; the result loads with
    ImageTokenizer.from_pretrained(OUT_DIR).
    """
    from libra_tok.checkpoint import load_official

    tok = load_official(ckpt, clip=clip_model, config=preset, trust_pickle=trust_pickle)
    tok.save_pretrained(out_dir)
    n = sum(p.numel() for p in tok.parameters())
    click.echo(f"wrote {out_dir} ({n / 1e6:.1f} M parameters, {tok.config.clip_model}, "
               f"{tok.num_tokens} tokens x {tok.config.num_codebooks} ids of {tok.config.codebook_bits} bits)")


@main.command("info")
@click.argument("tokenizer", type=click.Path(exists=True, path_type=Path))
@fail_on_errors
def info(tokenizer: Path) -> None:
    """Print a tokenizer's configuration and parameter counts."""
    from libra_tok import ImageTokenizer

    tok = ImageTokenizer.from_pretrained(tokenizer)
    cfg = tok.config
    click.echo(f"tokenizer      {tokenizer}")
    click.echo(f"clip           {cfg.clip_model}, feature layers {list(cfg.feature_layers)} -> {cfg.feature_dim} channels")
    click.echo(f"grid           {cfg.grid_size}x{cfg.grid_size} = {cfg.num_tokens} tokens at {cfg.resolution} px")
    click.echo(f"codes          {cfg.num_codebooks} codebooks x {cfg.codebook_bits} bits ({cfg.codebook_size} ids each)")
    for name, module in (("encoder", tok.encoder), ("quantizer", tok.quantizer), ("decoder", tok.decoder)):
        click.echo(f"{name:<14} {sum(p.numel() for p in module.parameters()) / 1e6:.2f} M parameters")


if __name__ == "__main__":
    main()
