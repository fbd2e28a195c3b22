"""Training examples: the joint ids of one sequence, its labels and where its images sit, built
from template parts (libra_lm.templates) and cut to a length without splitting an image."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..config import LibraConfig
from ..model import IGNORE_INDEX


@dataclass
class ImageSlot:
    """Where an image's patches sit in a sequence and how its CLIP features are obtained."""

    start: int  # index of the first patch (BOI is at start - 1)
    features: torch.Tensor | None = None  # (P, C) stored features
    pixels: torch.Tensor | None = None  # (3, R, R) preprocessed image: the trainer computes the features


@dataclass
class Example:
    """One training sequence: joint ids (n, num_codebooks), labels of the same shape
    (IGNORE_INDEX where not trained) and its images."""

    ids: torch.Tensor
    labels: torch.Tensor
    images: list[ImageSlot] = field(default_factory=list)

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def num_labels(self) -> int:
        """Trained positions (each predicted by the position before it)."""
        return int((self.labels[1:, 0] != IGNORE_INDEX).sum())


def as_ids(ids: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Image tokenizer ids (from a shard or a tensor) as a long tensor."""
    return torch.as_tensor(np.asarray(ids, dtype=np.int64))


def masked(ids: torch.Tensor) -> torch.Tensor:
    """Labels that train nothing."""
    return torch.full_like(ids, IGNORE_INDEX)


def assemble(pieces: Sequence[tuple[torch.Tensor, torch.Tensor]], images: Sequence[tuple[int, Any]]) -> Example:
    """pieces: (ids, labels) in order; images: (index of the image's piece, (features, pixels))."""
    starts = np.cumsum([0] + [p[0].shape[0] for p in pieces])
    ids = torch.cat([p[0] for p in pieces])
    labels = torch.cat([p[1] for p in pieces])
    slots = [ImageSlot(int(starts[k]) + 1, *src) for k, src in images]
    return Example(ids, labels, slots)


def truncate(example: Example, max_length: int | None, config: LibraConfig) -> Example:
    """Cut to `max_length` tokens. An image is never cut in the middle (the official code can
    do that, docs/official-formats.md#quirks): if the cut falls inside one, the sequence ends
    before its BOI."""
    n = len(example)
    if max_length is None or n <= max_length:
        return example
    cut = max_length
    for slot in example.images:
        boi, eoi = slot.start - 1, slot.start + config.num_image_tokens
        if boi < cut <= eoi:
            cut = boi
    images = [s for s in example.images if s.start + config.num_image_tokens < cut]
    return Example(example.ids[:cut].clone(), example.labels[:cut].clone(), images)


__all__ = ["ImageSlot", "Example", "truncate", "assemble", "masked", "as_ids"]
