"""Tile-by-tile PyTorch version of the fused bridged-attention kernels.

`tiled_forward` and `tiled_backward` run exactly the algorithm of csrc/bridged_attn_fwd.cu and
csrc/bridged_attn_bwd.cu: the same query partition (partition.py), the same tiles, steps and
loop bounds, the same masks and the same decisions to skip them, the online softmax in base 2,
the log-sum-exp, the backward's two per-view dK/dV accumulators written by key modality, dQ
accumulated in fp32, and the same roundings to the input dtype (P before P V, P^T before dV,
dS before dK and dQ). A block of the kernel is one iteration of the tile loop here; heads are
batched. This is the CPU implementation of the custom op (ops.py) and the proof of the
kernels' algorithm: the tests compare it with a dense oracle on CPU, and with the kernels (on
a GPU, or the emulator of emu/ on the CPU).
"""

from __future__ import annotations

import math

import torch

from .partition import Plan, make_plan
from .tiles import CONFIGS, KEY_GROUP, PLAN_BLOCK_M

LOG2E = math.log2(math.e)


def kernel_blocks(head_dim: int, variant: int = 0) -> tuple[int, int, int, int]:
    """(plan tile = fwd block_m, fwd block_n, bwd step block_m, bwd block_n) of a kernel
    configuration (tiles.py); other head dims (the CPU path takes any) use d = 64's."""
    config = CONFIGS.get(head_dim, CONFIGS[64])[variant]
    return config.fwd_block_m, config.fwd_block_n, config.bwd_block_m, config.bwd_block_n


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The op's log-sum-exp is fp32, fp64 for fp64 inputs (so gradcheck can run)."""
    return _compute_dtype(dtype)


def _rows(x: torch.Tensor, rows: torch.Tensor, count: int) -> torch.Tensor:
    """x (H, N, D)[:, rows], zero-padded to `count` rows (cp.async with zero fill)."""
    out = x.new_zeros(x.shape[0], count, x.shape[2])
    out[:, : rows.numel()] = x[:, rows]
    return out


def _key_view(kk: torch.Tensor, kx: torch.Tensor, is_vision: torch.Tensor, j0: int, block: int,
              view: int) -> torch.Tensor:
    """Key rows j0..j0+block of the view used by queries of modality `view`: from kk where the
    key has that modality, else from kx; zero past the sequence."""
    n = kk.shape[1]
    j = torch.arange(j0, j0 + block, device=kk.device)
    inside = j < n
    jj = j.clamp(max=n - 1)
    same = (is_vision[jj].long() == view)[None, :, None]
    return torch.where(same & inside[None, :, None], kk[:, jj], torch.where(inside[None, :, None], kx[:, jj], 0))


def _upcast(cdt: torch.dtype, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """Inputs in the compute dtype. Exact: bf16/fp16 values are fp32 values, and the kernels
    multiply them exactly into fp32 accumulators."""
    return [t.to(cdt) for t in tensors]


def _round(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Round to the input dtype and back, as the kernels pack fp32 registers into bf16/fp16."""
    return x.to(dtype).to(x.dtype)


def _tile_rows(plan: Plan, b: int, t: int) -> tuple[int, int, int, int]:
    q_start, q_end, key_lo, key_hi = (int(x) for x in plan.tiles[b, t].tolist())
    return q_start, q_end, key_lo, key_hi


def _query_meta(plan: Plan, b: int, q_start: int, q_end: int, block_m: int):
    """Positions (-1 past the tile) and segment labels of a query tile."""
    rows = plan.perm[b, q_start:q_end].long()
    pos = torch.full((block_m,), -1, dtype=torch.long, device=rows.device)
    pos[: rows.numel()] = rows
    seg = None
    if plan.segment is not None:
        seg = torch.zeros(block_m, dtype=torch.long, device=rows.device)
        seg[: rows.numel()] = plan.segment[b, rows].long()
    return rows, pos, seg


def _segment_uniform(plan: Plan, b: int, t: int, j0: int, block_n: int) -> bool:
    """Whether every query of tile t and every key of [j0, j0 + block_n) share one segment, by
    the plan's labels, as the kernels decide it."""
    tile_seg = int(plan.tile_segment[b, t])
    groups = plan.key_segment[b, j0 // KEY_GROUP:(j0 + block_n) // KEY_GROUP]
    return tile_seg >= 0 and groups.numel() * KEY_GROUP == block_n and bool((groups == tile_seg).all())


def tiled_forward(q, k, v, k_x, v_x, is_vision, segment_ids=None, *, block_m=None, block_n=None,
                  plan: Plan | None = None, variant: int = 0):
    """-> out (B, H, N, D) in q's dtype, lse (B, H, N) natural log (lse_dtype). Tiles: block_m
    queries (the plan's), block_n keys per step; default those of the kernel configuration
    `variant` (tiles.py)."""
    bsz, heads, n, d = q.shape
    fb_m, fb_n, _, _ = kernel_blocks(d, variant)
    block_m = plan.block_m if plan is not None else (block_m or fb_m)
    block_n = block_n or fb_n
    plan = plan or make_plan(is_vision, segment_ids, block_m)
    dt, cdt = q.dtype, _compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(d)
    sl2 = scale * LOG2E
    out = torch.full_like(q, float("nan"), memory_format=torch.contiguous_format)
    lse = torch.full((bsz, heads, n), float("nan"), dtype=lse_dtype(dt), device=q.device)
    neg_inf = float("-inf")
    q, k, v, k_x, v_x = _upcast(cdt, q, k, v, k_x, v_x)

    for b in range(bsz):
        n_text = int(plan.n_text[b])
        for t in range(plan.num_tiles):  # one thread block each
            q_start, q_end, key_lo, key_hi = _tile_rows(plan, b, t)
            if q_start >= q_end:
                continue
            modality = 1 if q_start >= n_text else 0
            rows, row_pos, row_seg = _query_meta(plan, b, q_start, q_end, block_m)
            q_t = _rows(q[b], rows, block_m)  # (H, BM, D)
            min_pos = int(rows[0])
            acc = torch.zeros(heads, block_m, d, dtype=cdt, device=q.device)
            m_run = torch.full((heads, block_m), neg_inf, dtype=cdt, device=q.device)
            l_run = torch.zeros(heads, block_m, dtype=cdt, device=q.device)
            for kb in range(key_lo // block_n, -(-key_hi // block_n)):
                j0 = kb * block_n
                k_t = _key_view(k[b], k_x[b], is_vision[b], j0, block_n, modality)
                v_t = _key_view(v[b], v_x[b], is_vision[b], j0, block_n, modality)
                s = q_t @ k_t.transpose(-1, -2)  # (H, BM, BN)
                need_mask = j0 + block_n - 1 > min_pos
                if not need_mask and plan.segment is not None:
                    if block_n % KEY_GROUP == 0:
                        need_mask = not _segment_uniform(plan, b, t, j0, block_n)
                    else:  # tiles of the tests that no kernel uses: mask every step
                        need_mask = True
                if need_mask:
                    j = torch.arange(j0, j0 + block_n, device=q.device)
                    ok = j[None, :] <= row_pos[:, None]
                    if plan.segment is not None:
                        key_seg = plan.segment[b, j.clamp(max=n - 1)].long()
                        ok &= key_seg[None, :] == row_seg[:, None]
                    s = s.masked_fill(~ok, neg_inf)
                mx = torch.maximum(m_run, s.amax(-1))
                m_use = torch.where(mx == neg_inf, torch.zeros_like(mx), mx)
                alpha = torch.exp2((m_run - m_use) * sl2)
                m_run = mx
                p = torch.exp2(s * sl2 - (m_use * sl2)[..., None])
                l_run = l_run * alpha + p.sum(-1)
                acc = acc * alpha[..., None] + _round(p, dt) @ v_t
            cnt = rows.numel()
            out[b][:, rows] = (acc[:, :cnt] / l_run[:, :cnt, None]).to(dt)
            lse[b][:, rows] = (m_run[:, :cnt] * scale + torch.log(l_run[:, :cnt])).to(lse.dtype)
    return out, lse


def tiled_backward(dout, q, k, v, k_x, v_x, is_vision, segment_ids, out, lse, grad_lse=None, *, block_m=None,
                   block_n=None, step_m=None, plan: Plan | None = None, variant: int = 0):
    """-> dq, dk, dv, dk_x, dv_x in q's dtype. `grad_lse` (or None) is the gradient reaching the
    log-sum-exp output: d lse_i / d s_ij = P_ij, so it enters as a shift of delta. Tiles:
    block_n keys per block; the plan's tiles of block_m queries walked in steps of step_m
    (default: the kernel configuration `variant`'s, or block_m when block_m is not the plan's)."""
    bsz, heads, n, d = q.shape
    plan_m, _, bb_m, bb_n = kernel_blocks(d, variant)
    block_m = plan.block_m if plan is not None else (block_m or plan_m)
    block_n = block_n or bb_n
    step_m = step_m or (bb_m if block_m == PLAN_BLOCK_M else block_m)
    if block_m % step_m:
        raise ValueError(f"step_m {step_m} must divide the plan's tile of {block_m} queries")
    plan = plan or make_plan(is_vision, segment_ids, block_m)
    dt, cdt = q.dtype, _compute_dtype(q.dtype)
    scale = 1.0 / math.sqrt(d)
    sl2 = scale * LOG2E

    q, k, v, k_x, v_x, dout = _upcast(cdt, q, k, v, k_x, v_x, dout)
    # Preprocess (the delta kernel): delta_i = rowsum(dO_i * O_i) - grad_lse_i.
    delta = (dout * out.to(cdt)).sum(-1)
    if grad_lse is not None:
        delta = delta - grad_lse.to(cdt)
    dq_accum = torch.zeros(bsz, heads, n, d, dtype=cdt, device=q.device)
    # Every row of these is written exactly once below; NaN would show a row that was not.
    grads = {name: torch.full(q.shape, float("nan"), dtype=dt, device=q.device)
             for name in ("dk", "dv", "dk_x", "dv_x")}

    for b in range(bsz):
        n_text = int(plan.n_text[b])
        tiles_text = -(-n_text // block_m)
        tiles_vision = -(-(n - n_text) // block_m)
        perm = plan.perm[b].long()
        for kt in range(-(-n // block_n)):  # one thread block each
            j0 = kt * block_n
            j = torch.arange(j0, j0 + block_n, device=q.device)
            key_valid = j < n
            key_seg = plan.segment[b, j.clamp(max=n - 1)].long() if plan.segment is not None else None
            for view in (0, 1):  # text queries, then vision queries
                t_range = range(0, tiles_text) if view == 0 else range(tiles_text, tiles_text + tiles_vision)
                dk_acc = torch.zeros(heads, block_n, d, dtype=cdt, device=q.device)
                dv_acc = torch.zeros_like(dk_acc)
                k_t = _key_view(k[b], k_x[b], is_vision[b], j0, block_n, view)
                v_t = _key_view(v[b], v_x[b], is_vision[b], j0, block_n, view)
                for t in t_range:
                    q_start, q_end, key_lo, _ = _tile_rows(plan, b, t)
                    for r0 in range(q_start, q_end, step_m):  # the steps of the tile
                        r1 = min(r0 + step_m, q_end)
                        if key_lo >= j0 + block_n or int(perm[r1 - 1]) < j0:
                            continue  # no query of the step sees a key of the block
                        rows, q_pos, q_seg = _query_meta(plan, b, r0, r1, step_m)
                        cnt = rows.numel()
                        q_t = _rows(q[b], rows, step_m)
                        do_t = _rows(dout[b], rows, step_m)
                        lse_t = torch.zeros(heads, step_m, dtype=cdt, device=q.device)
                        lse_t[:, :cnt] = lse[b][:, rows].to(cdt) * LOG2E
                        delta_t = torch.zeros(heads, step_m, dtype=cdt, device=q.device)
                        delta_t[:, :cnt] = delta[b][:, rows]

                        st = k_t @ q_t.transpose(-1, -2)  # S^T (H, BN, BM)
                        dpt = v_t @ do_t.transpose(-1, -2)  # dP^T
                        pt = torch.exp2(st * sl2 - lse_t[:, None, :])
                        need_mask = cnt < step_m or j0 + block_n - 1 > int(rows[0])
                        if not need_mask and key_seg is not None:
                            uniform = block_n % KEY_GROUP == 0 and j0 + block_n <= n
                            need_mask = not (uniform and _segment_uniform(plan, b, t, j0, block_n))
                        if need_mask:
                            ok = j[:, None] <= q_pos[None, :]
                            if key_seg is not None:
                                ok &= key_seg[:, None] == q_seg[None, :]
                            pt = torch.where(ok, pt, torch.zeros_like(pt))
                        dst = pt * (dpt - delta_t[:, None, :])  # dS^T

                        dv_acc += _round(pt, dt) @ do_t
                        dk_acc += _round(dst, dt) @ q_t
                        dq_part = _round(dst, dt).transpose(-1, -2) @ k_t  # (H, BM, D)
                        dq_accum[b][:, rows] += dq_part[:, :cnt] * scale
                # Write the view: keys of its modality -> dk/dv, the others -> dk_x/dv_x.
                jj = j[key_valid]
                same = is_vision[b, jj].long() == view
                for name, acc in (("dk", dk_acc * scale), ("dv", dv_acc)):
                    rows_acc = acc[:, key_valid].to(dt)
                    grads[name][b][:, jj[same]] = rows_acc[:, same]
                    grads[name + "_x"][b][:, jj[~same]] = rows_acc[:, ~same]
    return dq_accum.to(dt), grads["dk"], grads["dv"], grads["dk_x"], grads["dv_x"]
