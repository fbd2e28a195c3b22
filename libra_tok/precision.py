"""Where and how precisely models compute: the device rule shared by every command, the
tokenizer's precision names users choose from and the autocast they mean.

CLIP may run in bf16/fp16 autocast; the quantizer always runs in fp32 (`libra_tok.quantizer`),
since a lower precision can flip an id whose pre-sign value is near zero.
"""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


def resolve_device(name: str = "auto") -> torch.device:
    """"auto" (CUDA if available), "cpu", "cuda" or "cuda:N"; asking for CUDA without a GPU is a
    ValueError that says to use the CPU."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise ValueError(f"--device {name}: {exc}; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: no CUDA GPU is available; use --device cpu")
    return device


def resolve_precision(device: torch.device, precision: str) -> str:
    """"fp32", "bf16" or "fp16": what `precision` means on `device` ("auto": bf16 on CUDA,
    fp32 elsewhere)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    return precision


def autocast_for(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16/fp16 autocast, fp32, or "auto" (see resolve_precision)."""
    precision = resolve_precision(device, precision)
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


__all__ = ["PRECISIONS", "resolve_precision", "autocast_for"]
