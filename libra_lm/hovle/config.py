"""HoVLE configuration: the LLaMA body, the id space of the shards, the holistic embedding module.

HoVLE (Tao et al., 2024, "Unleashing the Power of Monolithic Vision-Language Models with
Holistic Vision-Language Embedding"; released model OpenGVLab/HoVLE) puts one small causal
transformer in front of a plain LLM: it embeds image patches and text tokens into one space and
the LLM reads its last hidden states as input embeddings. Here the LLM is a LLaMA with the
field names of `LibraConfig`, so the same LLaMA (and the same shards, sequences and tokenizer)
serves both designs.

Images occupy `num_image_tokens` positions of a sequence, as in Libra's sequences (BOI,
patches, EOI): the module's patch path turns `image_size / patch_size` squared patches into
exactly that many embeddings (after the optional 2 x 2 pixel shuffle), so HoVLE reads the very
sequences Libra's data pipeline builds, and the CLIP features of the shards line up with the
image positions (the distillation targets).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from libra_tok.config import CLIP_MEAN, CLIP_STD, check_fields

from ..config import PRESETS as LIBRA_PRESETS
from ..config import LMConfig


@dataclass
class HoVLEConfig(LMConfig):
    kind = "HoVLE"  # (a class attribute, not a field)

    # LLaMA body (LibraConfig / HF LlamaConfig names), shared by the LLM and the module's layers.
    hidden_size: int = 2048
    num_hidden_layers: int = 24  # the LLM
    num_attention_heads: int = 16
    intermediate_size: int = 8192
    text_vocab_size: int = 32000
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02

    # The holistic embedding module.
    num_embedding_layers: int = 8  # HoVLE: 8 causal layers in front of the LLM
    image_size: int = 672  # pixels per side of the square input image
    patch_size: int = 14
    pixel_shuffle: bool = True  # 2 x 2 neighbouring patches -> one token (ratio 0.5)
    pad_mode: str = "pad"  # how a non-square image becomes square (libra_tok.preprocess)
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    # The joint id space of the shards (libra_lm.segments): image positions hold ids >= text_vocab_size.
    codebook_size: int = 512
    num_codebooks: int = 2
    num_image_tokens: int = 576  # image positions per image (= tokens the patch path yields)
    contiguous_signal_size: int = 4096  # CLIP feature channels of the shards (stage-1 teacher input)

    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    newline_token_id: int = 13

    def __post_init__(self) -> None:
        if isinstance(self.image_mean, list):
            self.image_mean = tuple(self.image_mean)
        if isinstance(self.image_std, list):
            self.image_std = tuple(self.image_std)
        problems = self._body_problems()
        if self.num_embedding_layers < 0:
            problems.append(f"num_embedding_layers must be >= 0, got {self.num_embedding_layers}")
        if self.image_size % self.patch_size:
            problems.append(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}")
        elif self.pixel_shuffle and self.patch_grid % 2:
            problems.append(f"pixel_shuffle needs an even patch grid, got {self.patch_grid} "
                            f"(image_size / patch_size)")
        elif self.tokens_per_image != self.num_image_tokens:
            problems.append(f"the patch path yields {self.tokens_per_image} tokens per image (image_size "
                            f"{self.image_size}, patch_size {self.patch_size}, pixel_shuffle {self.pixel_shuffle}) "
                            f"but num_image_tokens is {self.num_image_tokens}")
        if self.pad_mode not in ("pad", "crop"):
            problems.append(f"pad_mode must be 'pad' or 'crop', got {self.pad_mode!r}")
        self._raise(problems)

    @classmethod
    def presets(cls) -> dict[str, "HoVLEConfig"]:
        return PRESETS

    # ---- derived quantities -------------------------------------------------------------
    @property
    def patch_grid(self) -> int:
        """Patches per side before the pixel shuffle."""
        return self.image_size // self.patch_size

    @property
    def token_grid(self) -> int:
        """Image tokens per side (after the pixel shuffle)."""
        return self.patch_grid // 2 if self.pixel_shuffle else self.patch_grid

    @property
    def tokens_per_image(self) -> int:
        return self.token_grid**2


# LLaMA fields a Libra config shares with HoVLE: "the same LLaMA" (from_llama_fields).
LLAMA_FIELDS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size", "text_vocab_size",
                "rms_norm_eps", "rope_theta", "max_position_embeddings", "initializer_range", "codebook_size",
                "num_codebooks", "num_image_tokens", "contiguous_signal_size", "pad_token_id", "bos_token_id",
                "eos_token_id", "newline_token_id")


def from_llama_fields(config: Any, preset: str, **overrides: Any) -> HoVLEConfig:
    """A HoVLE config on the LLaMA body and id space of `config` (a LibraConfig, or another
    HoVLEConfig), with the module of `preset`; the image size follows the shards' grid (the
    preset's patch size and shuffle, `num_image_tokens` positions per image)."""
    base = HoVLEConfig.from_preset(preset)
    fields = {name: getattr(config, name) for name in LLAMA_FIELDS}
    grid = round(fields["num_image_tokens"] ** 0.5)
    if grid * grid != fields["num_image_tokens"]:
        raise ValueError(f"num_image_tokens {fields['num_image_tokens']} is not a square grid")
    fields["image_size"] = grid * base.patch_size * (2 if base.pixel_shuffle else 1)
    return dataclasses.replace(base, **check_fields(HoVLEConfig, {**fields, **overrides}))


PRESETS: dict[str, HoVLEConfig] = {
    # HoVLE's 2.6B shape (8 embedding layers, a 24-layer LLM of width 2048, InternLM2-1.8B's
    # sizes) on a LLaMA body with LLaMA-2's 32000-token vocabulary: 2.4B parameters (HoVLE's own
    # count includes InternLM2's 92553-token tables). 672 px / 14 = 48 patches per side,
    # shuffled to 24 x 24 = 576 tokens: Libra's image length, so both read the same sequences.
    "hovle-2.6b": HoVLEConfig(),
    # Libra's `tiny` LLaMA (libra_lm.config) with a 1-layer module: 64 px / 4 = 16 patches per
    # side, shuffled to the tiny tokenizer's 8 x 8 grid.
    "hovle-tiny": HoVLEConfig(**{name: getattr(LIBRA_PRESETS["tiny"], name) for name in LLAMA_FIELDS},
                              num_embedding_layers=1, image_size=64, patch_size=4),
}

__all__ = ["HoVLEConfig", "PRESETS", "LLAMA_FIELDS", "from_llama_fields"]
