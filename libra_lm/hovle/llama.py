"""The plain LLaMA decoder stack both HoVLE stacks are made of (the holistic embedding module
and the LLM): RMSNorm, RoPE, SwiGLU, causal attention, an optional KV cache.

The pieces are those of the Libra model (libra_lm.routing: RMSNorm, swiglu; libra_lm.model:
rope_cos_sin, apply_rope, KVCache), without the routed expert and the bridge; parameter names
are HF LLaMA's (`layers.0.self_attn.q_proj.weight`, ...), so an HF LLaMA or the text half of a
Libra checkpoint loads key for key.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..model import KVCache, apply_rope, rope_cos_sin
from ..routing import RMSNorm, swiglu
from .config import HoVLEConfig


@dataclass
class StackInput:
    """What every layer of one forward pass needs (shared by both stacks)."""

    cos: torch.Tensor  # (B, 1, N, d)
    sin: torch.Tensor
    mask: torch.Tensor | None  # (B, 1, N, Nk) bool, True = attend; None = plain causal without cache


def attention_mask(key_mask: torch.Tensor | None, segment_ids: torch.Tensor | None, n: int, past: int,
                   device: torch.device) -> torch.Tensor | None:
    """(B, 1, n, past + n) bool: causal in absolute positions, real keys only, within a segment;
    None when plain causal attention over n == Nk keys says it all (SDPA's is_causal path)."""
    if key_mask is None and segment_ids is None and past == 0:
        return None
    nk = past + n
    causal = torch.arange(nk, device=device)[None, :] <= (past + torch.arange(n, device=device))[:, None]
    mask = causal[None, None]
    if key_mask is not None:
        mask = mask & key_mask[:, None, None, :].bool()
    if segment_ids is not None:
        mask = mask & (segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
    return mask


class LlamaAttention(nn.Module):
    def __init__(self, config: HoVLEConfig, layer_idx: int):
        super().__init__()
        d = config.hidden_size
        self.layer_idx = layer_idx
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, d, bias=False)
        self.v_proj = nn.Linear(d, d, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, h: torch.Tensor, ctx: StackInput, cache: KVCache | None) -> torch.Tensor:
        b, n, _ = h.shape
        q, k, v = (proj(h).view(b, n, self.num_heads, self.head_dim).transpose(1, 2)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, [k, v])
        if ctx.mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask)
            # A query with no key at all (a padding row) gets NaN from the softmax: make it 0.
            out = out.masked_fill(~ctx.mask.any(-1, keepdim=True), 0.0)
        return self.o_proj(out.transpose(1, 2).reshape(b, n, -1))


class LlamaMLP(nn.Module):
    def __init__(self, config: HoVLEConfig):
        super().__init__()
        d, i = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=False)
        self.up_proj = nn.Linear(d, i, bias=False)
        self.down_proj = nn.Linear(i, d, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return swiglu(x, self.gate_proj, self.up_proj, self.down_proj)


class LlamaDecoderLayer(nn.Module):
    def __init__(self, config: HoVLEConfig, layer_idx: int):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx)
        self.mlp = LlamaMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x: torch.Tensor, ctx: StackInput, cache: KVCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class DecoderStack(nn.Module):
    """`num_layers` LLaMA decoder layers (no embedding, no final norm: the owner adds those)."""

    def __init__(self, config: HoVLEConfig, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(num_layers))

    def forward(self, x: torch.Tensor, ctx: StackInput, cache: KVCache | None = None,
                checkpointing: bool = False) -> torch.Tensor:
        return run_layers(self.layers, x, ctx, cache, checkpointing)


def run_layers(layers: nn.ModuleList, x: torch.Tensor, ctx: StackInput, cache: KVCache | None = None,
               checkpointing: bool = False) -> torch.Tensor:
    """x through `layers` in order; `checkpointing` recomputes each layer in the backward pass."""
    for layer in layers:
        if checkpointing:
            x = torch.utils.checkpoint.checkpoint(layer, x, ctx, cache, use_reentrant=False)
        else:
            x = layer(x, ctx, cache)
    return x


def stack_input(config: HoVLEConfig, position_ids: torch.Tensor, key_mask: torch.Tensor | None,
                segment_ids: torch.Tensor | None, past: int, dtype: torch.dtype) -> StackInput:
    """RoPE tables and the attention mask of one pass, shared by both stacks."""
    n = position_ids.shape[1]
    cos, sin = rope_cos_sin(position_ids, config.head_dim, config.rope_theta, dtype)
    return StackInput(cos, sin, attention_mask(key_mask, segment_ids, n, past, position_ids.device))


__all__ = ["LlamaAttention", "LlamaMLP", "LlamaDecoderLayer", "DecoderStack", "StackInput", "stack_input", "run_layers",
           "attention_mask"]
