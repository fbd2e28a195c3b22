"""Training batches: examples right-padded into rows, or packed several to a row (first fit)
and told apart by segment ids; stored CLIP features and pixels placed at their image slots."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..config import LibraConfig
from ..model import IGNORE_INDEX
from .examples import Example


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, N, num_codebooks)
    labels: torch.Tensor  # (B, N, num_codebooks), IGNORE_INDEX where not trained
    attention_mask: torch.Tensor  # (B, N) 1 = token
    segment_ids: torch.Tensor | None  # (B, N) packed rows: one id per example (padding its own)
    clip_features: torch.Tensor | None  # (B, N, C) float32 from stored features; zero elsewhere
    pixels: torch.Tensor | None  # (M, 3, R, R) images whose features the trainer computes
    pixel_slots: list[tuple[int, int]]  # (row, first patch) of each pixels entry
    samples: list[tuple[int, int, int]]  # (row, start, length) of every example, in input order

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def num_labels(self) -> int:
        return int((self.labels[:, 1:, 0] != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Batch:
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.attention_mask), move(self.segment_ids),
                     move(self.clip_features), move(self.pixels), self.pixel_slots, self.samples)

    def pin_memory(self) -> Batch:
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Batch(pin(self.input_ids), pin(self.labels), pin(self.attention_mask), pin(self.segment_ids),
                     pin(self.clip_features), pin(self.pixels), self.pixel_slots, self.samples)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit packing of items (in order) into rows of at most `capacity` tokens."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"a sequence of {n} tokens does not fit a packed row of {capacity}")
        for r, space in enumerate(free):
            if n <= space:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def collate(examples: Sequence[Example], config: LibraConfig, *, pack: bool = False,
            pack_length: int | None = None) -> Batch:
    """Right-padded batch (pad id, attention mask 0, labels ignored), or with `pack` several
    examples per row (first fit into `pack_length` tokens) told apart by `segment_ids`:
    attention stays inside an example and positions restart, so each example's loss is
    that of its padded row."""
    if not examples:
        raise ValueError("no examples to collate")
    lengths = [len(e) for e in examples]
    if pack:
        rows = pack_rows(lengths, pack_length or max(lengths))
    else:
        rows = [[i] for i in range(len(examples))]
    ncb = config.num_codebooks
    width = max(sum(lengths[i] for i in row) for row in rows)
    num_rows = len(rows)
    ids = torch.full((num_rows, width, ncb), config.pad_token_id, dtype=torch.long)
    labels = torch.full((num_rows, width, ncb), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(num_rows, width, dtype=torch.long)
    segments = torch.full((num_rows, width), -1, dtype=torch.long) if pack else None
    stored = any(s.features is not None for e in examples for s in e.images)
    feats = torch.zeros(num_rows, width, config.contiguous_signal_size) if stored else None
    pixels, pixel_slots = [], []
    samples: list[tuple[int, int, int] | None] = [None] * len(examples)
    for r, row in enumerate(rows):
        at = 0
        for seg, i in enumerate(row):
            e, n = examples[i], lengths[i]
            ids[r, at:at + n] = e.ids
            labels[r, at:at + n] = e.labels
            mask[r, at:at + n] = 1
            if segments is not None:
                segments[r, at:at + n] = seg
            for slot in e.images:
                if slot.features is not None:
                    feats[r, at + slot.start:at + slot.start + slot.features.shape[0]] = slot.features.float()
                elif slot.pixels is not None:
                    pixels.append(slot.pixels)
                    pixel_slots.append((r, at + slot.start))
            samples[i] = (r, at, n)
            at += n
    return Batch(ids, labels, mask, segments, feats, torch.stack(pixels) if pixels else None, pixel_slots,
                 samples)  # type: ignore[arg-type]


class Collator:
    """`collate` with fixed options, picklable for data-loader workers."""

    def __init__(self, config: LibraConfig, pack: bool = False, pack_length: int | None = None):
        self.config, self.pack, self.pack_length = config, pack, pack_length

    def __call__(self, examples: Sequence[Example]) -> Batch:
        return collate(examples, self.config, pack=self.pack, pack_length=self.pack_length)


__all__ = ["Batch", "pack_rows", "collate", "Collator"]
