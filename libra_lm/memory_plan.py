"""The memory a training run needs per process, computed before any weights are loaded.

    p = plan(LibraConfig.from_preset("libra-7b"), frozen_llm=True, parallel="fsdp", world=8,
             precision="bf16", batch_size=8, seq_len=700, checkpointing=True)
    print(p.table())
    check_fits(p, device_bytes=80 * 2**30)   # ValueError naming the options that would fit

Per process:
  parameters   fsdp: every parameter's shard (trainable fp32, frozen in the compute dtype) plus
               two decoder layers gathered in the compute dtype (the one computing and the
               one prefetched); ddp / one process: every parameter in fp32.
  gradients    fp32, trainable parameters only (fsdp: their shards; ddp: plus its buckets).
  optimizer    AdamW's two fp32 moments of the trainable parameters (fsdp: their shards).
  activations  an estimate for batch x sequence tokens: with checkpointing each layer keeps its
               input and one layer at a time its working set; without, every layer keeps its
               working set; plus the fp32 text and vision logits and their gradients.
The activation estimate counts the tensors the forward keeps per token (about 16 x hidden +
3 x intermediate values per layer for attention with both experts, the bridge and SwiGLU);
allocator fragmentation, CUDA context and kernels' workspaces are left to a 10 % margin.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from .config import LibraConfig

GIB = 2**30
MARGIN = 0.9  # the share of a device's memory a plan may fill


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per process of one configuration, and the configuration."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    trainable: int  # parameter counts of the whole model
    frozen: int
    layer: int  # parameters of the largest decoder layer
    parallel: str
    world: int
    precision: str
    batch_size: int
    seq_len: int
    checkpointing: bool

    @property
    def total(self) -> int:
        return self.parameters + self.gradients + self.optimizer + self.activations

    def table(self) -> str:
        rows = [("parameters", self.parameters), ("gradients", self.gradients), ("optimizer", self.optimizer),
                ("activations", self.activations), ("total", self.total)]
        head = (f"memory plan per process: {self.parallel} x {self.world}, {self.precision}, {self.batch_size} x "
                f"{self.seq_len} tokens, checkpointing {'on' if self.checkpointing else 'off'}; "
                f"{_count(self.trainable)} of {_count(self.trainable + self.frozen)} parameters train")
        return "\n".join([head] + [f"  {name:<12} {value / GIB:9.2f} GiB" for name, value in rows])


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def parameter_counts(config: LibraConfig, frozen_llm: bool) -> tuple[int, int, int]:
    """(trainable, frozen, parameters of the largest decoder layer), from a meta-device model."""
    from .model import LibraForCausalLM

    with torch.device("meta"):
        model = LibraForCausalLM(config)
    model.frozen_llm = frozen_llm
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    layer = max(sum(p.numel() for p in layer.parameters()) for layer in model.model.layers)
    return trainable, frozen, layer


def plan(config: LibraConfig, *, frozen_llm: bool, parallel: str, world: int, precision: str, batch_size: int,
         seq_len: int, checkpointing: bool, counts: tuple[int, int, int] | None = None) -> MemoryPlan:
    """The per-process plan (see the module docstring); `parallel` is none, ddp or fsdp,
    `precision` fp32 or bf16."""
    trainable, frozen, layer = counts or parameter_counts(config, frozen_llm)
    compute = 2 if precision == "bf16" else 4
    if parallel == "fsdp":
        parameters = (trainable * 4 + frozen * compute) // world + 2 * layer * compute
        gradients = trainable * 4 // world
        optimizer = trainable * 8 // world
    else:
        parameters = (trainable + frozen) * 4
        gradients = trainable * 4 * (2 if parallel == "ddp" else 1)
        optimizer = trainable * 8
    d, i = config.hidden_size, config.intermediate_size
    per_layer = (16 * d + 3 * i) * compute
    tokens = batch_size * seq_len
    layers = config.num_hidden_layers
    kept = layers * d * compute + per_layer if checkpointing else layers * per_layer
    logits = (config.text_vocab_size + config.num_codebooks * config.vision_vocab_size) * 4 * 2
    activations = tokens * (kept + logits)
    return MemoryPlan(parameters, gradients, optimizer, activations, trainable, frozen, layer, parallel, world,
                      precision, batch_size, seq_len, checkpointing)


def alternatives(p: MemoryPlan, config: LibraConfig, device_bytes: int) -> list[str]:
    """Options that would make `p` fit `device_bytes` (each alone), as command-line text."""
    counts = (p.trainable, p.frozen, p.layer)
    base = dataclasses.asdict(p)
    keep = {k: base[k] for k in ("parallel", "world", "precision", "batch_size", "seq_len", "checkpointing")}
    options = []

    def fits(**change) -> bool:
        q = plan(config, frozen_llm=False, counts=counts, **{**keep, **change})  # counts given: frozen_llm unused
        return q.total <= device_bytes * MARGIN

    for b in (p.batch_size // 2, p.batch_size // 4, 1):
        if 1 <= b < p.batch_size and fits(batch_size=b):
            options.append(f"--batch-size {b} with --grad-accum multiplied by {p.batch_size // b} (the same steps)")
            break
    if not p.checkpointing and fits(checkpointing=True):
        options.append("--gradient-checkpointing")
    if p.precision != "bf16" and fits(precision="bf16"):
        options.append("--precision bf16")
    sharding_fits = p.parallel != "fsdp" and p.world > 1 and fits(parallel="fsdp")
    if sharding_fits:
        options.append("--parallel fsdp (shards parameters, gradients and optimizer state)")
    for w in (2, 4, 8, 16, 32, 64, 128):
        if not sharding_fits and w > p.world and fits(parallel="fsdp", world=w):
            options.append(f"--parallel fsdp on {w} processes or more (torchrun --nnodes/--nproc-per-node, "
                           "docs/scale.md)")
            break
    return options


def check_fits(p: MemoryPlan, config: LibraConfig, device_bytes: int, device: str = "the device") -> None:
    """ValueError with the plan and the options that would fit when `p` needs more than
    90 % of `device_bytes`."""
    if p.total <= device_bytes * MARGIN:
        return
    options = alternatives(p, config, device_bytes)
    fix = ("; options that would fit: " + "; ".join(options)) if options else \
        "; no single option makes it fit: combine smaller batches, checkpointing, bf16 and more processes"
    raise DoesNotFit(
        f"this run needs about {p.total / GIB:.1f} GiB per process ({p.parameters / GIB:.1f} parameters, "
        f"{p.gradients / GIB:.1f} gradients, {p.optimizer / GIB:.1f} optimizer, {p.activations / GIB:.1f} "
        f"activations) but {device} has {device_bytes / GIB:.1f} GiB (90 % usable){fix}; pass --device-memory-gb "
        "to plan for another size")


class DoesNotFit(ValueError):
    """A run that would not fit its device (a user error: the options chose it)."""


def device_bytes(device: torch.device, override_gb: float | None) -> int | None:
    """Memory of one device: `override_gb`, else a CUDA device's total memory, else None
    (CPU runs share host memory with everything else: not planned)."""
    if override_gb is not None:
        return int(override_gb * GIB)
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return None


__all__ = ["MemoryPlan", "DoesNotFit", "plan", "parameter_counts", "alternatives", "check_fits", "device_bytes"]
