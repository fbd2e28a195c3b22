"""Loading the official Libra tokenizer into an ImageTokenizer.

`load_official` reads `vqgan.ckpt` (or its folder) with `libra_tok.official` and builds the
tokenizer with `ImageTokenizer.from_state`, which checks every key and shape. The pieces live
where they belong: reading weight files in `libra_tok.weight_files`, the official and HF
conversions (pure functions of dicts) in `libra_tok.conversions`, the official folder in
`libra_tok.official`.
"""

from __future__ import annotations

from pathlib import Path

from .config import TokenizerConfig
from .hub import OFFICIAL_TOKENIZER, resolve
from .model import ImageTokenizer
from .official import read_official


def load_official(
    path: str | Path,
    clip: str | Path | None = None,
    config: TokenizerConfig | str | None = None,
    *,
    trust_pickle: bool = False,
) -> ImageTokenizer:
    """Load the official Libra tokenizer (`vqgan.ckpt`, or its folder, or a Hub id such as
    `YifanXu/libra-vision-tokenizer`: libra_tok.hub) as an ImageTokenizer.

    config: a TokenizerConfig or preset name; default: the folder's
        vision_tokenizer_config.yaml if present, else the `libra-l336` preset.
    clip: the CLIP architecture, overriding the config's: an open_clip model name, an HF CLIP
        folder (its config.json) or a weights file (its tensor shapes). Default with the yaml:
        the CLIP folder its `encoder_name` names beside vqgan.ckpt, else the checkpoint's
        shapes. The CLIP weights always come from vqgan.ckpt, as in the official loader.
    trust_pickle: allow non-tensor objects in the pickle (only for files you trust).
    """
    official = read_official(resolve(path, OFFICIAL_TOKENIZER), clip, config, trust_pickle=trust_pickle)
    return ImageTokenizer.from_state(official.config, official.state, official.source, official.hint)


__all__ = ["load_official"]
