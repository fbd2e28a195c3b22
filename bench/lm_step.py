"""Training-step throughput and peak memory: the routed Libra LM vs a plain LLaMA of the same size.

    python bench/lm_step.py --config tiny                                  # CPU, seconds
    python bench/lm_step.py --config small --batch-size 2 --steps 2        # CPU, minutes
    python bench/lm_step.py --config 1b --batch-size 4 --device cuda       # GPU (bf16 autocast)
    python bench/lm_step.py --config 1b --device cuda --frozen-llm         # pretraining: vision parts only
    python bench/lm_step.py --config small --fsdp 2                        # + FSDP2 rows on 2 processes

One step = forward with labels + backward + AdamW step, on sequences in the pretraining layout
(<s> BOI [patches] EOI \\n caption) of the chosen config. Rows:
  libra routed       LibraForCausalLM on those sequences: both experts, the bridge, hybrid input;
  libra all-text     the same class on sequences of the same length holding only text ids: the
                     router skips every vision module, so this is exactly our LLaMA code path
                     (the idle vision weights still occupy memory; they are not in the optimizer);
  hf llama           transformers' LlamaForCausalLM (sdpa attention) with the LLaMA part of the
                     config: the reference a user compares against (when transformers is installed);
  libra fsdp xN      (--fsdp N) libra routed on N processes (gloo on CPU, NCCL on GPUs), built on the
                     meta device and sharded with FSDP2 as `libra-lm train --parallel fsdp` does
                     (libra_lm.sharding; bf16 MixedPrecisionPolicy and bf16 frozen weights on CUDA):
                     tokens/s over all processes, peak memory of process 0. On one CPU box the N
                     processes share its cores, so this row shows the cost of sharding, not a speed-up.
Ratios are against hf llama when present (else libra all-text). Each row runs in a fresh process,
so peak memory is its own: CUDA max_memory_allocated, or on CPU the process's peak resident set
(which includes ~0.3-0.5 GB of Python and torch).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import platform
import resource
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from libra_lm.config import LibraConfig  # noqa: E402

CONFIGS = {
    "tiny": LibraConfig.from_preset("tiny"),
    # Small enough for a CPU, large enough that matrix products dominate: the released
    # image sizes (576 patches, 4096 CLIP channels) and vocabulary on a 4-layer 512-wide backbone.
    "small": LibraConfig(hidden_size=512, num_hidden_layers=4, num_attention_heads=8, intermediate_size=1376),
    # A ~1B LLaMA backbone (TinyLlama-like widths, 16 layers) with the released image sizes:
    # 576 patches of 2 x 9-bit ids and 4096 CLIP channels; the visual expert adds ~0.55 B.
    "1b": LibraConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, intermediate_size=5632),
    "libra-7b": LibraConfig.from_preset("libra-7b"),
}
VARIANTS = ("libra routed", "libra all-text", "hf llama")


def sequences(config: LibraConfig, batch: int, caption: int, all_text: bool, seed: int = 0):
    """(input_ids (B, N, 2), clip_features (B, N, C) or None, labels) in the pretraining layout."""
    g = torch.Generator().manual_seed(seed)
    n = 1 + config.image_length + 1 + caption
    v_t, ncb = config.text_vocab_size, config.num_codebooks
    if all_text:
        ids = torch.randint(3, v_t, (batch, n), generator=g)
        ids = ids[..., None].expand(batch, n, ncb).clone()
        labels = ids.clone()
        labels[:, 0] = -100
        return ids, None, labels
    image_ids = torch.randint(0, config.codebook_size, (batch, config.num_image_tokens, ncb), generator=g) + v_t
    text = torch.randint(3, v_t, (batch, caption), generator=g)[..., None].expand(batch, caption, ncb)
    col = lambda value: torch.full((batch, 1, ncb), value)  # noqa: E731
    ids = torch.cat([col(config.bos_token_id), col(config.boi_token_id), image_ids, col(config.eoi_token_id),
                     col(config.newline_token_id), text], 1)
    labels = ids.clone()
    labels[:, [0, 1, config.image_length + 1]] = -100  # BOS, BOI, the newline (official masks)
    feats = torch.randn(batch, n, config.contiguous_signal_size, generator=g)
    return ids, feats, labels


def build(variant: str, config: LibraConfig, frozen_llm: bool):
    """(model, parameters the optimizer holds, step function(inputs) -> loss)."""
    if variant == "hf llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        hf = LlamaConfig(vocab_size=config.text_vocab_size, hidden_size=config.hidden_size,
                         intermediate_size=config.intermediate_size, num_hidden_layers=config.num_hidden_layers,
                         num_attention_heads=config.num_attention_heads, num_key_value_heads=config.num_attention_heads,
                         max_position_embeddings=config.max_position_embeddings, rms_norm_eps=config.rms_norm_eps,
                         rope_theta=config.rope_theta, tie_word_embeddings=False, attn_implementation="sdpa")
        model = LlamaForCausalLM(hf)

        def step(ids, feats, labels):
            return model(ids[..., 0], labels=labels[..., 0]).loss

        return model, list(model.parameters()), step
    from libra_lm.model import LibraForCausalLM

    model = LibraForCausalLM(config)
    if variant == "libra routed":
        model.frozen_llm = frozen_llm
        params = [p for p in model.parameters() if p.requires_grad]
    else:  # a plain LLaMA trains its own weights only
        params = [p for n, p in model.named_parameters() if "vision" not in n]
    return model, params, lambda ids, feats, labels: model(ids, feats, labels=labels).loss


def measure(variant: str, args: argparse.Namespace) -> dict:
    """One row, in the current (fresh) process."""
    torch.manual_seed(0)
    device = torch.device(args.device)
    config = CONFIGS[args.config]
    model, params, step = build(variant, config, args.frozen_llm)
    model.to(device).train()
    if hasattr(model, "gradient_checkpointing_enable") and args.checkpointing:
        model.gradient_checkpointing_enable()
    elif args.checkpointing:
        model.gradient_checkpointing = True
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.99), weight_decay=0.01)
    ids, feats, labels = sequences(config, args.batch_size, args.caption_tokens, variant != "libra routed")
    ids, labels = ids.to(device), labels.to(device)
    feats = feats.to(device) if feats is not None else None
    bf16 = device.type == "cuda" and not args.fp32

    def one_step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = step(ids, feats, labels)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(args.warmup):
        one_step()
    sync()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = one_step()
    sync()
    seconds = (time.perf_counter() - start) / args.steps
    if device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(device)
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux
    return {"variant": variant, "params": sum(p.numel() for p in model.parameters()),
            "trained": sum(p.numel() for p in params), "tokens": ids.shape[0] * ids.shape[1],
            "seconds": seconds, "tokens_per_s": ids.shape[0] * ids.shape[1] / seconds, "peak_bytes": peak,
            "loss": float(loss.detach())}


def measure_fsdp(rank: int, world: int, port: int, args: argparse.Namespace) -> dict:
    """The libra routed step on `world` processes under FSDP2, in process `rank`."""
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from libra_lm.sharding import build_sharded

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    cuda = args.device.startswith("cuda")
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", rank=rank, world_size=world)
    config = CONFIGS[args.config]
    dtype = torch.bfloat16 if cuda and not args.fp32 else torch.float32
    mesh = init_device_mesh(device.type, (world,))
    model = build_sharded(config, "preset", None, seed=0, frozen_llm=args.frozen_llm, mesh=mesh, param_dtype=dtype,
                          device=device)
    model.gradient_checkpointing = args.checkpointing
    model.run_idle_modules = True
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, betas=(0.9, 0.99), weight_decay=0.01)
    ids, feats, labels = sequences(config, args.batch_size, args.caption_tokens, False, seed=rank)
    ids, labels, feats = ids.to(device), labels.to(device), feats.to(device)

    def one_step():
        loss = model(ids, feats, labels=labels).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    for _ in range(args.warmup):
        one_step()
    if cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(args.steps):
        loss = one_step()
    if cuda:
        torch.cuda.synchronize(device)
    dist.barrier()
    seconds = (time.perf_counter() - start) / args.steps
    peak = torch.cuda.max_memory_allocated(device) if cuda else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    tokens = ids.shape[0] * ids.shape[1] * world
    row = {"variant": f"libra fsdp x{world}", "params": sum(p.numel() for p in model.parameters()),
           "trained": sum(p.numel() for p in params), "tokens": tokens, "seconds": seconds,
           "tokens_per_s": tokens / seconds, "peak_bytes": peak, "loss": float(loss.detach())}
    dist.destroy_process_group()
    return row


def _fsdp_worker(rank: int, world: int, port: int, args: argparse.Namespace, queue) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        row = measure_fsdp(rank, world, port, args)
    except Exception as exc:
        row = {"variant": f"libra fsdp x{world}", "error": f"{type(exc).__name__}: {exc}"[:200]}
    if rank == 0:
        queue.put(row)


def run_fsdp(world: int, args: argparse.Namespace) -> dict:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_fsdp_worker, args=(r, world, port, args, queue)) for r in range(world)]
    for proc in procs:
        proc.start()
    result = queue.get()
    for proc in procs:
        proc.join()
    return result


def _worker(variant: str, args: argparse.Namespace, queue) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        queue.put(measure(variant, args))
    except Exception as exc:  # reported in the table, e.g. out of memory
        queue.put({"variant": variant, "error": f"{type(exc).__name__}: {exc}"[:200]})


def run_isolated(variant: str, args: argparse.Namespace) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_worker, args=(variant, args, queue))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--caption-tokens", type=int, default=64, help="text tokens after the image")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--frozen-llm", action="store_true", help="libra routed trains only the vision parts")
    parser.add_argument("--checkpointing", action="store_true", help="activation checkpointing per layer")
    parser.add_argument("--fp32", action="store_true", help="no bf16 autocast on CUDA")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
    parser.add_argument("--fsdp", type=int, default=0, metavar="N",
                        help="also measure libra routed under FSDP2 on N processes (per-process batch --batch-size)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()

    variants = list(VARIANTS)
    try:
        import transformers  # noqa: F401
    except ImportError:
        variants.remove("hf llama")
    config = CONFIGS[args.config]
    rows = [run_isolated(v, args) for v in variants]
    if args.fsdp:
        rows.append(run_fsdp(args.fsdp, args))
    base = next((r for r in reversed(rows) if "error" not in r and "fsdp" not in r["variant"]), None)
    n = 1 + config.image_length + 1 + args.caption_tokens
    precision = "bf16 autocast" if args.device.startswith("cuda") and not args.fp32 else "fp32"
    device = torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor() or "cpu"
    print(f"config {args.config}: hidden {config.hidden_size}, {config.num_hidden_layers} layers, "
          f"{config.num_attention_heads} heads, FFN {config.intermediate_size}; {args.batch_size} x {n} tokens "
          f"({config.image_length} image); {precision}; {args.device} ({device}); torch {torch.__version__}"
          + ("; libra routed: frozen LLM" if args.frozen_llm else "")
          + ("; checkpointing" if args.checkpointing else ""))
    header = (f"{'variant':<16} {'params':>9} {'trained':>9} {'tokens/s':>10} {'peak mem':>10} {'speed':>7} "
              f"{'memory':>7}")
    print(header)
    print("-" * len(header))
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<16} failed: {r['error']}")
            continue
        speed = r["tokens_per_s"] / base["tokens_per_s"]
        memory = r["peak_bytes"] / base["peak_bytes"]
        print(f"{r['variant']:<16} {r['params'] / 1e6:>8.1f}M {r['trained'] / 1e6:>8.1f}M {r['tokens_per_s']:>10.0f} "
              f"{r['peak_bytes'] / 2**30:>8.2f}GB {speed:>6.2f}x {memory:>6.2f}x")
    print(f"(speed and memory relative to {base['variant']}; CPU memory is the peak resident set of each process; "
          "fsdp rows: tokens/s of all processes, memory of process 0)" if base else "")
    if args.json:
        args.json.write_text(json.dumps({"config": args.config, "device": args.device, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
