"""Bridged attention as torch.library custom ops: `libra::bridged_attention_fwd` returns
(out, lse), `libra::bridged_attention_bwd` the five input gradients. Both take the query
partition plan (partition.py) as tensors: it is built once per batch (`cached_plan`) for
every layer, and the backward gets the forward's. CUDA runs the fused kernels of csrc/ with
the tile configuration that fits the device's shared memory (tiles.py); every other device
runs the tile-by-tile reference (reference.py), which is the same algorithm. Fake
implementations and registered autograd make the op work under torch.compile and activation
checkpointing.
"""

import math
from contextlib import contextmanager
from typing import Optional

import torch
from torch import Tensor

from . import reference, tiles
from .partition import Plan, cached_plan

KERNEL_DTYPES = (torch.bfloat16, torch.float16)
KERNEL_HEAD_DIMS = tiles.HEAD_DIMS
# Opt-in shared memory per block by compute capability, for a torch without
# `shared_memory_per_block_optin` (CUDA Programming Guide, "Technical Specifications").
SMEM_OPTIN_BY_CC = {(8, 0): 163 * 1024, (8, 6): 99 * 1024, (8, 7): 163 * 1024, (8, 9): 99 * 1024,
                    (9, 0): 227 * 1024, (10, 0): 227 * 1024, (12, 0): 99 * 1024}

_poison = False
_forced_variant: int | None = None


@contextmanager
def poison_outputs():
    """Inside this context the CUDA path fills its output buffers with NaN before the kernels
    run, so a test can tell an element the kernels never wrote."""
    global _poison
    previous, _poison = _poison, True
    try:
        yield
    finally:
        _poison = previous


@contextmanager
def use_variant(variant: int):
    """Inside this context the CUDA path runs tile configuration `variant` (tiles.py) instead
    of the one chosen for the device, so a large GPU can test the small one too."""
    global _forced_variant
    previous, _forced_variant = _forced_variant, variant
    try:
        yield
    finally:
        _forced_variant = previous


def _new_buffer(shape, dtype, device) -> Tensor:
    if _poison:
        return torch.full(shape, math.nan, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def check_inputs(q, k, v, k_x, v_x, is_vision, segment_ids) -> None:
    """Shapes and dtypes of the bridged-attention contract (`libra_lm.attention.bridged_attention`)."""
    if q.dim() != 4:
        raise ValueError(f"q must be (B, H, N, d), got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v), ("k_x", k_x), ("v_x", v_x)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape {tuple(q.shape)}, got {tuple(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must be {q.dtype} on {q.device} like q, got {t.dtype} on {t.device}")
    b, _, n, _ = q.shape
    if is_vision.shape != (b, n) or is_vision.dtype != torch.bool:
        raise ValueError(
            f"is_vision must be a bool tensor of shape {(b, n)}, got {is_vision.dtype} {tuple(is_vision.shape)}"
        )
    if segment_ids is not None and (segment_ids.shape != (b, n) or segment_ids.dtype.is_floating_point):
        raise ValueError(
            f"segment_ids must be an integer tensor of shape {(b, n)}, got {segment_ids.dtype} "
            f"{tuple(segment_ids.shape)}"
        )


def _plan(perm, tiles_, n_text, segment, tile_segment, key_segment) -> Plan:
    return Plan(perm=perm, tiles=tiles_, n_text=n_text, segment=segment, block_m=tiles.PLAN_BLOCK_M,
                tile_segment=tile_segment, key_segment=key_segment)


@torch.library.custom_op("libra::bridged_attention_fwd", mutates_args=())
def bridged_attention_fwd(
    q: Tensor, k: Tensor, v: Tensor, k_x: Tensor, v_x: Tensor, is_vision: Tensor,
    perm: Tensor, tiles_: Tensor, n_text: Tensor, segment: Optional[Tensor], tile_segment: Optional[Tensor],
    key_segment: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """-> out (B, H, N, d) in q's dtype and lse (B, H, N) (fp32; fp64 for fp64 inputs). perm ..
    key_segment: the plan (`Plan.tensors()`, block_m = tiles.PLAN_BLOCK_M)."""
    plan = _plan(perm, tiles_, n_text, segment, tile_segment, key_segment)
    return reference.tiled_forward(q, k, v, k_x, v_x, is_vision, plan=plan)


@torch.library.custom_op("libra::bridged_attention_bwd", mutates_args=())
def bridged_attention_bwd(
    grad_out: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_x: Tensor,
    v_x: Tensor,
    is_vision: Tensor,
    perm: Tensor,
    tiles_: Tensor,
    n_text: Tensor,
    segment: Optional[Tensor],
    tile_segment: Optional[Tensor],
    key_segment: Optional[Tensor],
    out: Tensor,
    lse: Tensor,
    grad_lse: Optional[Tensor],
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> dq, dk, dv, dk_x, dv_x."""
    plan = _plan(perm, tiles_, n_text, segment, tile_segment, key_segment)
    return reference.tiled_backward(grad_out, q, k, v, k_x, v_x, is_vision, None, out, lse, grad_lse, plan=plan)


@bridged_attention_fwd.register_fake
def _fwd_fake(q, k, v, k_x, v_x, is_vision, *plan):
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=reference.lse_dtype(q.dtype))


@bridged_attention_bwd.register_fake
def _bwd_fake(grad_out, q, k, v, k_x, v_x, is_vision, *rest):
    return tuple(q.new_empty(q.shape) for _ in range(5))


# ----------------------------------------------------------------------------- CUDA

def device_smem_optin(device) -> int:
    """The device's opt-in shared memory per block in bytes (what a kernel may ask for with
    cudaFuncAttributeMaxDynamicSharedMemorySize)."""
    props = torch.cuda.get_device_properties(device)
    optin = getattr(props, "shared_memory_per_block_optin", None)
    if optin:
        return int(optin)
    return SMEM_OPTIN_BY_CC.get((props.major, props.minor), 99 * 1024)


def tile_config(q: Tensor) -> tiles.TileConfig | None:
    """The configuration the kernels use for q's head dim on q's device (None: none fits)."""
    if _forced_variant is not None:
        return tiles.config_for(q.shape[-1], _forced_variant)
    return tiles.choose(q.shape[-1], device_smem_optin(q.device))


def kernel_unsupported_reason(q: Tensor) -> str | None:
    """Why the fused kernels cannot take `q` (None when they can): device, dtype, head dim,
    compute capability, and the shared memory per block the device lets a kernel use against
    what the forward and backward of the smallest configuration need. Builds nothing."""
    if q.device.type != "cuda":
        return f"the fused kernel needs CUDA tensors, got device {q.device}"
    if q.dtype not in KERNEL_DTYPES:
        return f"the fused kernel takes bfloat16 or float16, got {q.dtype}"
    if q.dim() != 4 or q.shape[-1] not in KERNEL_HEAD_DIMS:
        return f"the fused kernel takes head dims {KERNEL_HEAD_DIMS}, got shape {tuple(q.shape)}"
    major, minor = torch.cuda.get_device_capability(q.device)
    if major < 8:
        return f"the fused kernel needs compute capability 8.0 or newer (mma.sync bf16, cp.async), got {major}.{minor}"
    if tile_config(q) is None:
        need = tiles.smallest(q.shape[-1]).smem
        return (f"the fused kernel needs {need // 1024} KiB of shared memory per block for head dim {q.shape[-1]}, "
                f"the device allows {device_smem_optin(q.device) // 1024} KiB")
    return None


_checked_extensions: set[int] = set()


def _extension(q: Tensor):
    """The loaded extension, after checking that its compiled configurations are tiles.py's."""
    from .build import load_extension

    reason = kernel_unsupported_reason(q)
    if reason is not None:
        raise ValueError(f"{reason}; use the 'sdpa', 'flex' or 'eager' backend for these inputs")
    ext = load_extension()
    if id(ext) not in _checked_extensions:
        for configs in tiles.CONFIGS.values():
            for config in configs:
                compiled = tuple(ext.config(config.head_dim, config.variant))
                if compiled != config.as_extension_tuple():
                    raise RuntimeError(f"the bridged-attention extension's configuration {compiled} for head dim "
                                       f"{config.head_dim}, variant {config.variant} is not tiles.py's "
                                       f"{config.as_extension_tuple()}: rebuild it (a stale build in the cache?)")
        _checked_extensions.add(id(ext))
    return ext


def _kernel_layout(x: Tensor) -> Tensor:
    """x itself when the kernels can read it 16 bytes at a time, else a contiguous copy."""
    ok = x.stride(-1) == 1 and x.data_ptr() % 16 == 0 and all(
        size == 1 or stride % 8 == 0 for size, stride in zip(x.shape[:3], x.stride()[:3], strict=True)
    )
    return x if ok else x.contiguous()


@bridged_attention_fwd.register_kernel("cuda")
def _fwd_cuda(q, k, v, k_x, v_x, is_vision, perm, tiles_, n_text, segment, tile_segment, key_segment):
    ext = _extension(q)
    variant = tile_config(q).variant
    out = _new_buffer(q.shape, q.dtype, q.device)
    lse = _new_buffer(q.shape[:3], torch.float32, q.device)
    ext.forward(*(_kernel_layout(t) for t in (q, k, v, k_x, v_x)), is_vision.contiguous(), perm, tiles_, n_text,
                segment, tile_segment, key_segment, variant, out, lse)
    return out, lse


@bridged_attention_bwd.register_kernel("cuda")
def _bwd_cuda(grad_out, q, k, v, k_x, v_x, is_vision, perm, tiles_, n_text, segment, tile_segment, key_segment, out,
              lse, grad_lse):
    ext = _extension(q)
    variant = tile_config(q).variant
    grads = [_new_buffer(q.shape, q.dtype, q.device) for _ in range(5)]
    if grad_lse is not None:
        grad_lse = grad_lse.float().contiguous()
    ext.backward(_kernel_layout(grad_out), *(_kernel_layout(t) for t in (q, k, v, k_x, v_x)),
                 is_vision.contiguous(), perm, tiles_, n_text, segment, tile_segment, key_segment, variant,
                 _kernel_layout(out), lse.contiguous(), grad_lse, *grads)
    return tuple(grads)


# ----------------------------------------------------------------------------- autograd

def _setup_context(ctx, inputs, output):
    out, lse = output
    ctx.set_materialize_grads(False)  # a None grad_lse skips its term
    # The inputs and the plan: the backward reuses the forward's plan.
    ctx.save_for_backward(*inputs, out, lse)


def _backward(ctx, grad_out, grad_lse):
    *inputs, out, lse = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    grads = torch.ops.libra.bridged_attention_bwd(grad_out, *inputs, out, lse, grad_lse)
    return (*grads, *(None,) * 7)


bridged_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def bridged_attention_with_lse(q, k, v, k_x, v_x, is_vision, segment_ids=None) -> tuple[Tensor, Tensor]:
    """The op with argument checks: (out, lse), differentiable in q, k, v, k_x, v_x."""
    if is_vision.dtype != torch.bool:
        is_vision = is_vision.bool()
    check_inputs(q, k, v, k_x, v_x, is_vision, segment_ids)
    plan = cached_plan(is_vision, segment_ids)
    return torch.ops.libra.bridged_attention_fwd(q, k, v, k_x, v_x, is_vision, *plan.tensors())
