"""`libra-tok`: the image tokenizer toolkit on the command line (thin front ends)."""

from __future__ import annotations

import re
from pathlib import Path

import click

from libra_tok.train import TrainConfig

from .common import FiniteFloat, dataclass_options, fail_on_errors, run_file_options, run_options
from .hub import MODEL_HELP, ModelRef, offline_option, tok_push_command


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
@click.option("--out", "out_dir", default="demo-output", show_default=True,
              type=click.Path(file_okay=False, path_type=Path),
              help="Folder for the grid, the metrics and the trained tokenizer.")
@click.option("--images", default=None, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Image folder to train and reconstruct (default: the repository's assets/).")
@click.option("--steps", type=click.IntRange(min=1), default=300, show_default=True,
              help="Training steps (batch of 8 crops each).")
@click.option("--max-minutes", type=FiniteFloat(min=0, min_open=True), default=6.0, show_default=True,
              help="Stop training early after this long.")
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
    if m["skipped_inputs"]:
        skipped = m["skipped_inputs"]
        click.echo(f"{len(skipped)} input(s) unreadable or skipped ({_count_reasons(skipped)}): "
                   f"listed in {out_dir / 'metrics.json'}")


@main.command("train")
@click.argument("data", nargs=-1, type=click.Path(exists=True, path_type=Path))
@run_file_options
@click.option("--clip-weights", default=None, help="CLIP weights for a fresh tokenizer: an open_clip tag (openai), "
              "a weights file (open_clip or HF CLIP), an HF CLIP folder or its Hub id "
              "(openai/clip-vit-large-patch14-336); same as --tokenizer '{clip_pretrained: ...}'.")
@dataclass_options(TrainConfig, skip=("data",))
@offline_option
@fail_on_errors
def train_command(data: tuple[Path, ...], config_file: Path | None, resume: bool, clip_weights: str | None,
                  **options) -> None:
    """Train a tokenizer on DATA: image folders (recursive), file lists or tar shards.

    Single process by default; under `torchrun --nproc_per_node=N` every process trains on its
    own slice of each batch (DDP). Checkpoints, reconstruction grids of held-out images,
    metrics.jsonl and the final tokenizer (EMA weights) go to --out-dir.
    """
    from libra_tok.train import train

    merged = run_options(TrainConfig, config_file, resume, options, data)
    if clip_weights is not None:
        merged["tokenizer"] = {**merged.get("tokenizer", {}), "clip_pretrained": clip_weights}
    result = train(TrainConfig.from_dict(merged), resume=resume)
    click.echo(f"trained {result.step} steps; tokenizer: {result.final_tokenizer}")
    if result.skipped_images:
        click.echo(f"skipped {len(result.skipped_images)} input(s), unreadable or left out while listing: see "
                   f"{result.out_dir / 'skipped_images.json'}")


_trust_pickle = click.option("--trust-pickle", is_flag=True, help="Allow Python objects besides tensors in the pickle "
                             "(unpickling can run code: only for files you trust).")


@main.command("convert-official")
@click.argument("ckpt", type=ModelRef())
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option("--preset", default=None, help="Config preset of the checkpoint's dimensions (default: the "
              "vision_tokenizer_config.yaml beside the checkpoint, else libra-l336).")
@click.option("--clip", "clip_model", default=None, help="The CLIP architecture: an open_clip model name, an HF CLIP "
              "folder or Hub id (its config.json) or a weights file (its tensor shapes). Default: the CLIP folder the "
              "yaml's encoder_name names beside the checkpoint, else the checkpoint's tensor shapes. The CLIP weights "
              "always come from the checkpoint.")
@_trust_pickle
@offline_option
@fail_on_errors
def convert_official(ckpt: Path, out_dir: Path, preset: str | None, clip_model: str | None, trust_pickle: bool) -> None:
    """Convert the official Libra tokenizer (CKPT: vqgan.ckpt, its folder or a Hub id such as
    YifanXu/libra-vision-tokenizer) to OUT_DIR.

    Every tensor of the official file is mapped (HF CLIP names to open_clip, q/k/v fused,
    training-only loss.* dropped) and its shape checked; the result loads with
    ImageTokenizer.from_pretrained(OUT_DIR). Any CLIP ViT works: its architecture comes from
    the CLIP folder the yaml names (an HF config.json), --clip, or the checkpoint's shapes.
    """
    from libra_tok.checkpoint import load_official

    tok = load_official(ckpt, clip=clip_model, config=preset, trust_pickle=trust_pickle)
    tok.save_pretrained(out_dir)
    n = sum(p.numel() for p in tok.parameters())
    click.echo(f"wrote {out_dir} ({n / 1e6:.1f} M parameters, {tok.config.clip_model}, "
               f"{tok.num_tokens} tokens x {tok.config.num_codebooks} ids of {tok.config.codebook_bits} bits)")


def _tokenizer_options(fn):
    fn = offline_option(fn)
    fn = _trust_pickle(fn)
    fn = click.option("--device", default=None, help="cuda, cuda:1, cpu ... (default: cuda if available).")(fn)
    fn = click.option("--preset", default=None, help="Use a preset with fresh weights instead of a checkpoint "
                      "(tests and smoke runs only: the ids mean nothing).")(fn)
    fn = click.option("--checkpoint", type=ModelRef(), default=None,
                      help="Tokenizer: a folder written by `libra-tok train`/`convert-official`, the official "
                      f"vqgan.ckpt or its folder; {MODEL_HELP}.")(fn)
    return fn


_precision = click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto",
                          show_default=True, help="CLIP precision: auto = bf16 autocast on CUDA, fp32 on CPU "
                          "(the quantizer always runs in fp32; bf16 can flip ids whose pre-sign value is near 0).")


@main.command("encode")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Shard folder (created; rerunning resumes where it stopped).")
@_tokenizer_options
@click.option("--save-features", is_flag=True, help="Also store the CLIP features (float16, tokens x feature_dim "
              "per image: 4.7 MB per image for libra-l336) for LM training without recomputing them.")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True,
              help="Images per forward pass.")
@click.option("--shard-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Inputs per shard (a shard is written all-or-nothing).")
@click.option("--num-shards", type=click.IntRange(min=1), default=None,
              help="Split the inputs into this many shards instead of --shard-size.")
@click.option("--rank", type=click.IntRange(min=0), default=None, help="This process's rank (default: $RANK from "
              "torchrun, else 0); rank r writes shards r, r+w, r+2w, ...")
@click.option("--world-size", type=click.IntRange(min=1), default=None,
              help="Number of processes or machines (default: $WORLD_SIZE, else 1).")
@click.option("--num-workers", type=click.IntRange(min=0), default=4, show_default=True,
              help="Image-decoding worker processes (0: in the main process).")
@click.option("--max-pixels", type=click.IntRange(min=1), default=1 << 28, show_default=True,
              help="Refuse larger images (decompression bombs).")
@_precision
@fail_on_errors
def encode(inputs, out_dir, checkpoint, preset, device, trust_pickle, save_features, batch_size, shard_size, num_shards,
           rank, world_size, num_workers, max_pixels, precision) -> None:
    """Encode INPUTS (image folders searched recursively, file lists .txt/.lst, webdataset-style
    .tar shards, or images) into id shards for LM training.

    Captions come from sidecar .txt files, a captions.jsonl / captions.csv in a folder, or the
    .txt/.json members of a tar. Unreadable inputs are listed in the shard manifests with the
    reason and counted in the summary; they never stop the run.
    """
    from libra_tok.fileio import check_output_folder
    from libra_tok.hub import pinned
    from libra_tok.pipeline import encode_to_shards, load_tokenizer

    check_output_folder(out_dir)  # before the tokenizer is loaded
    tok = load_tokenizer(checkpoint, preset, device, trust_pickle=trust_pickle)
    summary = encode_to_shards(inputs, out_dir, tok, tokenizer_source=pinned(checkpoint) if checkpoint else None,
                               batch_size=batch_size, shard_size=shard_size, num_shards=num_shards,
                               save_features=save_features, rank=rank, world_size=world_size,
                               num_workers=num_workers, precision=precision, max_pixels=max_pixels)
    click.echo(f"{summary.samples} images encoded into {out_dir} ({len(summary.shards_written)} shards written, "
               f"{len(summary.shards_already_done)} already complete, {summary.shards_total} in all; "
               f"{summary.images_per_s:.1f} images/s)")
    if summary.failed:
        click.echo(f"{len(summary.failed)} unreadable input(s), listed in the shard manifests: "
                   + _count_reasons(summary.failed))
    if summary.skipped:
        from libra_tok.shards import SKIPPED_FILE

        click.echo(f"{len(summary.skipped)} input(s) skipped while listing, listed in {out_dir / SKIPPED_FILE}: "
                   + _count_reasons(summary.skipped))


def _count_reasons(rows: list[dict]) -> str:
    """'2 duplicate, 1 truncated tar': reasons without their details (file names, sizes, offsets)."""
    counts: dict[str, int] = {}
    for row in rows:
        key = re.split(r"[:(]", row["reason"], maxsplit=1)[0].strip()
        key = "duplicate" if key.startswith("duplicate of") else key
        counts[key] = counts.get(key, 0) + 1
    return ", ".join(f"{n} {reason}" for reason, n in sorted(counts.items()))


def _parse_indices(ctx, param, text: str | None) -> list[range] | None:
    """'0,5,10-19' -> [range(0, 1), range(5, 6), range(10, 20)]: ranges, so that a huge range
    costs nothing before it is checked against the number of samples."""
    if text is None:
        return None
    out = []
    for part in text.split(","):
        match = re.fullmatch(r"\s*([0-9]{1,18})\s*(?:-\s*([0-9]{1,18})\s*)?", part)
        if not match:
            raise click.BadParameter(f"{part.strip()!r} is not a sample number or range; expected numbers >= 0 "
                                     f"like '0,5,10-19', got {text!r}")
        first = int(match.group(1))
        last = int(match.group(2)) if match.group(2) is not None else first
        if last < first:
            raise click.BadParameter(f"the range {part.strip()!r} runs backwards; write {last}-{first}")
        out.append(range(first, last + 1))
    return out


@main.command("decode")
@click.argument("shard_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path), help="PNG folder.")
@click.option("--indices", default=None, callback=_parse_indices,
              help="Samples to decode, numbered from 0, e.g. '0,5,10-19' (default: all).")
@_tokenizer_options
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images per decoder pass.")
@_precision
@fail_on_errors
def decode(shard_dir, out_dir, indices, checkpoint, preset, device, trust_pickle, batch_size, precision) -> None:
    """Decode the ids in SHARD_DIR back to PNG images (default tokenizer: the one the shards name)."""
    from libra_tok.fileio import check_output_folder
    from libra_tok.pipeline import decode_shards, load_tokenizer
    from libra_tok.shards import open_shards

    check_output_folder(out_dir)
    n = len(open_shards(shard_dir))
    if indices is not None:  # checked before the tokenizer is loaded
        beyond = [r for r in indices if r[-1] >= n]
        if beyond:
            raise ValueError(f"--indices {beyond[0][-1]} is out of range: {shard_dir} holds {n} samples, "
                             f"numbered 0-{n - 1}")
        indices = [i for r in indices for i in r]
    tok = load_tokenizer(checkpoint, preset, device, trust_pickle=trust_pickle) if (checkpoint or preset) else None
    written = decode_shards(shard_dir, out_dir, tok, indices, batch_size, precision, trust_pickle=trust_pickle)
    click.echo(f"wrote {len(written)} images to {out_dir}")


@main.command("reconstruct")
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Output folder.")
@_tokenizer_options
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True,
              help="Images per forward pass.")
@click.option("--num-workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Image-decoding worker processes (0: in the main process).")
@_precision
@fail_on_errors
def reconstruct(inputs, out_dir, checkpoint, preset, device, trust_pickle, batch_size, num_workers, precision) -> None:
    """Show what the tokenizer keeps: per image a PNG of original | reconstruction | error
    heatmap, a contact sheet of all, and psnr.csv (PSNR on [0,1] at the tokenizer resolution).
    An --out that is an input folder, or outputs that would replace an input, are refused."""
    from libra_tok.fileio import check_output_folder
    from libra_tok.pipeline import load_tokenizer, reconstruct_images

    check_output_folder(out_dir)
    tok = load_tokenizer(checkpoint, preset, device, trust_pickle=trust_pickle)
    result = reconstruct_images(inputs, out_dir, tok, batch_size, precision, num_workers)
    width = max([len(Path(r["name"]).name) for r in result.rows] + [5])
    for row in result.rows:
        click.echo(f"{Path(row['name']).name:<{width}}  {row['psnr']:7.2f} dB")
    click.echo(f"{'mean':<{width}}  {result.mean_psnr:7.2f} dB over {len(result.rows)} images; "
               f"contact sheet: {result.contact_sheet}")
    if result.failed:
        click.echo(f"{len(result.failed)} input(s) unreadable or skipped ({_count_reasons(result.failed)}): "
                   f"see {out_dir / 'failed.json'}")


@main.command("verify")
@click.argument("shard_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@fail_on_errors
def verify(shard_dir) -> None:
    """Check a shard folder: no planned shard missing, every file a manifest declares listed,
    present and matching its size and sha256, and each shard's sample count agreeing with its
    shapes, file sizes, metadata lines and input slice (exit status 1, one line per problem)."""
    from libra_tok.shards import open_shards, verify_shards

    problems = verify_shards(shard_dir)
    for p in problems:
        click.echo(p, err=True)
    if problems:
        raise click.ClickException(f"{len(problems)} problem(s) in {shard_dir}")
    shards = open_shards(shard_dir)
    click.echo(f"{len(shards.shards)} shards, {len(shards)} samples: the set is complete and all files match "
               "their sha256")


@main.command("info")
@click.argument("tokenizer", type=ModelRef())
@_trust_pickle
@offline_option
@fail_on_errors
def info(tokenizer: Path, trust_pickle: bool) -> None:
    """Print a tokenizer's configuration and parameter counts (TOKENIZER: a folder, vqgan.ckpt or Hub id)."""
    from libra_tok import ImageTokenizer

    tok = ImageTokenizer.from_pretrained(tokenizer, trust_pickle=trust_pickle)
    cfg = tok.config
    click.echo(f"tokenizer      {tokenizer}")
    click.echo(f"clip           {cfg.clip_model}, feature layers {list(cfg.feature_layers)} -> "
               f"{cfg.feature_dim} channels")
    click.echo(f"grid           {cfg.grid_size}x{cfg.grid_size} = {cfg.num_tokens} tokens at {cfg.resolution} px")
    click.echo(f"ids            {cfg.num_codebooks} codebooks x {cfg.codebook_bits} bits "
               f"({cfg.codebook_size} ids each)")
    for name, module in (("encoder", tok.encoder), ("quantizer", tok.quantizer), ("decoder", tok.decoder)):
        click.echo(f"{name:<14} {sum(p.numel() for p in module.parameters()) / 1e6:.2f} M parameters")


from .tok_eval import eval_command  # noqa: E402
from .tok_serve import serve_command  # noqa: E402

main.add_command(eval_command)
main.add_command(serve_command)
main.add_command(tok_push_command)

if __name__ == "__main__":
    main()
