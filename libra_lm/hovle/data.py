"""HoVLE's training data: Libra's sequences (libra_lm.data: the same shards, captions,
conversations and templates), with the raw pixels of each image beside them.

    preprocess(images, config)      PIL images -> (M, 3, R, R) at the module's image size
    ShardPixels(images, config)     the pixels of a shard sample, read from its recorded source
    DistillDataset                  stage 1: unpaired image-only and text-only sequences
    PixelDataset(base, pixels)      stage 2 / 3: a Libra dataset's examples plus their images' pixels
    collate / Collator -> HoVLEBatch (Libra's Batch + pixel_values in order of appearance)

The CLIP features a shard stores sit at the image positions of the Batch (`clip_features`):
the stage-1 teacher reads them there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..data.batching import Batch
from ..data.batching import collate as collate_examples
from ..data.captions import preprocess_caption
from ..data.datasets import TextTokenizerMixin
from ..data.examples import Example, as_ids, assemble, masked, truncate
from ..data.images import ShardImages, check_images_fit
from ..model import IGNORE_INDEX
from ..segments import image_segment, text_segment
from ..text import check_text_tokenizer
from .config import HoVLEConfig


def preprocess(images: Sequence[Any], config: HoVLEConfig) -> torch.Tensor:
    """PIL images -> (M, 3, R, R) float32 at config.image_size (square by config.pad_mode,
    normalised with config.image_mean/std: libra_tok.preprocess)."""
    from libra_tok.preprocess import preprocess_images

    return preprocess_images(images, config.image_size, config.pad_mode, config.image_mean, config.image_std)


class ShardPixels:
    """Pixels of shard samples at the module's image size, read from the sources the shards
    record (a missing source is a ValueError naming it)."""

    def __init__(self, images: ShardImages, config: HoVLEConfig):
        self.images, self.config = images, config

    def __call__(self, index: int) -> torch.Tensor:
        from libra_tok.data import ImageReadError, ImageRecord, read_image
        from libra_tok.preprocess import preprocess_image

        cfg = self.config
        meta = self.images.meta(index)
        try:
            image = read_image(ImageRecord.from_meta(meta))
        except ImageReadError as err:
            raise ValueError(f"HoVLE reads raw pixels, but the source image of shard sample {index} "
                             f"({self.images.name(index, meta)}) cannot be read ({err}); make the images available "
                             "at the paths the shards record") from None
        return preprocess_image(image, cfg.image_size, cfg.pad_mode, cfg.image_mean, cfg.image_std)


@dataclass
class HoVLEExample:
    example: Example
    pixels: list[torch.Tensor] = field(default_factory=list)  # one (3, R, R) per image slot, in order


@dataclass
class HoVLEBatch:
    batch: Batch  # Libra's: ids, labels, masks, segments, clip_features (stage-1 teacher input)
    pixel_values: torch.Tensor | None  # (M, 3, R, R) in row-major order of appearance
    text_vocab_size: int = 0  # labels >= this are vision ids, not HoVLE's

    @property
    def num_text_labels(self) -> int:
        """Trained text positions (vision labels are not HoVLE's)."""
        labels = self.batch.labels[:, 1:, 0]
        return int(((labels != IGNORE_INDEX) & (labels >= 0) & (labels < self.text_vocab_size)).sum())

    @property
    def num_tokens(self) -> int:
        return self.batch.num_tokens

    def to(self, device, non_blocking: bool = False) -> "HoVLEBatch":
        pix = None if self.pixel_values is None else self.pixel_values.to(device, non_blocking=non_blocking)
        return HoVLEBatch(self.batch.to(device, non_blocking), pix, self.text_vocab_size)

    def pin_memory(self) -> "HoVLEBatch":
        pix = None if self.pixel_values is None else self.pixel_values.pin_memory()
        return HoVLEBatch(self.batch.pin_memory(), pix, self.text_vocab_size)


def collate(items: Sequence[HoVLEExample], config: HoVLEConfig, *, pack: bool = False,
            pack_length: int | None = None) -> HoVLEBatch:
    batch = collate_examples([it.example for it in items], config, pack=pack, pack_length=pack_length)
    placed = []
    for item, (row, start, _) in zip(items, batch.samples, strict=True):
        if len(item.pixels) != len(item.example.images):
            raise ValueError(f"an example has {len(item.example.images)} images but {len(item.pixels)} pixel tensors")
        placed += [((row, start + slot.start), pix) for slot, pix in zip(item.example.images, item.pixels, strict=True)]
    placed.sort(key=lambda p: p[0])
    pixels = torch.stack([p for _, p in placed]) if placed else None
    return HoVLEBatch(batch, pixels, config.text_vocab_size)


class Collator:
    """`collate` with fixed options, picklable for data-loader workers."""

    def __init__(self, config: HoVLEConfig, pack: bool = False, pack_length: int | None = None):
        self.config, self.pack, self.pack_length = config, pack, pack_length

    def __call__(self, items: Sequence[HoVLEExample]) -> HoVLEBatch:
        return collate(items, self.config, pack=self.pack, pack_length=self.pack_length)


class PixelDataset(Dataset):
    """A Libra dataset (PretrainDataset or InstructionDataset over shards opened with
    input_mode "discrete") whose examples get the pixels of their image."""

    def __init__(self, base: Dataset, pixels: ShardPixels):
        self.base, self.pixels = base, pixels

    def __len__(self) -> int:
        return len(self.base)

    @property
    def skipped(self) -> dict[str, str]:
        return getattr(self.base, "skipped", {})

    @property
    def num_skipped(self) -> int:
        return getattr(self.base, "num_skipped", len(self.skipped))

    def image_index(self, position: int) -> int | None:
        """The shard sample of the image of item `position` (None: a text-only item)."""
        if hasattr(self.base, "indices"):  # PretrainDataset
            return int(self.base.indices[position])
        return self.base.samples[position][2]  # InstructionDataset: (rounds, image_round, index)

    def __getitem__(self, key) -> HoVLEExample:
        position = key[0] if isinstance(key, tuple) else key
        example = self.base[key]
        index = self.image_index(position)
        pixels = [self.pixels(index)] if example.images and index is not None else []
        return HoVLEExample(example, pixels)


class DistillDataset(TextTokenizerMixin, Dataset):
    """Stage 1 on unpaired data: items [0, n) are the shards' images alone (`<s> BOI [patches]
    EOI`, the CLIP features stored at the patches: the teacher's input), items [n, n + t) the
    shards' captions alone (`<s> caption`); no labels (the targets are embeddings)."""

    def __init__(self, images: ShardImages, pixels: ShardPixels, text_tokenizer_path: str, config: HoVLEConfig, *,
                 max_length: int | None = 700, max_words: int = 64):
        if not images.has_features or images.input_mode != "hybrid":
            raise ValueError(f"stage 1 (distill) regresses the CLIP features stored in the shards, and "
                             f"{', '.join(images.folders)} store none: encode with `libra-tok encode --save-features`")
        check_images_fit(images, config)
        self.images, self.pixels, self.config = images, pixels, config
        self.text_tokenizer_path = str(text_tokenizer_path)
        self.max_length, self.max_words = max_length, max_words
        self.captions = np.flatnonzero(images.captioned)
        self.skipped: dict[str, str] = {}
        self.num_skipped = 0
        check_text_tokenizer(self.text_tokenizer, config)

    def __len__(self) -> int:
        return len(self.images) + len(self.captions)

    def __getitem__(self, key) -> HoVLEExample:
        position = key[0] if isinstance(key, tuple) else key
        cfg, tok = self.config, self.text_tokenizer
        if position < len(self.images):
            bos = text_segment([cfg.bos_token_id], cfg).ids
            img = image_segment(as_ids(self.images.ids(position)), None, cfg).ids
            example = assemble([(bos, masked(bos)), (img, masked(img))], [(1, self.images.image(position))])
            example = truncate(example, self.max_length, cfg)
            return HoVLEExample(example, [self.pixels(position)] if example.images else [])
        index = int(self.captions[position - len(self.images)])
        caption = preprocess_caption(self.images.meta(index)["caption"], self.max_words)
        ids = text_segment(tok.encode(caption, bos=True), cfg).ids
        return HoVLEExample(truncate(Example(ids, masked(ids)), self.max_length, cfg))


__all__ = ["preprocess", "ShardPixels", "HoVLEExample", "HoVLEBatch", "collate", "Collator", "PixelDataset",
           "DistillDataset"]
