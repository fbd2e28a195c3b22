"""`libra-lm complete-image`, `generate-image` and `attention`: the vision system of a Libra model
on the command line (paper §4.3, §4.4; libra_lm.visual, docs/visual.md)."""

from __future__ import annotations

from pathlib import Path

import click

from .common import FiniteFloat, fail_on_errors
from .lm_options import execution_options, image_tokenizer_options, model_option, text_tokenizer_option

CONTEXT = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


def _sampling_options(fn):
    fn = click.option("--seed", type=int, default=0, show_default=True,
                      help="Seed of sampling: the same seed draws the same images.")(fn)
    fn = click.option("--top-p", type=FiniteFloat(min=0, max=1, min_open=True), default=1.0, show_default=True,
                      help="Nucleus sampling: draw each id from the smallest set with this probability mass.")(fn)
    fn = click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
                      help="Draw each id from the k most likely ids of its codebook (0 = all).")(fn)
    fn = click.option("--temperature", type=FiniteFloat(min=0), default=1.0, show_default=True,
                      help="Sampling temperature; 0 = greedy (the most likely id at every patch).")(fn)
    return fn


def _out_option(what: str):
    return click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
                        help=f"Folder for {what} (made if missing; files of the same name are replaced).")


def _load(model_path, tokenizer_path, tokenizer_preset, text_tokenizer_path, device, dtype, attn_backend,
          trust_pickle, *, with_text_tokenizer: bool = True):
    from libra_lm.inference import load_for_inference

    return load_for_inference(model_path, tokenizer=tokenizer_path, tokenizer_preset=tokenizer_preset,
                              text_tokenizer=text_tokenizer_path, with_text_tokenizer=with_text_tokenizer,
                              device=device, dtype=dtype, attn_backend=attn_backend, trust_pickle=trust_pickle)


def _generator(dev, seed: int):
    import torch

    return torch.Generator(device=dev).manual_seed(seed)


@click.command("complete-image", context_settings=CONTEXT)
@model_option()
@click.option("--image", "image_path", required=True, type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="The image to complete (any format PIL reads); it is made square and resized as for the LM.")
@click.option("--keep-rows", type=click.IntRange(min=0), required=True,
              help="Patch rows kept from the top (of 24 for Libra, 8 for the tiny preset); the rest is drawn. "
                   "0 draws a whole image with no text.")
@click.option("--samples", type=click.IntRange(min=1), default=4, show_default=True,
              help="Completions to draw (one batch).")
@_out_option("grid.png (input | kept part | completions), completion_N.png and ids.safetensors")
@image_tokenizer_options
@_sampling_options
@execution_options
@fail_on_errors
def complete_image_command(model_path: Path, image_path: Path, keep_rows: int, samples: int, out_dir: Path,
                           tokenizer_path, tokenizer_preset, temperature, top_k, top_p, seed, attn_backend, device,
                           dtype, trust_pickle) -> None:
    """Complete an image from its top rows of patches with the vision heads (paper §4.3).

    Keeps the first --keep-rows rows of the image's patch ids (Fig. 3 a), draws the others with
    the model's vision heads and decodes them with the image tokenizer.

    The image's CLIP features are not fed (the contiguous signal is zero, as in the paper);
    the prompt is the pretraining layout `<s> BOI [kept patches]`.
    """
    from libra_lm.inference import read_image
    from libra_lm.visual.completion import run_completion
    from libra_tok.fileio import check_output_folder

    check_output_folder(out_dir)  # fail fast, before any loading
    image = read_image(image_path)
    lm = _load(model_path, tokenizer_path, tokenizer_preset, None, device, dtype, attn_backend, trust_pickle,
               with_text_tokenizer=False)
    files = run_completion(lm.model, lm.image_tokenizer, image, keep_rows, out_dir, samples, temperature=temperature,
                           top_p=top_p, top_k=top_k, generator=_generator(lm.device, seed), progress=True)
    click.echo(f"wrote {files.grid} ({samples} completion(s) after {keep_rows} row(s)) and {files.ids}")


@click.command("generate-image", context_settings=CONTEXT)
@model_option()
@click.option("--prompt", required=True, help="The caption to draw (lowercased and cut to 64 words, as in training).")
@click.option("--samples", type=click.IntRange(min=1), default=4, show_default=True,
              help="Images to draw for the prompt (one batch).")
@_out_option("image_N.png, grid.png, ids.safetensors and prompt.txt")
@click.option("--cfg-scale", type=FiniteFloat(), default=None,
              help="Classifier-free guidance against the empty caption: draw from uncond + s * (cond - uncond). "
                   "Off by default (Libra was not trained for it); 1 draws what no guidance draws.")
@image_tokenizer_options
@text_tokenizer_option
@_sampling_options
@execution_options
@fail_on_errors
def generate_image_command(model_path: Path, prompt: str, samples: int, out_dir: Path, cfg_scale: float | None,
                           tokenizer_path, tokenizer_preset, text_tokenizer_path, temperature, top_k, top_p, seed,
                           attn_backend, device, dtype, trust_pickle) -> None:
    """Draw images for a caption with the vision heads (paper §4.3).

    The prompt is the layout of `libra-lm train --stage t2i` (`<s>{caption}\\n BOI`, Fig. 3 b, c);
    the patches are drawn with the vision heads (contiguous signal zero) and decoded with the
    image tokenizer.
    """
    from libra_lm.visual.t2i import run_generation
    from libra_tok.fileio import check_output_folder

    check_output_folder(out_dir)  # fail fast, before any loading
    lm = _load(model_path, tokenizer_path, tokenizer_preset, text_tokenizer_path, device, dtype, attn_backend,
               trust_pickle)
    files = run_generation(lm.model, lm.text_tokenizer, lm.image_tokenizer, prompt, out_dir, samples,
                           cfg_scale=cfg_scale, temperature=temperature, top_p=top_p, top_k=top_k,
                           generator=_generator(lm.device, seed), progress=True)
    click.echo(f"wrote {files.grid} ({samples} image(s)) and {files.ids}")


def _layers(ctx, param, value):
    if value is None:
        return None
    try:
        layers = [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise click.BadParameter(f"expected comma-separated layer numbers such as 1,8,16,32, got {value!r}") from None
    if not layers or min(layers) < 1:
        raise click.BadParameter("layers are numbered from 1")
    return layers


@click.command("attention", context_settings=CONTEXT)
@model_option(multiple=True, extra_help=" Repeat it to compare models (e.g. Libra and a variant without the "
                                        "bridge) on one plot.")
@click.option("--questions", "questions_path", required=True,
              type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="VQA questions, JSON lines: \"image\" (a file in --images), \"text\" or \"question\"; optional "
                   "\"question_id\" and \"answer\" (a single-word answer to use instead of the model's first token).")
@click.option("--images", "images_dir", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of the images the questions name.")
@_out_option("attention.json, attention_differences.png and heatmaps/")
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True,
              help="Analyse the first N questions (the paper averages 100 VQA samples).")
@click.option("--batch-size", type=click.IntRange(min=1), default=4, show_default=True,
              help="Questions per forward pass.")
@click.option("--template", type=click.Choice(["vicuna_v1", "raw"]), default="vicuna_v1", show_default=True,
              help="Prompt layout: vicuna_v1 for chat models, raw for Libra-Base.")
@click.option("--cross-layer", type=click.Choice(["heads-mean", "per-head"]), default="heads-mean",
              show_default=True,
              help="Cross-layer difference of each layer's head-averaged attention (Fig. 4 b caption), or per head "
                   "(Fig. 7's pseudo code).")
@click.option("--heatmaps", "heatmap_samples", type=click.IntRange(min=0), default=4, show_default=True,
              help="Draw the answer's attention over the image for the first N questions (Fig. 4 a).")
@click.option("--heatmap-layers", callback=_layers, default=None,
              help="Layers (from 1) of the heatmaps, comma-separated, e.g. 1,8,16,32. Default: 4 evenly spaced "
                   "from the first to the last.")
@image_tokenizer_options
@text_tokenizer_option
@execution_options
@fail_on_errors
def attention_command(model_paths: tuple[Path, ...], questions_path: Path, images_dir: Path, out_dir: Path,
                      limit: int, batch_size: int, template: str, cross_layer: str, heatmap_samples: int,
                      heatmap_layers: list[int] | None, tokenizer_path, tokenizer_preset, text_tokenizer_path,
                      attn_backend, device, dtype, trust_pickle) -> None:
    """Where answers look in the image, and how attention differs across layers (paper §4.4).

    For each VQA question, the attention of the answer token on the image patches per layer
    and head (computed for that one query row), then Fig. 7's cross-layer and inner-layer
    differences per layer, averaged over the questions (Fig. 4).

    The answer token is the question's "answer" (its first token) when given, else the model's
    greedy first token. Writes attention.json (the curves of every model),
    attention_differences.png (all models on one plot) and heatmaps/MODEL/QUESTION.png.
    """
    from libra_lm.visual.attention_maps import analyse_model, read_questions, write_attention_report
    from libra_tok.fileio import check_output_folder

    check_output_folder(out_dir)
    questions = read_questions(questions_path, limit)
    labels = _labels(model_paths)
    results = []
    for model_path, label in zip(model_paths, labels, strict=True):
        lm = _load(model_path, tokenizer_path, tokenizer_preset, text_tokenizer_path, device, dtype, attn_backend,
                   trust_pickle)
        results.append(analyse_model(
            lm.model, lm.text_tokenizer, lm.image_tokenizer, questions, images_dir, label=label, source=str(model_path),
            template=template, batch_size=batch_size, cross_layer=cross_layer,
            heatmap_dir=out_dir / "heatmaps" / label, heatmap_samples=heatmap_samples,
            heatmap_layers=[layer - 1 for layer in heatmap_layers] if heatmap_layers else None))
        del lm  # one model in memory at a time
    paths = write_attention_report(out_dir, results, cross_layer)
    click.echo(f"wrote {paths['json']} and {paths['plot']} ({len(questions)} question(s), {len(results)} model(s))")


def _labels(paths: tuple[Path | str, ...]) -> list[str]:
    """Each model's folder (or Hub repo) name; where two are the same (runs/a/final,
    runs/b/final), with the parent's name (a-final, b-final); numbered where that is not enough
    either."""
    resolved = [(p if isinstance(p, Path) else Path(p.split("@")[0])).resolve() for p in paths]  # a Hub id: its name
    names = [p.name or "model" for p in resolved]
    names = [f"{p.parent.name}-{n}" if names.count(n) > 1 else n for p, n in zip(resolved, names, strict=True)]
    return [f"{n}-{i + 1}" if names.count(n) > 1 else n for i, n in enumerate(names)]


__all__ = ["complete_image_command", "generate_image_command", "attention_command"]
