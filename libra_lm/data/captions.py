"""Pretraining on image-caption pairs: the official caption processing and the pretraining
sequence `<s> BOI [patches] EOI \\n caption` with its labels (official
libra/data/datasets/laion_dataset.py; docs/official-formats.md#lm-behaviour)."""

from __future__ import annotations

import re

import numpy as np
import torch

from .. import templates
from ..config import LibraConfig
from ..model import IGNORE_INDEX
from ..segments import image_segment
from .examples import Example, as_ids, assemble, masked, truncate


def preprocess_caption(caption: str, max_words: int = 64, lowercase: bool = True, remove_html: bool = False) -> str:
    """The official pretraining caption processor (`LibraCaptionProcessor`, configured with
    max_words 64, lowercase, HTML kept): `*#~` become spaces, runs of 2+ whitespace one
    space, strip, lowercase, then the first `max_words` space-separated words."""
    if remove_html:
        caption = re.sub(r"<.*?>", "", caption)
    caption = re.sub(r"([*#~])", " ", caption)
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.strip()
    if lowercase:
        caption = caption.lower()
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


def pretrain_example(
    image_ids: torch.Tensor | np.ndarray,
    caption: str,
    text_tokenizer,
    config: LibraConfig,
    *,
    image: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    eos: bool = False,
    max_length: int | None = None,
) -> Example:
    """`<s> BOI [patches] EOI \\n caption` (the `raw` template) with the official labels:
    BOS, BOI and the newline masked (the position before BOI and EOI itself predict across
    modalities, which the joint logits cannot); patches, EOI and the caption trained; no EOS
    unless `eos` (the official Libra-Base has none). `image_ids` (P, num_codebooks) are the
    image tokenizer's ids; `image` = (stored features, pixels) of the image slot."""
    img = image_segment(as_ids(image_ids), None, config)
    parts = templates.encode_parts(templates.raw(caption, with_image=True, eos=eos, answer=True), text_tokenizer,
                                   config, image=img)
    pieces = []
    for part, segment in parts:
        labels = segment.ids.clone()
        if part.text is None or part.answer:
            # BOI (a text position cannot predict it), and the "\n" after EOI (official "mask
            # nearest text token after image").
            labels[0] = IGNORE_INDEX
        else:
            labels = masked(segment.ids)  # BOS
        pieces.append((segment.ids, labels))
    images = [(k, image) for k, (part, _) in enumerate(parts) if part.text is None]
    return truncate(assemble(pieces, images), max_length, config)


__all__ = ["preprocess_caption", "pretrain_example"]
