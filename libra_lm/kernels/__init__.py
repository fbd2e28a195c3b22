"""Fast bridged attention (Libra's cross-modal bridge) without the N x N score matrix.

Contract (libra_lm/attention.py, docs/attention.md): q, k, v, k_x, v_x (B, H, N, d); is_vision (B, N) bool; optional
segment_ids (B, N). Query i sees key j <= i (same segment), with k[j], v[j] when i and j have
the same modality, else k_x[j], v_x[j]; one softmax over all keys, scale 1/sqrt(d).

- `cuda_bridged_attention`: fused CUDA kernels (forward and backward, bf16/fp16, d in
  {64, 128}, sm_80+ including the 99 KiB-shared-memory parts), a torch.library custom op built
  just in time on first use (see build.py); the partition plan is built once per batch.
- `flex_bridged_attention`: FlexAttention with a block mask built once per batch.
- `cuda_status(q)`, `flex_status(q)`: whether a backend can run these inputs here, and why not.
- `emulator`: the fused kernels' CUDA sources run on the CPU, for the tests (see README.md).

Importing this package builds and loads nothing; `libra_lm.attention` imports these lazily.
"""

from __future__ import annotations

import os

from torch import Tensor

__all__ = [
    "cuda_bridged_attention",
    "cuda_bridged_attention_with_lse",
    "cuda_status",
    "flex_bridged_attention",
    "flex_block_mask",
    "flex_status",
]

DISABLE_ENV = "LIBRA_DISABLE_CUDA_KERNELS"


def cuda_status(q: Tensor) -> tuple[bool, str]:
    """(True, "") when the fused kernel can run on q's device, dtype and head dim, a tile
    configuration fits the device's opt-in shared memory per block, and the extension builds
    (the first call may compile it, about a minute); else (False, reason)."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return False, f"the fused kernel is disabled by {DISABLE_ENV}"
    from .ops import kernel_unsupported_reason

    reason = kernel_unsupported_reason(q)
    if reason is not None:
        return False, reason
    from .build import load_extension

    try:
        load_extension()
    except RuntimeError as e:
        return False, str(e)
    return True, ""


def cuda_bridged_attention(q, k, v, k_x, v_x, is_vision, segment_ids=None) -> Tensor:
    """Bridged attention with the fused CUDA kernels -> out (B, H, N, d). Differentiable;
    works under torch.compile and activation checkpointing. Raises ValueError for inputs
    `cuda_status` rejects. (On CPU tensors the same op runs the tile-by-tile reference.)"""
    return cuda_bridged_attention_with_lse(q, k, v, k_x, v_x, is_vision, segment_ids)[0]


def cuda_bridged_attention_with_lse(q, k, v, k_x, v_x, is_vision, segment_ids=None) -> tuple[Tensor, Tensor]:
    """As `cuda_bridged_attention`, also returning the log-sum-exp (B, H, N) fp32 (natural
    log, differentiable)."""
    from .ops import bridged_attention_with_lse

    return bridged_attention_with_lse(q, k, v, k_x, v_x, is_vision, segment_ids)


def flex_status(q: Tensor) -> tuple[bool, str]:
    """(True, "") when FlexAttention can run these inputs here (gradients needed when grad
    mode is on and q requires grad); else (False, reason)."""
    from .flex import flex_unsupported_reason

    reason = flex_unsupported_reason(q)
    return (False, reason) if reason is not None else (True, "")


def flex_bridged_attention(q, k, v, k_x, v_x, is_vision, segment_ids=None, **kwargs) -> Tensor:
    """Bridged attention with FlexAttention -> out (B, H, N, d). Keyword arguments:
    `block_mask` (from `flex_block_mask`) and `compiled` (default True)."""
    from .flex import flex_bridged_attention as run

    return run(q, k, v, k_x, v_x, is_vision, segment_ids, **kwargs)


def flex_block_mask(is_vision: Tensor, segment_ids: Tensor | None = None):
    """The block mask `flex_bridged_attention` builds once per batch (to pass explicitly, e.g.
    inside a compiled model)."""
    from .flex import flex_block_mask as build

    return build(is_vision, segment_ids)
