"""Modality routing and the low-rank expert linear.

Every norm, projection and FFN of Libra exists twice, once for text tokens and once for
vision tokens (patches, BOI and EOI); the official `cal_language_vision`
(libra/models/libra/modeling_libra.py) gathers each modality's tokens, runs its own module
and scatters the results back.
`Router` does the same with token indices computed once per forward and shared by all
layers, so no work is spent on the other modality's module.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

Fn = Callable[[torch.Tensor], torch.Tensor]


class Router:
    """Gather/scatter of the text and vision tokens of a (B, N) batch.

    `run_idle`: also run a modality's modules when the batch has none of its tokens (on zero
    rows), so every parameter gets a (zero) gradient in every step. Data-parallel training
    needs that: DDP without find_unused_parameters, and FSDP2, whose ranks must reduce the
    same gradients.

    `num_vision`: the number of vision tokens, when the caller knows it on the host (decoding
    steps); the indices are then computed without a host synchronisation."""

    def __init__(self, is_vision: torch.Tensor, run_idle: bool = False, num_vision: int | None = None):
        if is_vision.dtype != torch.bool or is_vision.ndim != 2:
            raise ValueError(f"is_vision must be a (B, N) bool tensor, got {tuple(is_vision.shape)} {is_vision.dtype}")
        self.is_vision = is_vision
        self.run_idle = run_idle
        self.shape = tuple(is_vision.shape)
        flat = is_vision.reshape(-1)
        if num_vision is None:
            # One host sync here instead of one per routed module.
            self.vision_index = flat.nonzero().squeeze(1)
            self.text_index = (~flat).nonzero().squeeze(1)
        else:
            # A stable sort puts the text tokens first, each group in order: nonzero's indices.
            order = torch.argsort(flat.to(torch.uint8), stable=True)
            self.text_index, self.vision_index = order[:flat.numel() - num_vision], order[flat.numel() - num_vision:]
        self.num_vision = int(self.vision_index.numel())
        self.num_text = int(self.text_index.numel())

    def runs_text(self) -> bool:
        """Whether the text modules run in this batch."""
        return self.num_text > 0 or self.run_idle

    def runs_vision(self) -> bool:
        return self.num_vision > 0 or self.run_idle

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, ...) -> (text rows (n_t, ...), vision rows (n_v, ...))."""
        flat = x.reshape(-1, *x.shape[2:])
        if self.num_vision == 0:
            return flat, flat[:0]
        if self.num_text == 0:
            return flat[:0], flat
        return flat.index_select(0, self.text_index), flat.index_select(0, self.vision_index)

    def merge(self, text: torch.Tensor | None, vision: torch.Tensor | None) -> torch.Tensor:
        """Inverse of `split`: scatter both groups back into (B, N, ...). With `run_idle` the
        empty group is scattered too (a no-op that keeps its modules in the autograd graph)."""
        if not self.run_idle:
            if vision is None or self.num_vision == 0:
                return text.reshape(*self.shape, *text.shape[1:])
            if text is None or self.num_text == 0:
                return vision.reshape(*self.shape, *vision.shape[1:])
        vision = vision.to(text.dtype)
        out = text.new_empty((self.shape[0] * self.shape[1], *text.shape[1:]))
        out = out.index_copy(0, self.text_index, text).index_copy(0, self.vision_index, vision)
        return out.reshape(*self.shape, *text.shape[1:])

    def __call__(self, x: torch.Tensor, text_fn: Fn, vision_fn: Fn) -> torch.Tensor:
        """text_fn on the text tokens of x (B, N, C), vision_fn on the vision tokens."""
        if not self.run_idle:
            if self.num_vision == 0:
                return text_fn(x)
            if self.num_text == 0:
                return vision_fn(x)
        text, vision = self.split(x)
        return self.merge(text_fn(text), vision_fn(vision))


class LowRankLinear(nn.Module):
    """y = B (A x), no bias: the official `LibraLinear` (libra/models/libra/modeling_libra.py).

    Expert projections use rank out_features // vision_down_ratio with both factors
    ~ N(0, 0.02); bridges use rank 8 with B = 0, so a fresh bridge changes nothing.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, *, zero_init_b: bool = False, std: float = 0.02):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.zero_init_b = zero_init_b
        self.std = std
        self.weight_A = nn.Parameter(torch.empty(rank, in_features))
        self.weight_B = nn.Parameter(torch.empty(out_features, rank))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight_A, mean=0.0, std=self.std)
        if self.zero_init_b:
            nn.init.zeros_(self.weight_B)
        else:
            nn.init.normal_(self.weight_B, mean=0.0, std=self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.weight_A), self.weight_B)

    def extra_repr(self) -> str:
        kind = ", bridge" if self.zero_init_b else ""
        return f"{self.in_features} -> {self.rank} -> {self.out_features}{kind}"


class RMSNorm(nn.Module):
    """LLaMA RMSNorm: normalise in fp32, cast back, then scale (HF LlamaRMSNorm order)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def reset_parameters(self) -> None:
        nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"


def swiglu(x: torch.Tensor, gate: Fn, up: Fn, down: Fn) -> torch.Tensor:
    """LLaMA FFN down(silu(gate(x)) * up(x)) with any linear-like modules (full or low-rank)."""
    return down(F.silu(gate(x)) * up(x))


def init_official_(module: nn.Module, std: float = 0.02) -> None:
    """Official `_init_weights` for one module: Linear/Embedding ~ N(0, std) (padding row
    zero), RMSNorm ones, LowRankLinear as its own reset (bridge B = 0)."""
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
        nn.init.normal_(module.weight, mean=0.0, std=std)
        if module.padding_idx is not None:
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()
    elif isinstance(module, (LowRankLinear, RMSNorm)):
        module.reset_parameters()


def exact_low_rank_factors(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) with B @ A == weight exactly, rank = out_features: A = weight, B = identity.

    Used to give a full-rank expert (vision_down_ratio = 1) the weights of a LLaMA linear.
    """
    out_features = weight.shape[0]
    return weight.clone(), torch.eye(out_features, dtype=weight.dtype, device=weight.device)


__all__ = ["Router", "LowRankLinear", "RMSNorm", "swiglu", "init_official_", "exact_low_rank_factors"]
