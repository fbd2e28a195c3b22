"""The options every command that runs a trained LM shares (generate, eval, the visual
commands), written once: the model, its image and text tokenizers, and how it runs.
The libraries load what they name (`libra_lm.inference`)."""

from __future__ import annotations

import click

from libra_lm.inference import DTYPES

from .hub import MODEL_HELP, ModelRef, offline_option

ATTN_BACKENDS = ("auto", "eager", "sdpa", "flex", "cuda")


def model_option(multiple: bool = False, extra_help: str = ""):
    """--model: the LM folder or Hub id (`model_path`, or `model_paths` when repeatable)."""
    help_text = ("LM folder: written by save_pretrained (e.g. `libra-lm train`'s final/), an official Libra "
                 f"folder (YifanXu/libra-11b-chat, -base) or an HF LLaMA folder; {MODEL_HELP}.")
    return click.option("--model", "model_paths" if multiple else "model_path", required=True, multiple=multiple,
                        type=ModelRef(file_okay=False), help=help_text + extra_help)


def image_tokenizer_options(fn):
    """--tokenizer / --tokenizer-preset (`tokenizer_path`, `tokenizer_preset`)."""
    fn = click.option("--tokenizer-preset", type=click.Choice(["tiny"]), default=None,
                      help="Use the random image tokenizer of this preset instead: the same weights as `libra-tok "
                           "encode --preset` (offline demos and tests).")(fn)
    fn = click.option("--tokenizer", "tokenizer_path", type=ModelRef(), default=None,
                      help="Image tokenizer: a libra-tok folder (save_pretrained), an official vqgan.ckpt or its "
                           "folder, or a Hub id (YifanXu/libra-vision-tokenizer). Default: the model folder's own: "
                           "its image_tokenizer/ sub-folder, else the tokenizer recorded by training "
                           "(digest-checked), else its vqgan.ckpt (official Libra folders).")(fn)
    return fn


def text_tokenizer_option(fn):
    """--text-tokenizer (`text_tokenizer_path`)."""
    return click.option("--text-tokenizer", "text_tokenizer_path", type=ModelRef(), default=None,
                        help="SentencePiece tokenizer.model (or a folder or Hub id holding it). Default: the model "
                             "folder's tokenizer.model.")(fn)


def execution_options(fn):
    """--attn-backend, --device, --dtype, --trust-pickle and --offline."""
    fn = offline_option(fn)
    fn = click.option("--trust-pickle", is_flag=True,
                      help="Allow Python objects besides tensors in pickled weights (an official vqgan.ckpt, "
                           "pytorch_model.bin): unpickling can run code, so only for files you trust.")(fn)
    fn = click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True,
                      help="LM weights' precision; auto = bf16 on CUDA, fp32 on CPU.")(fn)
    fn = click.option("--device", default="auto", show_default=True,
                      help="auto (CUDA if available), cpu, cuda or cuda:N.")(fn)
    fn = click.option("--attn-backend", type=click.Choice(ATTN_BACKENDS), default="auto", show_default=True,
                      help="Bridged-attention implementation; auto picks the fastest available.")(fn)
    return fn


__all__ = ["model_option", "image_tokenizer_options", "text_tokenizer_option", "execution_options",
           "ATTN_BACKENDS"]
