"""Pieces of sequences in the joint id space, and the checks of that space.

Joint ids (docs/official-formats.md#lm-behaviour): text ids are [0, V_t); image ids are
V_t + [0, codebook_size) per codebook, then BOI and EOI. A sequence is (n, num_codebooks):
a text position repeats its id in every column, an image position holds one id per codebook,
BOI and EOI repeat theirs. A `Segment` is such a piece with the CLIP features beside it; both
training examples (libra_lm.data) and prompts (libra_lm.generate) are built from segments.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .config import LibraConfig


@dataclass
class Segment:
    """A piece of a sequence: joint ids (n, num_codebooks) and CLIP features (n, C) or None."""

    ids: torch.Tensor
    features: torch.Tensor | None = None


def text_segment(ids: Sequence[int], config: LibraConfig) -> Segment:
    """Text ids in every codebook column; ids outside the text vocabulary are a ValueError."""
    t = torch.as_tensor(list(ids), dtype=torch.long)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= config.text_vocab_size):
        raise ValueError(f"text ids must lie in [0, {config.text_vocab_size}), got {int(t.min())}..{int(t.max())}")
    return Segment(t[:, None].expand(-1, config.num_codebooks).clone())


def image_segment(ids: torch.Tensor, features: torch.Tensor | None, config: LibraConfig) -> Segment:
    """BOI + patches + EOI from image tokenizer ids (P, num_codebooks) in [0, codebook_size)
    and CLIP features (P, C); BOI/EOI get zero features, as the official hybrid input
    (docs/official-formats.md#lm-behaviour)."""
    p, ncb = config.num_image_tokens, config.num_codebooks
    if tuple(ids.shape) != (p, ncb):
        raise ValueError(f"image ids must be (num_image_tokens, num_codebooks) = ({p}, {ncb}) for this model, "
                         f"got {tuple(ids.shape)}; the image tokenizer's grid must match the LM config")
    ids = ids.long().cpu()
    if int(ids.min()) < 0 or int(ids.max()) >= config.codebook_size:
        raise ValueError(f"image ids must lie in [0, {config.codebook_size})")
    boi = torch.full((1, ncb), config.boi_token_id)
    eoi = torch.full((1, ncb), config.eoi_token_id)
    joint = torch.cat([boi, ids + config.text_vocab_size, eoi])
    feats = None
    if features is not None:
        c = config.contiguous_signal_size
        if tuple(features.shape) != (p, c):
            raise ValueError(f"image features must be (num_image_tokens, contiguous_signal_size) = ({p}, {c}), got "
                             f"{tuple(features.shape)}; the image tokenizer's feature size must match the LM config")
        zero = torch.zeros(1, c, dtype=features.dtype)
        feats = torch.cat([zero, features.detach().cpu(), zero])
    return Segment(joint, feats)


def concat_segments(pieces: Sequence[Segment], config: LibraConfig) -> Segment:
    """One segment of `pieces` in order; features are zero where a piece has none."""
    ids = torch.cat([p.ids for p in pieces])
    if all(p.features is None for p in pieces):
        return Segment(ids)
    feats = [
        p.features if p.features is not None else torch.zeros(p.ids.shape[0], config.contiguous_signal_size)
        for p in pieces
    ]
    return Segment(ids, torch.cat([f.float() for f in feats]))


def as_joint_ids(input_ids: torch.Tensor, config: LibraConfig) -> torch.Tensor:
    """(B, N, num_codebooks) long ids; (B, N) text-only ids are repeated into every column.
    Only the shape and dtype are checked (no look at the values, so no host synchronisation)."""
    ncb = config.num_codebooks
    if input_ids.ndim == 2:
        input_ids = input_ids[..., None].expand(*input_ids.shape, ncb)
    if input_ids.ndim != 3 or input_ids.shape[2] != ncb:
        raise ValueError(f"input_ids must be (B, N, {ncb}) joint ids (or (B, N) text ids), "
                         f"got {tuple(input_ids.shape)}")
    if input_ids.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"input_ids must be integer ids, got {input_ids.dtype}")
    return input_ids.long()


def check_joint_ids(input_ids: torch.Tensor, config: LibraConfig) -> torch.Tensor:
    """`as_joint_ids`, then the values: every id in the joint vocabulary, one modality per
    position, the same id in every column at text, BOI and EOI positions. Reads the values
    back to the host once (a synchronisation on a GPU): call it where ids enter, not per step."""
    input_ids = as_joint_ids(input_ids, config)
    vocab = config.text_vocab_size + config.vision_vocab_size
    is_vision = input_ids >= config.text_vocab_size
    problems = torch.stack([
        ((input_ids < 0) | (input_ids >= vocab)).any(),
        (is_vision != is_vision[..., :1]).any(),
        (~is_vision[..., 0] & (input_ids != input_ids[..., :1]).any(-1)).any(),
        ((input_ids[..., 0] >= config.boi_token_id) & (input_ids != input_ids[..., :1]).any(-1)).any(),
    ]).tolist()
    if problems[0]:
        raise ValueError(f"input_ids outside [0, {vocab}) (text [0, {config.text_vocab_size}) + vision "
                         f"{config.vision_vocab_size}): min {int(input_ids.min())}, max {int(input_ids.max())}")
    if problems[1]:
        raise ValueError("input_ids mix modalities within a position: every column of a position must be "
                         f"a text id (< {config.text_vocab_size}) or every column a vision id")
    if problems[2]:
        raise ValueError("text positions must hold the same text id in every codebook column")
    if problems[3]:
        raise ValueError("BOI/EOI positions must hold the same id in every codebook column")
    return input_ids


__all__ = ["Segment", "text_segment", "image_segment", "concat_segments", "as_joint_ids", "check_joint_ids"]
