"""Bridged attention: one causal softmax whose keys/values depend on the modality pair.

For query i and key j <= i (same segment, if segments are given) the key is k[j] and the
value v[j] when is_vision[i] == is_vision[j], else the bridged k_x[j], v_x[j]; scale
1/sqrt(d) (paper Eq. 4-5; official `attn_with_bridge` in libra/models/libra/modeling_libra.py,
docs/official-formats.md#lm-behaviour). RoPE is applied by
the caller: the official adds the bridge delta before RoPE, so k_x = rope(k_raw + dk).

Backends (all exact):
  eager  the official two-view math; materialises both score matrices, fp32 softmax. The
         oracle of every test, never picked by `auto`.
  sdpa   query partition: vision queries attend over one key/value view (k at vision keys,
         k_x at text keys), text queries over the other, each through
         F.scaled_dot_product_attention with a boolean mask built from the queries'
         original positions. Work = one causal attention. The CPU default.
  flex   FlexAttention (libra_lm.kernels); cuda: the fused CUDA kernel (libra_lm.kernels).
`auto` picks cuda, then flex, then sdpa on a GPU (each kernel's status says whether it can
run the given inputs, gradients included; a kernel that still fails when run is dropped and the
next one runs), sdpa elsewhere: it never raises where another backend can run.

KV-cache decoding: q may have fewer positions than the keys; the queries are then the last
Nq positions of the key sequence (is_vision and segment_ids describe all Nk keys).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch
import torch.nn.functional as F

logger = logging.getLogger(__name__)

BACKENDS = ("auto", "eager", "sdpa", "flex", "cuda")
KERNEL_BACKENDS = ("cuda", "flex")



class BackendUnavailableError(ValueError):
    """An attention backend that was asked for explicitly cannot run here (no GPU, no
    compiler, an unsupported head size ...); the message says why and what runs instead."""


_kernels_cache: dict[str, Any] | None = None
_kernels_error: str | None = None
_logged: set[str] = set()
# Kernel backends that raised when `auto` ran them (backend -> reason): auto skips them from then on.
_failed: dict[str, str] = {}


def _log_once(message: str) -> None:
    if message not in _logged:
        _logged.add(message)
        logger.warning(message)


def _load_kernels() -> tuple[dict[str, Any] | None, str | None]:
    """Import the optional kernel backends once; (functions, None) or (None, reason)."""
    global _kernels_cache, _kernels_error
    if _kernels_cache is None and _kernels_error is None:
        try:
            from libra_lm.kernels import cuda_bridged_attention, cuda_status, flex_bridged_attention, flex_status
        except Exception as exc:  # a missing module, a failed build, a missing CUDA library
            _kernels_error = f"libra_lm.kernels could not be imported ({type(exc).__name__}: {exc})"
        else:
            _kernels_cache = {
                "cuda": (cuda_bridged_attention, cuda_status),
                "flex": (flex_bridged_attention, flex_status),
            }
    return _kernels_cache, _kernels_error


def backend_status(name: str, q: torch.Tensor) -> tuple[bool, str]:
    """(usable, reason) of backend `name` for queries like `q` (device, dtype, head dim, grads)."""
    if name not in BACKENDS or name == "auto":
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS[1:]}")
    if name in ("eager", "sdpa"):
        return True, ""
    kernels, error = _load_kernels()
    if kernels is None:
        return False, error or "unavailable"
    try:
        ok, reason = kernels[name][1](q)
    except Exception as exc:
        return False, f"{name}_status failed ({type(exc).__name__}: {exc})"
    return bool(ok), str(reason)


def select_backend(backend: str, q: torch.Tensor, num_keys: int) -> str:
    """The backend that will run: `backend` itself (checked) or auto's choice."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    decoding = q.shape[2] != num_keys
    if backend == "auto":
        # The kernels take Nq == Nk only; CPU runs are fastest with sdpa (bench/attention.py, BENCHMARKS.md).
        if q.device.type != "cuda" or decoding:
            return "sdpa"
        for name in KERNEL_BACKENDS:
            ok, reason = (False, f"it failed: {_failed[name]}") if name in _failed else backend_status(name, q)
            if ok:
                return name
            _log_once(f"bridged_attention: backend {name!r} unavailable ({reason}); falling back")
        return "sdpa"
    if backend in KERNEL_BACKENDS:
        if decoding:
            raise ValueError(
                f"attention backend {backend!r} needs as many queries as keys (got {q.shape[2]} queries, "
                f"{num_keys} keys); KV-cache decoding runs with 'sdpa' or 'eager'"
            )
        ok, reason = backend_status(backend, q)
        if not ok:
            raise BackendUnavailableError(f"attention backend {backend!r} cannot run these inputs: {reason}; "
                                          "'auto' picks one that can")
    return backend


def _check_inputs(q, k, v, k_x, v_x, is_vision, segment_ids, key_padding_mask) -> None:
    if q.ndim != 4:
        raise ValueError(f"q must be (B, H, N, d), got shape {tuple(q.shape)}")
    b, h, nq, d = q.shape
    for name, t in (("k", k), ("v", v), ("k_x", k_x), ("v_x", v_x)):
        if t.ndim != 4 or t.shape[:2] != (b, h) or t.shape[3] != d or t.shape[2] != k.shape[2]:
            raise ValueError(
                f"{name} must be (B, H, Nk, d) = ({b}, {h}, {k.shape[2]}, {d}) like k, got {tuple(t.shape)}"
            )
    nk = k.shape[2]
    if nq > nk:
        raise ValueError(f"q has {nq} positions but the keys only {nk}; queries must be the last positions of the keys")
    if is_vision.dtype != torch.bool or tuple(is_vision.shape) != (b, nk):
        raise ValueError(f"is_vision must be a bool tensor of shape (B, Nk) = ({b}, {nk}), got "
                         f"{is_vision.dtype} {tuple(is_vision.shape)}")
    if segment_ids is not None and tuple(segment_ids.shape) != (b, nk):
        raise ValueError(f"segment_ids must have shape (B, Nk) = ({b}, {nk}), got {tuple(segment_ids.shape)}")
    if key_padding_mask is not None and tuple(key_padding_mask.shape) != (b, nk):
        raise ValueError(f"key_padding_mask must have shape (B, Nk) = ({b}, {nk}), got {tuple(key_padding_mask.shape)}")


def padding_to_segments(key_padding_mask: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """Fold key padding into segment ids: padding tokens get their own segment, so real
    queries never see them and padding queries still see themselves (no empty softmax row)."""
    keep = key_padding_mask.bool()
    if segment_ids is None:
        return torch.where(keep, 0, -1).to(torch.long)
    segment_ids = segment_ids.long()
    pad_segment = segment_ids.min() - 1
    return torch.where(keep, segment_ids, pad_segment)


def allowed_mask(num_queries: int, segment_ids: torch.Tensor | None, num_keys: int, device) -> torch.Tensor:
    """(B or 1, 1, Nq, Nk) bool: causal over original positions (queries = last Nq keys) and same segment."""
    offset = num_keys - num_queries
    qpos = torch.arange(offset, num_keys, device=device)
    kpos = torch.arange(num_keys, device=device)
    allowed = (kpos[None, :] <= qpos[:, None])[None, None]
    if segment_ids is not None:
        same = segment_ids[:, offset:, None] == segment_ids[:, None, :]
        allowed = allowed & same[:, None]
    return allowed


def _views(k, v, k_x, v_x, is_vision, for_vision_queries: bool):
    """Keys/values as seen by queries of one modality: own-modality keys plain, others bridged."""
    key_is_vision = is_vision[:, None, :, None]
    if for_vision_queries:
        return torch.where(key_is_vision, k, k_x), torch.where(key_is_vision, v, v_x)
    return torch.where(key_is_vision, k_x, k), torch.where(key_is_vision, v_x, v)


def eager_bridged_probs(q, k, k_x, is_vision, segment_ids=None):
    """The attention probabilities of the official math, (B, H, Nq, Nk) fp32: both score
    matrices, rows picked by query modality, fp32 softmax."""
    nq, nk, d = q.shape[2], k.shape[2], q.shape[3]
    q_is_vision = is_vision[:, nk - nq:][:, None, :, None]
    key_is_vision = is_vision[:, None, :, None]
    k_vis, k_lang = torch.where(key_is_vision, k, k_x), torch.where(key_is_vision, k_x, k)  # as _views
    scores_vis = torch.matmul(q, k_vis.transpose(2, 3)) / math.sqrt(d)
    scores_lang = torch.matmul(q, k_lang.transpose(2, 3)) / math.sqrt(d)
    scores = torch.where(q_is_vision, scores_vis, scores_lang).float()
    scores = scores.masked_fill(~allowed_mask(nq, segment_ids, nk, q.device), float("-inf"))
    return torch.softmax(scores, dim=-1)


def eager_bridged_attention(q, k, v, k_x, v_x, is_vision, segment_ids=None):
    """Official math: `eager_bridged_probs` times each query modality's value view."""
    nq, nk = q.shape[2], k.shape[2]
    q_is_vision = is_vision[:, nk - nq:][:, None, :, None]
    probs = eager_bridged_probs(q, k, k_x, is_vision, segment_ids).to(q.dtype)
    key_is_vision = is_vision[:, None, :, None]
    v_vis, v_lang = torch.where(key_is_vision, v, v_x), torch.where(key_is_vision, v_x, v)  # as _views
    return torch.where(q_is_vision, torch.matmul(probs, v_vis), torch.matmul(probs, v_lang))


def sdpa_plan(is_vision: torch.Tensor, segment_ids: torch.Tensor | None, num_queries: int,
              query_counts: tuple[int, int] | None = None) -> dict[str, Any]:
    """Index and mask tensors of the query partition; they depend only on the layout, so
    one plan serves every layer of a forward pass. `query_counts`: (most vision queries in a
    row, most text queries in a row) when the caller knows them; otherwise they are read
    from the device (one host synchronisation)."""
    b, nk = is_vision.shape
    nq, offset, device = num_queries, nk - num_queries, is_vision.device
    q_is_vision = is_vision[:, offset:]
    if query_counts is None:
        n_vision = q_is_vision.sum(1)
        max_vision, max_text = (int(x) for x in torch.stack([n_vision.max(), (nq - n_vision).max()]).tolist())
    else:
        max_vision, max_text = query_counts
    plan: dict[str, Any] = {"q_is_vision": q_is_vision}
    if max_vision == 0 or max_text == 0:
        # Every query has the same modality: a single view, plain masked attention.
        plan["single"] = max_vision > 0
        plain = segment_ids is None and (nq == nk or nq == 1)
        plan["mask"] = None if plain else allowed_mask(nq, segment_ids, nk, device)
        return plan
    kpos = torch.arange(nk, device=device)
    parts = {}
    for vision_queries, count in ((True, max_vision), (False, max_text)):
        # This modality's queries first, in original order; rows past a sequence's own
        # count belong to the other modality and are computed but never read.
        order = torch.argsort((q_is_vision != vision_queries).to(torch.int32), dim=1, stable=True)[:, :count]
        qpos = order + offset
        mask = kpos[None, None, :] <= qpos[:, :, None]
        if segment_ids is not None:
            mask = mask & (segment_ids.gather(1, qpos)[:, :, None] == segment_ids[:, None, :])
        parts[vision_queries] = (order, mask[:, None])
    plan["single"] = None
    plan["parts"] = parts
    # Back to original order: each query's rank within its modality indexes its partition.
    plan["rank_vision"] = (q_is_vision.long().cumsum(1) - 1).clamp(min=0)
    plan["rank_text"] = ((~q_is_vision).long().cumsum(1) - 1).clamp(min=0)
    return plan


def sdpa_bridged_attention(q, k, v, k_x, v_x, is_vision, segment_ids=None, plan=None):
    """Query partition over F.scaled_dot_product_attention (exact; see module docstring)."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    plan = plan if plan is not None else sdpa_plan(is_vision, segment_ids, nq)
    if plan["single"] is not None:
        kk, vv = _views(k, v, k_x, v_x, is_vision, for_vision_queries=plan["single"])
        if plan["mask"] is None:
            return F.scaled_dot_product_attention(q, kk, vv, is_causal=nq == nk and nq > 1)
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=plan["mask"])
    outs = {}
    for vision_queries, (order, mask) in plan["parts"].items():
        qm = q.gather(2, order[:, None, :, None].expand(b, h, order.shape[1], d))
        kk, vv = _views(k, v, k_x, v_x, is_vision, vision_queries)
        outs[vision_queries] = F.scaled_dot_product_attention(qm, kk, vv, attn_mask=mask)
    out_vision = outs[True].gather(2, plan["rank_vision"][:, None, :, None].expand(b, h, nq, d))
    out_text = outs[False].gather(2, plan["rank_text"][:, None, :, None].expand(b, h, nq, d))
    return torch.where(plan["q_is_vision"][:, None, :, None], out_vision, out_text)


def bridged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    k_x: torch.Tensor,
    v_x: torch.Tensor,
    is_vision: torch.Tensor,
    *,
    segment_ids: torch.Tensor | None = None,
    backend: str = "auto",
    key_padding_mask: torch.Tensor | None = None,
    layout_cache: dict | None = None,
) -> torch.Tensor:
    """Causal attention with the cross-modal bridge (contract in the module docstring).

    q (B, H, Nq, d); k, v, k_x, v_x (B, H, Nk, d) with Nq == Nk, or Nq < Nk for KV-cache
    decoding (queries = the last Nq keys); is_vision (B, Nk) bool; segment_ids (B, Nk)
    ints (packed sequences: keys of other segments are invisible); key_padding_mask
    (B, Nk) bool, True for real tokens (left padding). Returns (B, H, Nq, d).

    layout_cache: a dict shared by calls that have the same is_vision, segment_ids,
    key_padding_mask and sizes (the layers of one forward pass): what depends only on the
    layout (segments with padding folded in, sdpa's partition) is then computed once. A
    caller that knows the query layout may seed it with "query_counts": (most vision queries
    in a row, most text queries in a row), which spares sdpa's plan a host synchronisation.
    """
    _check_inputs(q, k, v, k_x, v_x, is_vision, segment_ids, key_padding_mask)
    cache = layout_cache if layout_cache is not None else {}
    if key_padding_mask is not None:
        if "segments" not in cache:
            cache["segments"] = padding_to_segments(key_padding_mask, segment_ids)
        segment_ids = cache["segments"]
    key = ("backend", backend)
    if key not in cache:
        cache[key] = select_backend(backend, q, k.shape[2])
    name = cache[key]
    if name == "eager":
        return eager_bridged_attention(q, k, v, k_x, v_x, is_vision, segment_ids)
    if name == "sdpa":
        if "sdpa" not in cache:
            cache["sdpa"] = sdpa_plan(is_vision, segment_ids, q.shape[2], cache.get("query_counts"))
        return sdpa_bridged_attention(q, k, v, k_x, v_x, is_vision, segment_ids, plan=cache["sdpa"])
    kernels, _ = _load_kernels()
    try:
        return kernels[name][0](q, k, v, k_x, v_x, is_vision, segment_ids=segment_ids)
    except (RuntimeError, ValueError) as exc:
        # `auto` never fails where another backend can run: a kernel that passed its status
        # check but fails here (a launch the device refuses, a compiler error) is dropped for
        # the rest of the process and the next backend runs. Out of memory is not the kernel's.
        if backend != "auto" or isinstance(exc, torch.OutOfMemoryError):
            raise
        _failed[name] = f"{type(exc).__name__}: {exc}"
        cache[key] = select_backend(backend, q, k.shape[2])
        return bridged_attention(q, k, v, k_x, v_x, is_vision, segment_ids=segment_ids, backend=backend,
                                 layout_cache=cache)


__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "bridged_attention",
    "eager_bridged_attention",
    "eager_bridged_probs",
    "sdpa_bridged_attention",
    "sdpa_plan",
    "select_backend",
    "backend_status",
    "allowed_mask",
    "padding_to_segments",
]
