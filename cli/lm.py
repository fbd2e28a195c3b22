"""`libra-lm`: the Libra language model on the command line (thin front ends)."""

from __future__ import annotations

from pathlib import Path

import click

from cli.common import fail_on_errors

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="libra")
def main() -> None:
    """Libra LM: LLaMA with a routed visual expert and the cross-modal bridge."""


def _device(name: str):
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available; use --device cpu")
    return device


@main.command("generate")
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="LM folder: written by save_pretrained, an official Libra folder (libra-11b-chat/-base) or an "
                   "HF LLaMA folder (vision parts then untrained).")
@click.option("--image", "image_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Image to ask about (any format PIL reads). Without it the prompt is text only.")
@click.option("--prompt", required=True, help="The question or instruction.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True, path_type=Path), default=None,
              help="Image tokenizer: a libra-tok folder (save_pretrained) or an official vqgan.ckpt / its folder. "
                   "Default: the model folder when it holds vqgan.ckpt.")
@click.option("--tokenizer-preset", type=click.Choice(["tiny"]), default=None,
              help="Use a freshly initialised image tokenizer of this preset instead (offline demos and tests; "
                   "seeded by --seed).")
@click.option("--text-tokenizer", "text_tokenizer_path", type=click.Path(exists=True, path_type=Path), default=None,
              help="SentencePiece tokenizer.model (or a folder holding it). Default: the model folder's tokenizer.model.")
@click.option("--template", type=click.Choice(["vicuna_v1", "raw"]), default="vicuna_v1", show_default=True,
              help="Prompt layout: vicuna_v1 for chat models (official conversation template), raw for Libra-Base "
                   "(<s> image \\n prompt).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Most tokens to generate.")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True,
              help="Sampling temperature; 0 = greedy decoding.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
              help="Nucleus sampling: keep the smallest set of tokens with this probability mass.")
@click.option("--stop", "stop_strings", multiple=True,
              help="Stop when the answer contains this string (repeatable); generation also stops at EOS.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of sampling (and of --tokenizer-preset).")
@click.option("--attn-backend", type=click.Choice(["auto", "eager", "sdpa", "flex", "cuda"]), default="auto",
              show_default=True, help="Bridged-attention implementation; auto picks the fastest available.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if available), cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True,
              help="LM weights' precision; auto = bf16 on CUDA, fp32 on CPU.")
@fail_on_errors
def generate(
    model_path: Path,
    image_path: Path | None,
    prompt: str,
    tokenizer_path: Path | None,
    tokenizer_preset: str | None,
    text_tokenizer_path: Path | None,
    template: str,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    stop_strings: tuple[str, ...],
    seed: int,
    attn_backend: str,
    device: str,
    dtype: str,
) -> None:
    """Answer PROMPT about an image with a Libra model and print the answer.

    The image goes through the image tokenizer (two ids and the CLIP features per patch),
    is placed between BOI and EOI in the prompt, and the LM decodes with a KV cache.
    """
    import torch

    from libra_lm import LibraForCausalLM, TextTokenizer
    from libra_lm.generate import chat, encode_images

    if tokenizer_path is not None and tokenizer_preset is not None:
        raise click.UsageError("give --tokenizer or --tokenizer-preset, not both")
    dev = _device(device)
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    torch_dtype = getattr(torch, DTYPES[dtype])

    if text_tokenizer_path is None:
        text_tokenizer_path = model_path / "tokenizer.model"
        if not text_tokenizer_path.is_file():
            raise FileNotFoundError(f"{model_path} has no tokenizer.model; pass --text-tokenizer PATH")
    text_tok = TextTokenizer.from_pretrained(text_tokenizer_path)
    model = LibraForCausalLM.from_pretrained(model_path, device=dev, dtype=torch_dtype)
    model.attn_backend = attn_backend

    images = None
    if image_path is not None:
        image_tok = _image_tokenizer(tokenizer_path, tokenizer_preset, model_path, seed).to(dev).eval()
        images = encode_images(image_tok, [image_path], model.config)

    generator = torch.Generator(device=dev).manual_seed(seed)
    out = chat(
        model, text_tok, [prompt], images, template=template, stop_strings=stop_strings,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, generator=generator,
    )
    click.echo(out.texts[0].strip())


def _image_tokenizer(path: Path | None, preset: str | None, model_path: Path, seed: int):
    import torch

    from libra_tok import ImageTokenizer

    if preset is not None:
        torch.manual_seed(seed)
        return ImageTokenizer(preset)
    if path is None:
        if not (model_path / "vqgan.ckpt").is_file():
            raise ValueError("an --image needs an image tokenizer: pass --tokenizer PATH (a libra-tok folder or the "
                             "official vqgan.ckpt) or --tokenizer-preset tiny")
        path = model_path
    return ImageTokenizer.from_pretrained(path)


if __name__ == "__main__":
    main()
