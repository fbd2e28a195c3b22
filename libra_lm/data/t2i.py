"""Text-to-image fine-tuning on image-caption pairs (paper §4.3: Libra "further finetuned with
additional 10 million text-image pairs" for Fig. 3): the caption first, then the image.

    <s> caption \\n BOI [patches] EOI

The layout is the official text-to-image branch of libra/data/datasets/laion_dataset.py
(`img_type="respond"`: caption, "\\n ", the image placeholders; no EOS, as the pretraining
captions). Labels: the patches and EOI only (BOS, the caption, the newline and BOI masked: the
official "prompt" label mask). No CLIP features: the contiguous signal of a generated image is
zero (official `contiguous_ignore_sign`), so the model learns to draw from the ids alone.

Generation (libra_lm.visual.t2i) builds its prompt from the same parts, ending at BOI (the
official `<img_gen>` placeholder): token for token the start of a training sequence.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from .. import templates
from ..config import LibraConfig
from ..model import IGNORE_INDEX
from ..segments import image_segment
from .datasets import CaptionedShards
from .examples import Example, as_ids, assemble, masked
from .images import ShardImages


def t2i_parts(caption: str) -> list[templates.Part]:
    """The text-to-image layout as template parts: `<s>{caption}`, then "\\n", then the image.
    The newline is its own part so that a long caption can be cut without losing it."""
    return [templates.Part(caption, bos=True), templates.Part("\n", continues=True), templates.IMAGE]


def t2i_example(
    image_ids: torch.Tensor | np.ndarray,
    caption: str,
    text_tokenizer,
    config: LibraConfig,
    *,
    max_length: int | None = None,
) -> Example:
    """One text-to-image sequence with its labels (module docstring). `image_ids` (P,
    num_codebooks) are the image tokenizer's ids. A sequence longer than `max_length` loses
    caption tokens from its end, never image tokens (the image is what is trained)."""
    image = image_segment(as_ids(image_ids), None, config)
    (_, text), (_, newline), _ = templates.encode_parts(t2i_parts(caption), text_tokenizer, config, image=image)
    ids = text.ids
    if max_length is not None:
        room = max_length - newline.ids.shape[0] - image.ids.shape[0]
        if room < 1:
            raise ValueError(f"max_length {max_length} cannot hold a text-to-image sequence (BOS, the newline and "
                             f"{image.ids.shape[0]} image tokens, before any caption); raise --max-length")
        ids = ids[:room]
    labels = image.ids.clone()
    labels[0] = IGNORE_INDEX  # BOI: a text position cannot predict it (official: BOI labels always masked)
    pieces = [(ids, masked(ids)), (newline.ids, masked(newline.ids)), (image.ids, labels)]
    # No features, no pixels: the contiguous signal of the image is zero.
    return assemble(pieces, [(2, (None, None))])


class T2IDataset(CaptionedShards):
    """Image-caption pairs of shards -> text-to-image examples (captions processed as in
    pretraining). `max_length` must hold BOS, the newline and the whole image."""

    purpose = "text-to-image training"

    def __init__(self, images: ShardImages, text_tokenizer_path: str | Path, config: LibraConfig, *,
                 max_length: int | None = 700, max_words: int = 64, indices: Sequence[int] | None = None):
        if max_length is not None and max_length < config.image_length + 2:
            raise ValueError(f"max_length {max_length} cannot hold a text-to-image sequence (BOS, the newline and "
                             f"{config.image_length} image tokens, before any caption); raise --max-length")
        super().__init__(images, text_tokenizer_path, config, max_length=max_length, max_words=max_words,
                         indices=indices)

    def example(self, index: int, caption: str) -> Example:
        return t2i_example(self.images.ids(index), caption, self.text_tokenizer, self.config,
                           max_length=self.max_length)


__all__ = ["t2i_parts", "t2i_example", "T2IDataset"]
