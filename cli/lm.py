"""`libra-lm`: the Libra language model on the command line (thin front ends)."""

from __future__ import annotations

from pathlib import Path

import click

from libra_lm.train import TrainConfig

from .common import FiniteFloat, dataclass_options, fail_on_errors, run_file_options, run_options
from .hub import lm_push_command, offline_option
from .lm_options import execution_options, image_tokenizer_options, model_option, text_tokenizer_option


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="libra")
def main() -> None:
    """Libra LM: LLaMA with a routed visual expert and the cross-modal bridge."""


@main.command("generate")
@model_option()
@click.option("--image", "image_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Image to ask about (any format PIL reads). Without it the prompt is text only.")
@click.option("--prompt", required=True, help="The question or instruction.")
@image_tokenizer_options
@text_tokenizer_option
@click.option("--template", type=click.Choice(["vicuna_v1", "raw"]), default="vicuna_v1", show_default=True,
              help="Prompt layout: vicuna_v1 for chat models (official conversation template), raw for Libra-Base "
                   "(<s> image \\n prompt).")
@click.option("--max-new-tokens", type=click.IntRange(min=1), default=256, show_default=True,
              help="Most tokens to generate.")
@click.option("--temperature", type=FiniteFloat(min=0), default=0.0, show_default=True,
              help="Sampling temperature (a finite number >= 0); 0 = greedy decoding.")
@click.option("--top-p", type=FiniteFloat(min=0, max=1, min_open=True), default=1.0, show_default=True,
              help="Nucleus sampling: keep the smallest set of tokens with this probability mass.")
@click.option("--stop", "stop_strings", multiple=True,
              help="Stop when the answer contains this string (repeatable); generation also stops at EOS.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of sampling.")
@execution_options
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
    """Answer PROMPT about an image with a Libra model (or a HoVLE one, docs/hovle.md) and print
    the answer.

    The image goes through the image tokenizer (two ids and the CLIP features per patch; HoVLE
    reads its pixels), is placed between BOI and EOI in the prompt, and the LM decodes with a KV
    cache. The
    prompt and the answer share the model's context (max_position_embeddings): a longer prompt
    is an error, and the answer stops when the context is full.
    """
    import torch

    from libra_lm import inference
    from libra_lm.generate import chat, image_segments

    image = inference.read_image(image_path) if image_path is not None else None  # fail fast, before any loading
    lm = inference.load_for_inference(model_path, tokenizer=tokenizer_path, tokenizer_preset=tokenizer_preset,
                                      text_tokenizer=text_tokenizer_path, with_image_tokenizer=image is not None,
                                      device=device, dtype=dtype, attn_backend=attn_backend, trust_pickle=trust_pickle)
    model, text_tok, image_tok, dev = lm.model, lm.text_tokenizer, lm.image_tokenizer, lm.device
    generator = torch.Generator(device=dev).manual_seed(seed)
    if getattr(model, "arch", "libra") == "hovle":  # the monolithic baseline reads the image's pixels (docs/hovle.md)
        from libra_lm.hovle.generate import chat

        images = [image]
    else:
        images = image_segments(image_tok, [image], model.config) if image is not None else None
    out = chat(
        model, text_tok, [prompt], images, template=template, stop_strings=stop_strings,
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, generator=generator,
    )
    click.echo(out.texts[0].strip())


@main.command("train")
@click.argument("data", nargs=-1, type=click.Path(exists=True, path_type=Path))
@run_file_options
@dataclass_options(TrainConfig, skip=("data",))
@offline_option
@fail_on_errors
def train_command(data: tuple[Path, ...], config_file: Path | None, resume: bool, **options) -> None:
    """Train the LM on DATA: shard folders from `libra-tok encode` (--stage pretrain, image-caption
    pairs, frozen LLM; --stage t2i, the same pairs as text-to-image) or LLaVA-format JSON files
    (--stage sft, images looked up in --image-shards).

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
    config = TrainConfig.from_dict(run_options(TrainConfig, config_file, resume, options, data))
    if config.arch == "hovle":  # the monolithic baseline (docs/hovle.md)
        from libra_lm.hovle.trainer import train
    result = train(config, resume=resume)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun the first process reports
    losses = [row["loss"] for row in result.history if "loss" in row]
    last = f"; last loss {losses[-1]:.4f}" if losses else ""
    click.echo(f"trained {result.step} steps{last}; model: {result.final_model}; loss plot: {result.plot}")
    if result.skipped:
        click.echo(f"{len(result.skipped)} sample(s) left out: see {result.out_dir / 'skipped_samples.json'}")


@main.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("out", required=False, type=click.Path(path_type=Path))
@click.option("--final", is_flag=True,
              help="Write RUN_DIR/final (replacing it), as training does at its end, instead of OUT.")
@click.option("--step", type=click.IntRange(min=0), default=None,
              help="Export the checkpoint of this step (default: the one checkpoints/latest.json names).")
@click.option("--max-shard-size", type=FiniteFloat(min=0, min_open=True), default=2.0, show_default=True,
              help="Largest safetensors file in GiB; also the most memory the export holds at once.")
@click.option("--trust-pickle", is_flag=True,
              help="Allow Python objects in pickled weights of the run's --init-from folder (pytorch_model.bin); "
                   "only for files you trust.")
@offline_option
@fail_on_errors
def export_command(run_dir: Path, out: Path | None, final: bool, step: int | None, max_shard_size: float,
                   trust_pickle: bool) -> None:
    """Write the model of a sharded training run (--parallel fsdp) as a model folder: OUT gets
    config.json, model-*-of-*.safetensors with their index, and the run's tokenizer.model, ready for
    `libra-lm generate --model OUT` and `--init-from OUT`.

    Trained weights come from the checkpoint, frozen ones from the run's starting point; one
    output shard is in memory at a time (docs/scale.md).
    """
    from libra_lm.export import export_run

    if (out is None) == (not final):
        raise click.UsageError("give OUT or --final (one of them)")
    target = run_dir / "final" if final else out
    folder = export_run(run_dir, target, step=step, max_shard_bytes=int(max_shard_size * 2**30),
                        trust_pickle=trust_pickle, replace=final)
    click.echo(f"exported to {folder}")


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


from .lm_visual import attention_command, complete_image_command, generate_image_command  # noqa: E402

main.add_command(complete_image_command)
main.add_command(generate_image_command)
main.add_command(attention_command)
main.add_command(lm_push_command)

from .lm_eval import eval_command, score_group  # noqa: E402

main.add_command(eval_command)
main.add_command(score_group)

from .lm_compare import compare_command  # noqa: E402
from .lm_plan import memory_plan_command  # noqa: E402

main.add_command(memory_plan_command)
main.add_command(compare_command)

if __name__ == "__main__":
    main()
