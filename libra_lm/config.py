"""LM configuration: one dataclass, named presets.

`libra-7b` is the released Libra LM (libra-11b-chat config.json: LLaMA-2-7B plus the
routed visual expert and the bridge; official libra/models/libra/configuration_libra.py,
docs/official-formats.md#lm-folder). `tiny` keeps every structural
feature (two codebooks, hybrid input, low-rank experts, rank-8 bridges) at a size that
runs the tests and the offline demo on a laptop CPU; its contiguous signal and image
length match the `tiny` image tokenizer (3 CLIP layers x 64 channels, 8 x 8 grid).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

from libra_tok.config import check_fields


class LMConfig:
    """What the LM configs share (LibraConfig here, HoVLEConfig in libra_lm.hovle): the checks
    and derived quantities of the LLaMA body and the joint id space, (de)serialisation, presets.
    A subclass is a dataclass with the fields these read and a `presets()` table."""

    kind: ClassVar[str] = "LM"  # in messages: "unknown LM preset", "invalid LibraConfig"

    @classmethod
    def presets(cls) -> dict[str, Any]:
        raise NotImplementedError

    def _body_problems(self) -> list[str]:
        problems = []
        if self.hidden_size % self.num_attention_heads:
            problems.append(
                f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}"
            )
        elif self.head_dim % 2:
            problems.append(f"head_dim {self.head_dim} must be even for RoPE")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id", "newline_token_id"):
            value = getattr(self, name)
            if not 0 <= value < self.text_vocab_size:
                problems.append(f"{name} {value} is outside the text vocabulary [0, {self.text_vocab_size})")
        return problems

    def _raise(self, problems: list[str]) -> None:
        if problems:
            raise ValueError(f"invalid {type(self).__name__}: " + "; ".join(problems))

    # ---- derived quantities -------------------------------------------------------------
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def vision_vocab_size(self) -> int:
        """Rows of each vision table and head: the image ids, BOI and EOI (514 for Libra)."""
        return self.codebook_size + 2

    @property
    def boi_token_id(self) -> int:
        """BOI in the joint id space (32512 for Libra)."""
        return self.text_vocab_size + self.codebook_size

    @property
    def eoi_token_id(self) -> int:
        return self.text_vocab_size + self.codebook_size + 1

    @property
    def image_length(self) -> int:
        """Tokens one image occupies in a sequence: BOI + patches + EOI (578 for Libra)."""
        return self.num_image_tokens + 2

    # ---- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        return cls(**check_fields(cls, data))

    def replace(self, **changes: Any):
        return dataclasses.replace(self, **check_fields(type(self), changes))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any):
        presets = cls.presets()
        if name not in presets:
            raise ValueError(f"unknown {cls.kind} preset {name!r}; presets: {sorted(presets)}")
        return dataclasses.replace(presets[name], **check_fields(cls, overrides))


@dataclass
class LibraConfig(LMConfig):
    # LLaMA backbone (HF LlamaConfig names where one exists).
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    intermediate_size: int = 11008
    text_vocab_size: int = 32000  # V_t: vision ids start here (official token_offset)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02

    # Visual expert and bridge (official LibraConfig names in comments).
    vision_down_ratio: int = 4  # expert rank = out_features // ratio (vision_down_ratio)
    bridge_rank: int = 8  # bridge_rank
    codebook_size: int = 512  # ids per codebook; vision vocab = codebook_size + 2 (BOI, EOI)
    num_codebooks: int = 2  # vision_codebook_num
    contiguous_signal_size: int = 4096  # CLIP feature channels fed beside the ids
    num_image_tokens: int = 576  # patches per image (image_feature_resolution ** 2)

    # Special text ids (LLaMA-2 SentencePiece).
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2
    newline_token_id: int = 13

    def __post_init__(self) -> None:
        problems = self._body_problems()
        if self.hidden_size % self.num_codebooks:
            problems.append(
                f"hidden_size {self.hidden_size} is not divisible by num_codebooks {self.num_codebooks} "
                "(each codebook embeds into hidden_size / num_codebooks channels)"
            )
        if self.vision_down_ratio < 1 or self.bridge_rank < 1:
            problems.append("vision_down_ratio and bridge_rank must be >= 1")
        self._raise(problems)

    @classmethod
    def presets(cls) -> dict[str, "LibraConfig"]:
        return PRESETS

    def expert_rank(self, out_features: int) -> int:
        """Rank of a vision expert projection (official LibraLinear: out_features // down_ratio)."""
        return max(1, out_features // self.vision_down_ratio)


PRESETS: dict[str, LibraConfig] = {
    "libra-7b": LibraConfig(),
    # head_dim 16; FFN 176 -> expert ranks 16 (attention, down) and 44 (gate/up); text vocab
    # sized for a small byte-fallback SentencePiece model (256 bytes + 3 specials + pieces).
    "tiny": LibraConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=176,
        text_vocab_size=320,
        contiguous_signal_size=192,
        num_image_tokens=64,
    ),
}

__all__ = ["LMConfig", "LibraConfig", "PRESETS"]
