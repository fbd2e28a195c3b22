"""`libra-lm`: the Libra language model on the command line (thin front ends)."""

from __future__ import annotations

from pathlib import Path

import click

from libra_lm.train import TrainConfig

from .common import dataclass_options, fail_on_errors, run_file_options, run_options

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


def _finite(ctx, param, value):
    """click's FloatRange lets NaN (and inf) through: every comparison with NaN is False."""
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


@main.command("generate")
@click.option("--model", "model_path", required=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="LM folder: written by save_pretrained, an official Libra folder (libra-11b-chat/-base) or an "
                   "HF LLaMA folder (vision parts then untrained).")
@click.option("--image", "image_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Image to ask about (any format PIL reads). Without it the prompt is text only.")
@click.option("--prompt", required=True, help="The question or instruction.")
@click.option("--tokenizer", "tokenizer_path", type=click.Path(exists=True, path_type=Path), default=None,
              help="Image tokenizer: a libra-tok folder (save_pretrained) or an official vqgan.ckpt / its folder. "
                   "Default: the model folder's own: its image_tokenizer/ sub-folder, else the tokenizer recorded "
                   "by training (digest-checked), else its vqgan.ckpt (official Libra folders).")
@click.option("--tokenizer-preset", type=click.Choice(["tiny"]), default=None,
              help="Use the random image tokenizer of this preset instead: the same weights as `libra-tok encode "
                   "--preset` (offline demos and tests).")
@click.option("--text-tokenizer", "text_tokenizer_path", type=click.Path(exists=True, path_type=Path), default=None,
              help="SentencePiece tokenizer.model (or a folder holding it). Default: the model folder's "
                   "tokenizer.model.")
@click.option("--template", type=click.Choice(["vicuna_v1", "raw"]), default="vicuna_v1", show_default=True,
              help="Prompt layout: vicuna_v1 for chat models (official conversation template), raw for Libra-Base "
                   "(<s> image \\n prompt).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Most tokens to generate.")
@click.option("--temperature", type=click.FloatRange(min=0), default=0.0, show_default=True, callback=_finite,
              help="Sampling temperature (a finite number >= 0); 0 = greedy decoding.")
@click.option("--top-p", type=click.FloatRange(min=0, max=1, min_open=True), default=1.0, show_default=True,
              callback=_finite, help="Nucleus sampling: keep the smallest set of tokens with this probability mass.")
@click.option("--stop", "stop_strings", multiple=True,
              help="Stop when the answer contains this string (repeatable); generation also stops at EOS.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of sampling.")
@click.option("--attn-backend", type=click.Choice(["auto", "eager", "sdpa", "flex", "cuda"]), default="auto",
              show_default=True, help="Bridged-attention implementation; auto picks the fastest available.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA if available), cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True,
              help="LM weights' precision; auto = bf16 on CUDA, fp32 on CPU.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow Python objects besides tensors in pickled weights (an official vqgan.ckpt, "
                   "pytorch_model.bin): unpickling can run code, so only for files you trust.")
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
    trust_pickle: bool,
) -> None:
    """Answer PROMPT about an image with a Libra model and print the answer.

    The image goes through the image tokenizer (two ids and the CLIP features per patch),
    is placed between BOI and EOI in the prompt, and the LM decodes with a KV cache. The
    prompt and the answer share the model's context (max_position_embeddings): a longer prompt
    is an error, and the answer stops when the context is full.
    """
    import torch

    from libra_lm import LibraForCausalLM, TextTokenizer
    from libra_lm.generate import chat, image_segments

    if tokenizer_path is not None and tokenizer_preset is not None:
        raise click.UsageError("give --tokenizer or --tokenizer-preset, not both")
    dev = _device(device)
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" else "fp32"
    torch_dtype = getattr(torch, DTYPES[dtype])

    image = _read_image(image_path) if image_path is not None else None  # fail fast, before any loading
    if text_tokenizer_path is None:
        text_tokenizer_path = model_path / "tokenizer.model"
        if not text_tokenizer_path.is_file():
            raise FileNotFoundError(f"{model_path} has no tokenizer.model; pass --text-tokenizer PATH")
    text_tok = TextTokenizer.from_pretrained(text_tokenizer_path)
    image_tok = None
    if image is not None:
        image_tok = _image_tokenizer(tokenizer_path, tokenizer_preset, model_path, trust_pickle).to(dev).eval()
    model = LibraForCausalLM.from_pretrained(model_path, device=dev, dtype=torch_dtype, trust_pickle=trust_pickle)
    model.attn_backend = attn_backend

    images = image_segments(image_tok, [image], model.config) if image is not None else None
    generator = torch.Generator(device=dev).manual_seed(seed)
    out = chat(
        model, text_tok, [prompt], images, template=template, stop_strings=stop_strings,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, generator=generator,
    )
    click.echo(out.texts[0].strip())


def _read_image(path: Path):
    """The --image as 8-bit RGB, read as `libra-tok encode` reads its inputs; a file that is not
    a readable image is a ValueError with the reason."""
    from libra_tok.data import ImageReadError, ImageRecord, read_image

    try:
        return read_image(ImageRecord(str(path)))
    except ImageReadError as err:
        raise ValueError(f"cannot read --image {path}: {err}") from None


def _image_tokenizer(path: Path | None, preset: str | None, model_path: Path, trust_pickle: bool):
    from libra_lm.checkpoint import image_tokenizer_for
    from libra_tok import ImageTokenizer
    from libra_tok.pipeline import load_tokenizer

    if preset is not None:  # the reproducible random weights `libra-tok encode --preset` uses
        return load_tokenizer(preset=preset, device="cpu")
    if path is not None:
        return ImageTokenizer.from_pretrained(path, trust_pickle=trust_pickle)
    return image_tokenizer_for(model_path, trust_pickle=trust_pickle,
                               hint="pass --tokenizer PATH (a libra-tok folder or the official vqgan.ckpt) or "
                                    "--tokenizer-preset tiny")


@main.command("train")
@click.argument("data", nargs=-1, type=click.Path(exists=True, path_type=Path))
@run_file_options
@dataclass_options(TrainConfig, skip=("data",))
@fail_on_errors
def train_command(data: tuple[Path, ...], config_file: Path | None, resume: bool, **options) -> None:
    """Train the LM on DATA: shard folders from `libra-tok encode` (--stage pretrain, image-caption
    pairs, frozen LLM) or LLaVA-format JSON files (--stage sft, images looked up in --image-shards).

    Defaults are the official hyper-parameters of the chosen stage. One process by default;
    under `torchrun --nproc_per_node=N` every process trains on its own slice of each step
    (--parallel ddp, or fsdp to shard the weights). Checkpoints, metrics.jsonl, loss.png and the
    final model (with its tokenizer.model, ready for `libra-lm generate`) go to --out-dir.
    """
    import logging
    import os

    from libra_lm.train import train

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    result = train(TrainConfig.from_dict(run_options(TrainConfig, config_file, resume, options, data)), resume=resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun the first process reports
    losses = [row["loss"] for row in result.history if "loss" in row]
    last = f"; last loss {losses[-1]:.4f}" if losses else ""
    click.echo(f"trained {result.step} steps{last}; model: {result.final_model}; loss plot: {result.plot}")
    if result.skipped:
        click.echo(f"{len(result.skipped)} sample(s) left out: see {result.out_dir / 'skipped_samples.json'}")


@main.command("train-text-tokenizer")
@click.argument("sources", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--out", "out_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the SentencePiece model (e.g. runs/tokenizer.model).")
@click.option("--vocab-size", type=click.IntRange(min=260), default=320, show_default=True,
              help="Target number of pieces (3 specials + 256 bytes + merges); must not exceed the LM's "
                   "text_vocab_size (320 for the tiny preset).")
@click.option("--chat-template/--no-chat-template", default=True, show_default=True,
              help="Also train on the vicuna v1 system prompt and roles, which every instruction sample contains.")
@fail_on_errors
def train_text_tokenizer(sources: tuple[Path, ...], out_path: Path, vocab_size: int, chat_template: bool) -> None:
    """Train a small LLaMA-layout SentencePiece model (unk 0, bos 1, eos 2, byte fallback so "\n" is
    13) on SOURCES: shard folders (their captions), LLaVA JSON, JSON lines (caption/text) or text files.

    For the tiny presets and offline demos; real runs use the LLaMA tokenizer.model of the LLM.
    """
    from libra_lm.data import iter_texts
    from libra_lm.templates import VICUNA_V1_SYSTEM
    from libra_lm.text import TextTokenizer, train_sentencepiece

    texts = list(iter_texts(sources))
    if chat_template:
        texts += [f"{VICUNA_V1_SYSTEM} USER: ASSISTANT:"] * 4
    train_sentencepiece(texts, out_path, vocab_size)
    tok = TextTokenizer(out_path)
    click.echo(f"wrote {out_path} ({tok.vocab_size} pieces from {len(texts)} texts; newline id {tok.newline_token_id})")


if __name__ == "__main__":
    main()
