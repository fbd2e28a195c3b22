"""Bridged attention with FlexAttention (torch.nn.attention.flex_attention), exact.

The query partition, written for flex: the key/value sequence is the concatenation of the two
views, [view seen by text queries | view seen by vision queries], each padded to a multiple of
the flex block, and the mask lets a query see only the half of its own modality (causal by
original position, same segment). One softmax per query over exactly the keys the contract
gives it, so the result is exact; query blocks of one modality skip the other half entirely,
so the work stays close to one causal attention. The block mask depends only on `is_vision`
and `segment_ids`, so it is built once per batch and reused by every layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .layout_cache import LastLayout

FLEX_BLOCK = 128  # flex's default block size; views are padded to it so halves never share a block

_flex_compiled = None
_masks = LastLayout()


def _flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


def _compiled_flex():
    # Flex is only fast (and only O(N) in memory) when compiled; eager flex is a dense fallback.
    global _flex_compiled
    if _flex_compiled is None:
        _flex_compiled = torch.compile(_flex_attention(), dynamic=False)
    return _flex_compiled


def flex_unsupported_reason(q: Tensor, needs_grad: bool | None = None) -> str | None:
    try:
        _flex_attention()
    except ImportError as e:
        return f"FlexAttention is not available in torch {torch.__version__}: {e}"
    if needs_grad is None:
        needs_grad = torch.is_grad_enabled() and q.requires_grad
    if q.device.type not in ("cuda", "cpu"):
        return f"FlexAttention runs on CUDA (and CPU for inference), got device {q.device}"
    if q.device.type == "cpu" and needs_grad:
        return f"FlexAttention has no backward on CPU (torch {torch.__version__})"
    d = q.shape[-1]
    if d < 16 or d & (d - 1):
        return f"FlexAttention here takes power-of-two head dims >= 16, got {d}"
    return None


def _padded_len(n: int) -> int:
    return -(-n // FLEX_BLOCK) * FLEX_BLOCK


def flex_block_mask(is_vision: Tensor, segment_ids: Tensor | None = None):
    """Block mask over (N queries) x (2 * padded N keys) for `flex_bridged_attention`."""
    from torch.nn.attention.flex_attention import create_block_mask

    b, n = is_vision.shape
    n_pad = _padded_len(n)
    # Indices the kernels may evaluate stay inside these padded copies.
    vis = torch.zeros(b, n_pad, dtype=torch.bool, device=is_vision.device)
    vis[:, :n] = is_vision
    seg = torch.zeros(b, n_pad, dtype=torch.int64, device=is_vision.device)
    if segment_ids is not None:
        seg[:, :n] = segment_ids

    def mask_mod(bi, hi, qi, kv):
        second_half = kv >= n_pad  # the view of vision queries
        j = torch.where(second_half, kv - n_pad, kv)
        return (second_half == vis[bi, qi]) & (j <= qi) & (seg[bi, qi] == seg[bi, j])

    # Compiled mask construction keeps it block-wise on CUDA instead of materialising N x 2N.
    return create_block_mask(mask_mod, b, None, n, 2 * n_pad, device=is_vision.device,
                             BLOCK_SIZE=FLEX_BLOCK, _compile=is_vision.device.type == "cuda")


def _cached_block_mask(is_vision: Tensor, segment_ids: Tensor | None):
    """`flex_block_mask`, built once per batch (libra_lm.kernels.layout_cache)."""
    return _masks.get(lambda: flex_block_mask(is_vision, segment_ids), is_vision, segment_ids)


def _views(k: Tensor, k_x: Tensor, is_vision: Tensor, n_pad: int) -> Tensor:
    """[keys seen by text queries | keys seen by vision queries], each padded to n_pad rows."""
    vis = is_vision[:, None, :, None]
    pad = k.new_zeros(k.shape[0], k.shape[1], n_pad - k.shape[2], k.shape[3])
    text_view = torch.where(vis, k_x, k)
    vision_view = torch.where(vis, k, k_x)
    return torch.cat([text_view, pad, vision_view, pad], dim=2)


def flex_bridged_attention(q, k, v, k_x, v_x, is_vision, segment_ids=None, *, block_mask=None,
                           compiled: bool = True) -> Tensor:
    """Bridged attention (contract of libra_lm.attention.bridged_attention) with FlexAttention.
    `block_mask` from `flex_block_mask` skips the per-batch cache; `compiled=False` runs eager
    flex (a dense fallback, for tests)."""
    from .ops import check_inputs

    if is_vision.dtype != torch.bool:
        is_vision = is_vision.bool()
    check_inputs(q, k, v, k_x, v_x, is_vision, segment_ids)
    needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, k_x, v_x))
    reason = flex_unsupported_reason(q, needs_grad=needs_grad)
    if reason is not None:
        raise ValueError(f"{reason}; use the 'sdpa' or 'eager' backend")
    if not needs_grad:
        # Flex refuses CPU inputs that require grad even under no_grad.
        q, k, v, k_x, v_x = (t.detach() for t in (q, k, v, k_x, v_x))
    n_pad = _padded_len(q.shape[2])
    if block_mask is None:
        block_mask = _cached_block_mask(is_vision, segment_ids)
    keys = _views(k, k_x, is_vision, n_pad)
    values = _views(v, v_x, is_vision, n_pad)
    flex = _compiled_flex() if compiled else _flex_attention()
    return flex(q, keys, values, block_mask=block_mask, scale=q.shape[-1] ** -0.5)
