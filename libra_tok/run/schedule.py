"""The learning-rate schedule of both trainers: linear warm-up, then cosine decay.

The LM trainer uses it as the official training does (cosine with 5 % warm-up to 0,
`libra/configs/libra_pretrain.yaml`, `libra_instruction.yaml`; docs/official-formats.md#lm-behaviour);
the official tokenizer schedule was never released.
"""

from __future__ import annotations

import math

import torch


def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """The factor of the peak learning rate at `step`: linear warm-up to 1 (warm-up counted
    from 1), then cosine to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_cosine(optimizer: torch.optim.Optimizer, warmup: int, total: int,
                  min_ratio: float) -> torch.optim.lr_scheduler.LambdaLR:
    """A scheduler that follows `lr_lambda`; its state is the step only (so checkpoints hold
    plain values)."""

    def factor(step: int) -> float:
        return lr_lambda(step, warmup, total, min_ratio)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


__all__ = ["lr_lambda", "warmup_cosine"]
