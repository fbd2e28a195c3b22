"""Bridged attention speed and memory: the fused CUDA kernel, FlexAttention, the eager
reference, and plain causal SDPA flash attention without the bridge (the ceiling).

    python bench/attention.py                    # N = 1k..8k, d 128, bf16, causal (GPU)
    python bench/attention.py --seqlens 4096 --backends cuda,sdpa-flash
    python bench/attention.py --smoke            # tiny CPU configuration, to check it runs
    python bench/attention.py --one-case 384     # one small forward+backward of `cuda`, checked (for
                                                 # compute-sanitizer); exit status 1 if it is wrong

FLOPs follow FlashAttention's convention: a causal forward is 4*B*H*N^2*d / 2, forward +
backward 3.5 times that. Each configuration uses a realistic Libra layout (text, 578-token
images, text, ...) and keeps B*N fixed (--tokens). Timings are medians of CUDA-event-timed
runs after warm-up; peak memory is the allocator's peak above the inputs, forward+backward.
"""

from __future__ import annotations

import argparse
import functools
import math
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import libra_lm.kernels as kernels  # noqa: E402

IMAGE_TOKENS = 578  # BOI + 576 patches + EOI (docs/official-formats.md#lm-behaviour)


def libra_layout(batch: int, n: int, image_tokens: int = IMAGE_TOKENS, text_tokens: int = 64) -> torch.Tensor:
    """is_vision (B, N): a short text prompt, then image / text alternating, shifted per row."""
    is_vision = torch.zeros(batch, n, dtype=torch.bool)
    for row in range(batch):
        pos = 16 + 8 * row
        while pos < n:
            is_vision[row, pos:pos + image_tokens] = True
            pos += image_tokens + text_tokens
    return is_vision


def eager_bridged_attention(q, k, v, k_x, v_x, is_vision, segment_ids=None):
    """The official two-view math, materialising both N x N score matrices (`attn_with_bridge`,
    libra/models/libra/modeling_libra.py)."""
    try:
        from libra_lm.attention import bridged_attention

        return bridged_attention(q, k, v, k_x, v_x, is_vision, segment_ids=segment_ids, backend="eager")
    except (ImportError, AttributeError):
        pass
    n, d = q.shape[-2:]
    same = (is_vision[:, :, None] == is_vision[:, None, :])[:, None]
    scores = torch.where(same, q @ k.transpose(-1, -2), q @ k_x.transpose(-1, -2)).float() / math.sqrt(d)
    causal = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
    p = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1).to(q.dtype)
    return torch.where(same, p, 0) @ v + torch.where(same, 0, p) @ v_x


def sdpa_flash(q, k, v, k_x, v_x, is_vision, segment_ids=None):
    """No bridge: plain causal attention over q, k, v with the flash backend (the ceiling)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = SDPBackend.FLASH_ATTENTION if q.is_cuda else SDPBackend.MATH
    with sdpa_kernel(backend):
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)


def cuda_small(q, k, v, k_x, v_x, is_vision, segment_ids=None):
    """The fused kernel in its configuration for 99 KiB GPUs (sm_86/89/120), on any GPU."""
    from libra_lm.kernels import ops, tiles

    with ops.use_variant(tiles.smallest(q.shape[-1]).variant):
        return kernels.cuda_bridged_attention(q, k, v, k_x, v_x, is_vision, segment_ids)


BACKENDS = {
    "cuda": (kernels.cuda_bridged_attention, kernels.cuda_status),
    "cuda-small": (cuda_small, kernels.cuda_status),
    "flex": (kernels.flex_bridged_attention, kernels.flex_status),
    "eager": (eager_bridged_attention, lambda q: (True, "")),
    "sdpa-flash": (sdpa_flash, lambda q: (True, "")),
}


def timed(fn, warmup: int, iters: int, device: torch.device) -> float:
    """Median milliseconds of fn()."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize(device)
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def run_one(name, n, args, device, dtype):
    fn, status = BACKENDS[name]
    batch = max(1, args.tokens // n)
    gen = torch.Generator().manual_seed(0)
    shape = (batch, args.heads, n, args.head_dim)
    inputs = [torch.randn(shape, generator=gen).to(device=device, dtype=dtype).requires_grad_() for _ in range(5)]
    is_vision = libra_layout(batch, n).to(device)
    ok, reason = status(inputs[0])
    if name == "flex" and device.type == "cpu":
        # Forward only on CPU (the backward is reported as n/a below), eager: compiling flex
        # for a smoke run would take longer than the run.
        ok, reason = True, ""
        fn = functools.partial(kernels.flex_bridged_attention, compiled=False)
    if not ok:
        return {"backend": name, "n": n, "batch": batch, "skip": reason}
    fwd_flops = 4 * batch * args.heads * n * n * args.head_dim / 2
    row = {"backend": name, "n": n, "batch": batch}
    try:
        with torch.no_grad():
            row["fwd_ms"] = timed(lambda: fn(*inputs, is_vision), args.warmup, args.iters, device)
        row["fwd_tflops"] = fwd_flops / row["fwd_ms"] / 1e9
        grad_out = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)

        def fwd_bwd():
            out = fn(*inputs, is_vision)
            torch.autograd.grad(out, inputs, grad_out, allow_unused=True)  # sdpa ignores k_x, v_x

        if device.type == "cpu" and name == "flex":
            row["bwd_skip"] = "no flex backward on CPU"
        else:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
            row["fwdbwd_ms"] = timed(fwd_bwd, args.warmup, args.iters, device)
            row["fwdbwd_tflops"] = 3.5 * fwd_flops / row["fwdbwd_ms"] / 1e9
            if device.type == "cuda":
                row["peak_mib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**20
    except torch.OutOfMemoryError:
        row["skip"] = "out of memory"
    finally:
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def fmt(x, spec):
    return format(x, spec) if isinstance(x, (int, float)) else "-".rjust(int(spec.split(".")[0]))


def print_table(rows):
    ceiling = {r["n"]: r for r in rows if r["backend"] == "sdpa-flash" and "skip" not in r}
    header = (f"{'N':>6} {'B':>3} {'backend':<11} {'fwd ms':>9} {'fwd TFLOP/s':>12} {'f+b ms':>9} "
              f"{'f+b TFLOP/s':>12} {'peak MiB':>9} {'fwd/flash':>10} {'f+b/flash':>10}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "skip" in r:
            print(f"{r['n']:>6} {r['batch']:>3} {r['backend']:<11} n/a: {r['skip']}")
            continue
        c = ceiling.get(r["n"], {})
        ratio_f = r["fwd_tflops"] / c["fwd_tflops"] if "fwd_tflops" in c else None
        ratio_b = r["fwdbwd_tflops"] / c["fwdbwd_tflops"] if "fwdbwd_tflops" in r and "fwdbwd_tflops" in c else None
        print(f"{r['n']:>6} {r['batch']:>3} {r['backend']:<11} {fmt(r.get('fwd_ms'), '9.3f')} "
              f"{fmt(r.get('fwd_tflops'), '12.2f')} {fmt(r.get('fwdbwd_ms'), '9.3f')} "
              f"{fmt(r.get('fwdbwd_tflops'), '12.2f')} {fmt(r.get('peak_mib'), '9.0f')} "
              f"{fmt(ratio_f, '10.2f')} {fmt(ratio_b, '10.2f')}"
              + (f"  ({r['bwd_skip']})" if "bwd_skip" in r else ""))


def one_case(n: int, head_dim: int, dtype: torch.dtype) -> int:
    """Forward + backward of `cuda` on one packed Libra layout (two samples), checked against
    the eager backend in fp32; 0 when within bf16/fp16 error, else 1. Small enough for
    compute-sanitizer's racecheck and memcheck."""
    from libra_lm.attention import bridged_attention

    gen = torch.Generator().manual_seed(0)
    shape = (1, 2, n, head_dim)
    inputs = [torch.randn(shape, generator=gen).to("cuda", dtype).requires_grad_() for _ in range(5)]
    is_vision = libra_layout(1, n, image_tokens=n // 4, text_tokens=n // 8).cuda()
    segment_ids = (torch.arange(n) >= n // 2).long()[None].cuda()  # two packed samples
    out = kernels.cuda_bridged_attention(*inputs, is_vision, segment_ids)
    grad_out = torch.randn(shape, generator=gen).to("cuda", dtype)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref_in = [t.detach().float().requires_grad_() for t in inputs]
    ref = bridged_attention(*ref_in, is_vision, segment_ids=segment_ids, backend="eager")
    ref_grads = torch.autograd.grad(ref, ref_in, grad_out.float())
    torch.cuda.synchronize()
    errors = [((x.float() - r).norm() / r.norm()).item() for x, r in zip((out, *grads), (ref, *ref_grads), strict=True)]
    limit = 2e-2 if dtype == torch.bfloat16 else 4e-3
    print("relative errors (out, dq, dk, dv, dk_x, dv_x):", " ".join(f"{e:.2e}" for e in errors), f"limit {limit}")
    return 0 if all(e < limit for e in errors) else 1


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqlens", default="1024,2048,4096,8192", help="comma-separated sequence lengths N")
    parser.add_argument("--backends", default="cuda,flex,eager,sdpa-flash",
                        help=f"comma-separated, from {', '.join(BACKENDS)} (cuda-small: the fused kernel's "
                             "configuration for 99 KiB GPUs; sdpa-flash: causal attention without the bridge)")
    parser.add_argument("--tokens", type=int, default=16384, help="B * N per configuration (B = tokens // N)")
    parser.add_argument("--heads", type=int, default=16, help="attention heads H")
    parser.add_argument("--head-dim", type=int, default=128, help="head dim d (the kernel takes 64 and 128)")
    parser.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16", help="input dtype")
    parser.add_argument("--warmup", type=int, default=3, help="untimed runs before timing (compilation, caches)")
    parser.add_argument("--iters", type=int, default=10, help="timed runs; the median is reported")
    parser.add_argument("--json", default=None, help="also write the rows to this JSON file")
    parser.add_argument("--smoke", action="store_true", help="tiny configuration that runs on CPU")
    parser.add_argument("--one-case", type=int, default=None, metavar="N",
                        help="run one checked forward+backward of `cuda` at sequence length N and exit (GPU)")
    args = parser.parse_args(argv)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    if args.one_case is not None:
        if not torch.cuda.is_available():
            parser.error("--one-case needs a CUDA GPU")
        sys.exit(one_case(args.one_case, args.head_dim, dtype))
    if args.smoke:
        warnings.filterwarnings("ignore", message=".*flex_attention.*")  # eager flex on CPU says to compile
        args.seqlens, args.tokens, args.heads, args.head_dim = "128,256", 256, 2, 64
        args.warmup, args.iters = 1, 2
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    names = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = sorted(set(names) - set(BACKENDS))
    if unknown:
        parser.error(f"unknown backends {unknown}; choose from {sorted(BACKENDS)}")
    if device.type == "cuda":
        print(f"device: {torch.cuda.get_device_name(device)}, torch {torch.__version__}, {args.dtype}, "
              f"H={args.heads}, d={args.head_dim}, B*N={args.tokens}")
    else:
        print(f"device: CPU (timings are not representative), torch {torch.__version__}, {args.dtype}")
    rows = []
    for n in (int(s) for s in args.seqlens.split(",")):
        for name in names:
            rows.append(run_one(name, n, args, device, dtype))
    print_table(rows)
    if args.json:
        from libra_tok.fileio import atomic_write_json

        atomic_write_json(args.json, {"device": str(device), "dtype": args.dtype, "heads": args.heads,
                                      "head_dim": args.head_dim, "tokens": args.tokens, "rows": rows})


if __name__ == "__main__":
    main()
