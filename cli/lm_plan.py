"""`libra-lm memory-plan`: the memory a training run would need per process, before any GPU
is rented (the plan `libra-lm train` logs at start-up; libra_lm.memory_plan)."""

from __future__ import annotations

import click

from .common import FiniteFloat, fail_on_errors

STAGES = ("pretrain", "sft", "t2i")


@click.command("memory-plan", context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option("--preset", default="libra-7b", show_default=True,
              help="LM preset (libra_lm.config.PRESETS): libra-7b is the released 11 B Libra.")
@click.option("--stage", type=click.Choice(STAGES), default="pretrain", show_default=True,
              help="Training stage: pretrain and t2i train the vision parts (LLM frozen), sft trains everything; "
                   "it also gives the defaults of --batch-size and --max-length (the official recipe).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Sequences per step and process (default: the stage's, pretrain 8, sft 2).")
@click.option("--max-length", type=click.IntRange(min=1), default=None,
              help="Tokens per sequence, or --pack-length when packing (default: the stage's, pretrain 700, sft 2048).")
@click.option("--parallel", type=click.Choice(["none", "ddp", "fsdp"]), default="fsdp", show_default=True,
              help="none: one process; ddp: a full copy per process; fsdp: parameters, gradients and optimizer "
                   "state sharded over the processes.")
@click.option("--processes", type=click.IntRange(min=1), default=8, show_default=True,
              help="Processes (GPUs) in all, over every node.")
@click.option("--precision", type=click.Choice(["bf16", "fp32"]), default="bf16", show_default=True,
              help="Compute precision (bf16: frozen weights stored in bf16 under fsdp).")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=True, show_default=True,
              help="Recompute each layer's activations in the backward (keeps one layer's working set).")
@click.option("--device-memory-gb", type=FiniteFloat(min=0, min_open=True), default=80.0, show_default=True,
              help="Memory of one GPU in GiB; the plan must fit in 90 % of it.")
@fail_on_errors
def memory_plan_command(preset: str, stage: str, batch_size: int | None, max_length: int | None, parallel: str,
                        processes: int, precision: str, gradient_checkpointing: bool,
                        device_memory_gb: float) -> None:
    """Print the per-process memory of a training run (parameters, gradients, optimizer state and
    an activation estimate) and whether it fits the GPU; when it does not, exit 1 naming the options
    that would make it fit. Builds the model on the meta device only: no weights, no GPU.

    \b
    Example (the official pretraining on one node of 8 x 80 GB):
      libra-lm memory-plan --stage pretrain --parallel fsdp --processes 8
    """
    from libra_lm.config import LibraConfig
    from libra_lm.memory_plan import GIB, check_fits, plan
    from libra_lm.train import STAGE_DEFAULTS

    if parallel != "none" and processes == 1:
        parallel = "none"
    if parallel == "none" and processes > 1:
        raise click.BadParameter("--parallel none runs one process; pass --processes 1 or --parallel ddp|fsdp",
                                 param_hint="--processes")
    config = LibraConfig.from_preset(preset)
    defaults = STAGE_DEFAULTS[stage]
    p = plan(config, frozen_llm=stage != "sft", parallel=parallel, world=processes, precision=precision,
             batch_size=batch_size or defaults["batch_size"], seq_len=max_length or defaults["max_length"],
             checkpointing=gradient_checkpointing)
    click.echo(p.table())
    capacity = int(device_memory_gb * GIB)
    check_fits(p, config, capacity, "one GPU")
    click.echo(f"fits: {p.total / GIB:.1f} of {device_memory_gb * 0.9:.1f} GiB usable (90 % of {device_memory_gb:g})")
