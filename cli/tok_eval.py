"""`libra-tok eval`: reconstruction metrics (PSNR, SSIM, LPIPS, rFID, id usage, bits per pixel)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import fail_on_errors
from .hub import MODEL_HELP, ModelRef, offline_option

PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")  # libra_tok.precision.PRECISIONS


@click.command("eval", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("inputs", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--checkpoint", "-c", type=ModelRef(), default=None,
              help=f"Tokenizer to evaluate (a save_pretrained folder or the official vqgan.ckpt; {MODEL_HELP}); "
                   "INPUTS are then image folders, files, .txt/.lst lists or tar shards. Without it, INPUTS are two "
                   "folders: ORIGINALS RECONSTRUCTIONS.")
@click.option("--resolution", type=click.IntRange(min=11), default=None,
              help="Evaluation resolution in pixels. With --checkpoint it must be the tokenizer's (the default); "
                   "for two folders both sides are brought to it (default 336).")
@click.option("--also", type=click.IntRange(min=11), multiple=True,
              help="Also score at this resolution, both sides resized from the evaluation resolution (torch "
                   "bicubic, antialias); repeatable, e.g. --also 256.")
@click.option("--pad-mode", type=click.Choice(["pad", "crop"]), default=None,
              help="How non-square images become square before the bicubic resize: 'pad' (official expand2square "
                   "on the CLIP-mean colour) or 'crop' (centre square, the ImageNet protocol of LlamaGen / "
                   "Open-MAGVIT2). Default: the tokenizer's, 'pad' for two folders.")
@click.option("--max-images", type=click.IntRange(min=1), default=None,
              help="Score only the first N images (inputs in sorted order; pairs in originals' order).")
@click.option("--batch-size", type=click.IntRange(min=1), default=16, show_default=True, help="Images per batch.")
@click.option("--num-workers", type=click.IntRange(min=0), default=2, show_default=True,
              help="Image decoding worker processes (0: in the main process).")
@click.option("--device", default=None, help="Torch device, e.g. cuda, cuda:1, cpu (default: cuda if available).")
@click.option("--precision", type=click.Choice(PRECISION_CHOICES), default="auto", show_default=True,
              help="Tokenizer autocast: auto = bf16 on CUDA, fp32 elsewhere. Metrics always run in fp32/fp64.")
@click.option("--lpips", "lpips_nets", type=click.Choice(["alex", "vgg"]), multiple=True,
              help="LPIPS trunk(s), repeatable (default: alex and vgg). Needs the torchvision ImageNet weights "
                   "alexnet-owt-7be5be79.pth / vgg16-397923af.pth in --weights-dir.")
@click.option("--no-lpips", is_flag=True, help="Skip LPIPS.")
@click.option("--no-fid", is_flag=True, help="Skip rFID.")
@click.option("--inception-weights", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="pytorch-fid's pt_inception-2015-12-05-6726825d.pth (default: that file in --weights-dir).")
@click.option("--weights-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Folder holding the metric network weights (default: the torch hub cache, "
                   "$TORCH_HOME/hub/checkpoints, i.e. ~/.cache/torch/hub/checkpoints). Nothing is downloaded.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the summary (protocol, means, rFID, id usage, unreadable files) as JSON here.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write per-image metrics as CSV here (one row per image, one column per metric and resolution).")
@click.option("--trust-pickle", is_flag=True,
              help="Allow Python objects in an official .ckpt pickle (unpickling can run code: only for files "
              "you trust).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@offline_option
@fail_on_errors
def eval_command(inputs: tuple[Path, ...], checkpoint: Path | None, resolution: int | None, also: tuple[int, ...],
                 pad_mode: str | None, max_images: int | None, batch_size: int, num_workers: int, device: str | None,
                 precision: str, lpips_nets: tuple[str, ...], no_lpips: bool, no_fid: bool,
                 inception_weights: Path | None, weights_dir: Path | None, json_path: Path | None,
                 csv_path: Path | None, trust_pickle: bool, quiet: bool) -> None:
    """Score reconstructions: a tokenizer on INPUTS (--checkpoint), or two folders ORIGINALS RECONSTRUCTIONS.

    \b
    libra-tok eval val/ -c tokenizer/ --also 256 --json eval.json --csv eval.csv
    libra-tok eval originals/ reconstructions/ --resolution 256 --pad-mode crop

    Reports PSNR and SSIM (on [0, 1], data_range 1, per image then mean; SSIM with the 11x11
    Gaussian window of Wang et al. and ssim_uniform7, scikit-image's default 7x7 window), LPIPS,
    rFID (FID Inception pool features of originals vs reconstructions) and, with a tokenizer,
    id usage and perplexity per codebook and bits per pixel. Originals are made square
    (--pad-mode) and resized with bicubic; the tokenizer's reconstructions are rounded to 8 bits
    as a PNG holds them. Two folders are paired by relative path without the extension
    (cat.jpg <-> cat.png). Unreadable images, and inputs skipped while listing (damaged tars,
    symlink loops, duplicates), are counted and listed, never fatal.
    """
    from libra_tok.evaluate import EvalOptions, MetricModels, evaluate_folders, evaluate_tokenizer
    from libra_tok.fileio import check_output_file

    if checkpoint is None and (len(inputs) != 2 or not all(p.is_dir() for p in inputs)):
        raise click.UsageError(
            f"without --checkpoint, INPUTS must be two folders, ORIGINALS RECONSTRUCTIONS (got {len(inputs)} "
            f"input(s): {', '.join(str(p) for p in inputs)}); to evaluate a tokenizer pass --checkpoint TOKENIZER"
        )
    for path, option in ((json_path, "--json"), (csv_path, "--csv")):
        if path is not None:  # before any work: a report that cannot be written would lose it all
            check_output_file(path, option)
    options = EvalOptions(resolution=resolution, also=also, pad_mode=pad_mode, batch_size=batch_size,
                          max_images=max_images, num_workers=num_workers, precision=precision, device=device,
                          progress=not quiet)
    nets = () if no_lpips else (lpips_nets or ("alex", "vgg"))
    models = MetricModels.load(nets, fid=not no_fid, inception_weights=inception_weights, weights_dir=weights_dir,
                               device=options.torch_device())
    if checkpoint is not None:
        from libra_tok import ImageTokenizer

        tok = ImageTokenizer.from_pretrained(checkpoint, trust_pickle=trust_pickle)
        result = evaluate_tokenizer(tok, inputs, options, models)
    else:
        result = evaluate_folders(inputs[0], inputs[1], options, models)

    click.echo(result.format_table())
    if json_path is not None:
        result.write_json(json_path)
        click.echo(f"wrote {json_path}")
    if csv_path is not None:
        result.write_csv(csv_path)
        click.echo(f"wrote {csv_path}")
    if result.summary["num_failed"]:
        first = result.summary["failed"][0]
        click.echo(f"{result.summary['num_failed']} image(s) unreadable or skipped, e.g. {first['name']}: "
                   f"{first['reason']}"
                   + (" (all listed in the JSON)" if json_path else " (--json lists them all)"), err=True)


__all__ = ["eval_command"]
