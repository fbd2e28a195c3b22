"""`libra-tok`: the image tokenizer toolkit on the command line (thin front ends)."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import fail_on_errors


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="libra")
def main() -> None:
    """Libra image tokenizer: frozen CLIP features -> two 9-bit LFQ ids per patch -> images.

    Every command explains its options with --help. Tokenizers are folders written by
    `save_pretrained` (config.json + model.safetensors) or the official Libra vqgan.ckpt.
    """


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
