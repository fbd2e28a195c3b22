"""The LM sharded over processes (FSDP2) without any process ever holding all of it.

    model = build_sharded(config, kind, source, seed=0, frozen_llm=True, mesh=mesh,
                          param_dtype=torch.bfloat16, device=device)

1. The model is built on the meta device (no memory), the frozen parameters are given the
   compute dtype (bf16: they get no gradients and no optimizer state, so fp32 copies would
   only cost memory), and each decoder layer and then the root are `fully_shard`ed with a
   `MixedPrecisionPolicy` (parameters gathered in the compute dtype, gradients reduced in fp32).
   Trainable parameters stay fp32: they are the optimizer's master weights.
2. `model.to_empty` gives each process storage for its own shards (dim-0 slices, FSDP2's
   `torch.chunk` layout), and `materialize` fills them: rows read from the starting folder
   (`libra_lm.checkpoint.WeightSlices`: safetensors slices, or mapped torch files), and fresh
   parameters (a preset, HF LLaMA's vision parts) drawn exactly as one process draws them:
   the seeded RNG replayed module by module on one full-size CPU copy at a time, then sliced.
   Host memory per process is its share of the model plus one tensor.

Without a mesh (one process) the same steps give an ordinary model, so single-process and
sharded runs start from identical weights.
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Callable, Iterator

import torch
from torch import nn

from libra_tok.run import Dist, all_reduce_sum

from .checkpoint import WeightSlices
from .config import LibraConfig
from .model import LibraForCausalLM
from .routing import LowRankLinear, RMSNorm, init_official_

_INIT_TYPES = (nn.Linear, nn.Embedding, LowRankLinear, RMSNorm)  # what init_official_ initialises


def local_rows(param: torch.Tensor) -> tuple[int, int]:
    """(start, stop) of the dim-0 rows of a parameter this process holds: all of them for a
    plain tensor; FSDP2's Shard(0) layout (torch.chunk: ceil(n / world) rows per rank) for a DTensor."""
    n = param.shape[0] if param.dim() else 1
    if not hasattr(param, "device_mesh"):
        return 0, n
    (placement,) = param.placements
    if not placement.is_shard(0):
        raise ValueError(f"expected FSDP2's Shard(0) placement, got {placement}")
    mesh = param.device_mesh
    rank, world = mesh.get_local_rank(), mesh.size()
    chunk = -(-n // world)
    start = min(n, rank * chunk)
    return start, min(n, start + chunk)


def local_tensor(param: torch.Tensor) -> torch.Tensor:
    """The storage of this process's rows (a DTensor's local shard, or the tensor itself)."""
    return param.to_local() if hasattr(param, "to_local") else param


def frozen_to(model: nn.Module, dtype: torch.dtype) -> None:
    """Store the parameters that do not train in `dtype` (before sharding)."""
    for module in model.modules():
        for name, param in list(module._parameters.items()):
            if param is not None and not param.requires_grad and param.dtype != dtype:
                module._parameters[name] = nn.Parameter(param.detach().to(dtype), requires_grad=False)


def shard(model: nn.Module, mesh, param_dtype: torch.dtype, layers: list[nn.Module] | None = None) -> None:
    """FSDP2 per decoder layer (`layers`, default the LM's), then the root (embeddings, norms,
    heads): parameters gathered in `param_dtype`, gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32)
    for layer in model.model.layers if layers is None else layers:
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)


RowReader = Callable[[int, int], torch.Tensor]


def initial_tensors(config: LibraConfig, kind: str, source: WeightSlices | None) -> Iterator[tuple[str, RowReader]]:
    """(name, read(start, stop) -> those rows) for every parameter of a model of `config`, in
    parameter order, as one process builds it after `torch.manual_seed(seed)`: read from
    `source`, or drawn. The caller seeds the RNG first and must consume the items in order
    (fresh tensors are drawn when their item is reached). One full tensor exists at a time.

    kind "preset": `LibraForCausalLM(config)` draws every module at construction
    (`reset_parameters`) and again in `init_weights`; both passes are replayed. kind "llama":
    the folder's tensors, then the official init of the modules it lacks (vision), as
    `libra_lm.checkpoint.load_weights`. "ours" / "official": every tensor is read."""
    with torch.device("meta"):
        template = LibraForCausalLM(config)
    owners = [(name, m) for name, m in template.named_modules() if any(True for _ in m.parameters(recurse=False))]
    for name, module in owners:
        if not isinstance(module, _INIT_TYPES):
            raise TypeError(f"{name}: {type(module).__name__} has parameters but no known initialisation")
    fresh: set[str] = set()
    if kind == "preset":
        fresh = {name for name, _ in owners}
        for _, module in owners:  # construction's draws, discarded as init_weights redraws them
            copy.deepcopy(module).to_empty(device="cpu").reset_parameters()
    else:
        expected = {k: tuple(v.shape) for k, v in template.state_dict().items()}
        fresh_keys = set(source.check(expected, config))
        fresh = {name for name, m in owners if any(f"{name}.{p}" in fresh_keys for p in m._parameters)}
    for name, module in owners:
        if name in fresh:
            cpu = copy.deepcopy(module).to_empty(device="cpu")
            init_official_(cpu, config.initializer_range)
            for pname, tensor in cpu.named_parameters(recurse=False):
                drawn = tensor.detach()
                yield f"{name}.{pname}", (lambda a, b, t=drawn: t[a:b])
            del cpu
        else:
            for pname, _ in module.named_parameters(recurse=False):
                key = f"{name}.{pname}"
                yield key, (lambda a, b, k=key: source.read(k, a, b))


@torch.no_grad()
def materialize(model: LibraForCausalLM, kind: str, source: WeightSlices | None, seed: int,
                device: torch.device) -> None:
    """Storage for this process's shards on `device`, filled with the starting weights."""
    model.to_empty(device=device)
    params = dict(model.named_parameters())
    torch.manual_seed(seed)
    for name, read in initial_tensors(model.config, kind, source):
        param = params.pop(name)
        start, stop = local_rows(param)
        rows = read(start, stop) if param.dim() else read(None, None)
        local_tensor(param).copy_(rows.to(param.dtype))
    if params:
        raise RuntimeError(f"parameters left without data: {sorted(params)[:5]}")


def build_sharded(config: LibraConfig, kind: str, source: WeightSlices | None, *, seed: int, frozen_llm: bool,
                  mesh, param_dtype: torch.dtype, device: torch.device) -> LibraForCausalLM:
    """The model on the meta device, frozen parameters in `param_dtype`, sharded over `mesh`
    (None: one process, nothing sharded), then materialised shard by shard (module docstring)."""
    with torch.device("meta"):
        model = LibraForCausalLM(config)
    model.frozen_llm = frozen_llm
    frozen_to(model, param_dtype)
    if mesh is not None:
        shard(model, mesh, param_dtype)
    materialize(model, kind, source, seed, device)
    return model


def bits_sum(t: torch.Tensor) -> int:
    """The sum of a tensor's values' bit patterns as integers (exact and associative: any split
    of its rows gives the same total), of this process's rows of a DTensor."""
    local = local_tensor(t).detach().contiguous()
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[local.element_size()]
    return int(local.view(bits).to(torch.int64).sum())


def fingerprint_digest(entries: list[tuple[str, tuple[int, ...], torch.dtype, int]]) -> str:
    """sha256 of (name, shape, dtype, bits_sum) per tensor, in order."""
    digest = hashlib.sha256()
    for name, shape, dtype, total in entries:
        digest.update(f"{name}:{tuple(shape)}:{dtype}:{total}".encode())
    return digest.hexdigest()


def fingerprint(named: Iterator[tuple[str, torch.Tensor]], d: Dist) -> str:
    """A digest of (frozen) tensors that does not depend on how they are sharded: `bits_sum`
    per tensor, summed over the processes (libra_lm.export recomputes it tensor by tensor)."""
    named = list(named)
    sums = all_reduce_sum(torch.tensor([bits_sum(t) for _, t in named] or [0], dtype=torch.int64), d)
    return fingerprint_digest([(n, tuple(t.shape), t.dtype, s) for (n, t), s in zip(named, sums.tolist(),
                                                                                   strict=False)])


__all__ = ["build_sharded", "materialize", "initial_tensors", "shard", "frozen_to", "local_rows", "local_tensor",
           "fingerprint", "fingerprint_digest", "bits_sum"]
