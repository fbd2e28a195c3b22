"""Tokenizer configuration: one dataclass, named presets.

`libra-l336` is the official Libra vision tokenizer (vision_tokenizer_config.yaml of the
released model plus the LFQ weights hard-coded in the official `VQModel`). `tiny` keeps the
same structure (multi-layer CLIP features, 2 x 9-bit LFQ, taming decoder with a fractional
last upsample) at a size that trains on a laptop CPU in minutes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_CLIP_CONFIG_DIR = Path(__file__).parent / "clip_configs"


@lru_cache(maxsize=None)
def _register_clip_configs() -> None:
    # The tiny preset's ViT lives in our package, registered with open_clip like any
    # built-in model so that `open_clip.create_model("libra-tiny-vit")` works too.
    import open_clip

    open_clip.add_model_config(_CLIP_CONFIG_DIR)


def clip_vision_config(name: str) -> dict[str, Any]:
    """The open_clip `vision_cfg` of model `name` (our tiny ViT included)."""
    import open_clip

    _register_clip_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        known = ", ".join(sorted(open_clip.list_models())[:12])
        raise ValueError(
            f"unknown open_clip model {name!r}; use a name from open_clip.list_models() "
            f"(e.g. {known}, ...) or register a config with open_clip.add_model_config"
        )
    return cfg


def check_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """`data` if every key names a field of dataclass `cls`, else a ValueError listing them."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(names)}")
    return data


@dataclass
class TokenizerConfig:
    # Frozen CLIP encoder (open_clip).
    clip_model: str = "ViT-L-14-336"
    # Where fresh CLIP weights come from when a tokenizer is built from a config: an
    # open_clip tag ("openai"), a local file (open_clip or HF CLIP state dict), an HF CLIP
    # folder, or None for random weights. Not used when loading a saved tokenizer.
    clip_pretrained: str | None = "openai"
    # OpenAI CLIP was trained with QuickGELU; open_clip needs force_quick_gelu=True for it.
    clip_quick_gelu: bool = True
    # 1-based, as HF `hidden_states[k]` (= output of transformer block k); official [2,10,18,22].
    feature_layers: tuple[int, ...] = (2, 10, 18, 22)
    resolution: int = 336

    # Quantizer: 1x1 conv to embed_dim, LFQ with num_codebooks x codebook_bits bits.
    embed_dim: int = 1024
    codebook_bits: int = 9
    num_codebooks: int = 2
    # LFQ auxiliary loss, official VQModel values (reference 1.4).
    entropy_loss_weight: float = 0.1
    commitment_loss_weight: float = 1.0
    diversity_gamma: float = 2.5
    inv_temperature: float = 100.0

    # Decoder (taming layout, official ddconfig).
    z_channels: int = 1024
    ch: int = 128
    ch_mult: tuple[int, ...] = (1, 1, 2, 4, 8)
    num_res_blocks: int = 2
    attn_resolutions: tuple[int, ...] = (24,)
    num_attn_heads: int = 8
    dropout: float = 0.0
    norm_groups: int = 32
    out_ch: int = 3

    # Preprocessing: "pad" = official expand2square on the CLIP-mean colour; "crop" = centre crop.
    pad_mode: str = "pad"
    image_mean: tuple[float, float, float] = CLIP_MEAN
    image_std: tuple[float, float, float] = CLIP_STD

    def __post_init__(self) -> None:
        # JSON round trips give lists; keep tuples so configs compare and hash equal.
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        if self.pad_mode not in ("pad", "crop"):
            raise ValueError(f"pad_mode must be 'pad' or 'crop', got {self.pad_mode!r}")
        if not self.feature_layers:
            raise ValueError("feature_layers must name at least one CLIP block")

    # ---- derived quantities -------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return 2**self.codebook_bits

    @property
    def num_bits(self) -> int:
        return self.codebook_bits * self.num_codebooks

    @property
    def clip_vision_cfg(self) -> dict[str, Any]:
        return clip_vision_config(self.clip_model)["vision_cfg"]

    @property
    def clip_width(self) -> int:
        return int(self.clip_vision_cfg["width"])

    @property
    def patch_size(self) -> int:
        return int(self.clip_vision_cfg["patch_size"])

    @property
    def grid_size(self) -> int:
        return self.resolution // self.patch_size

    @property
    def num_tokens(self) -> int:
        return self.grid_size**2

    @property
    def feature_dim(self) -> int:
        """Channels of the contiguous signal: CLIP width x number of feature layers."""
        return self.clip_width * len(self.feature_layers)

    # ---- (de)serialisation --------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TokenizerConfig":
        return cls(**check_fields(cls, data))

    def replace(self, **changes: Any) -> "TokenizerConfig":
        return dataclasses.replace(self, **changes)

    def architecture_hash(self) -> str:
        """sha256 of everything that changes ids or features (not where weights came from)."""
        d = self.to_dict()
        d.pop("clip_pretrained")
        blob = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> "TokenizerConfig":
        if name not in PRESETS:
            raise ValueError(f"unknown tokenizer preset {name!r}; presets: {sorted(PRESETS)}")
        return dataclasses.replace(PRESETS[name], **overrides)


def _jsonable(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


PRESETS: dict[str, TokenizerConfig] = {
    "libra-l336": TokenizerConfig(),
    # 112 px, 14 px patches -> 8x8 grid; decoder 8 -> 16 -> 32 -> x3.5 -> 112, so the
    # fractional last upsample of the official decoder (x1.75 there) is exercised too.
    "tiny": TokenizerConfig(
        clip_model="libra-tiny-vit",
        clip_pretrained=None,
        feature_layers=(1, 2, 3),
        resolution=112,
        embed_dim=64,
        z_channels=64,
        ch=32,
        ch_mult=(1, 1, 2, 2),
        num_res_blocks=1,
        attn_resolutions=(8,),
        num_attn_heads=4,
    ),
}

__all__ = ["TokenizerConfig", "PRESETS", "CLIP_MEAN", "CLIP_STD", "clip_vision_config", "check_fields"]
