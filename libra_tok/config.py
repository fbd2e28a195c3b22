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
    """The open_clip model config (`embed_dim`, `vision_cfg`, ...) of model `name` (our tiny ViT
    included)."""
    import open_clip

    _register_clip_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        known = ", ".join(sorted(open_clip.list_models())[:12])
        raise ValueError(
            f"unknown open_clip model {name!r}; use a name from open_clip.list_models() "
            f"(e.g. {known}, ...), an HF CLIP folder, or describe the tower with TokenizerConfig.clip_vision"
        )
    return cfg


# The open_clip `vision_cfg` keys a plain CLIP ViT needs (what an HF CLIPVisionConfig can say);
# `TokenizerConfig.clip_vision` holds only these. Defaults are open_clip's (CLIPVisionCfg).
CLIP_VISION_KEYS = ("width", "layers", "head_width", "mlp_ratio", "patch_size", "image_size", "norm_kwargs",
                    "act_kwargs")
_CLIP_VISION_DEFAULTS = {"head_width": 64, "mlp_ratio": 4.0, "norm_kwargs": None, "act_kwargs": None}
_CLIP_VISION_REQUIRED = ("width", "layers", "patch_size", "image_size")


def check_clip_vision(vision: dict[str, Any]) -> dict[str, Any]:
    """`vision` (a `clip_vision` value) with open_clip's defaults filled in, or a ValueError
    saying which key is missing, unknown or of the wrong kind."""
    if not isinstance(vision, dict):
        raise ValueError(f"clip_vision must be a dict of open_clip vision_cfg keys, got {type(vision).__name__}")
    unknown = sorted(set(vision) - set(CLIP_VISION_KEYS))
    missing = [k for k in _CLIP_VISION_REQUIRED if k not in vision]
    problems = ([f"unknown key(s) {unknown}"] if unknown else []) + ([f"missing key(s) {missing}"] if missing else [])
    if problems:
        raise ValueError(f"clip_vision: {'; '.join(problems)}; it takes {list(CLIP_VISION_KEYS)}, of which "
                         f"{list(_CLIP_VISION_REQUIRED)} are required")
    full = {**_CLIP_VISION_DEFAULTS, **vision}
    for key in ("width", "layers", "head_width", "patch_size", "image_size"):
        value = full[key]
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise ValueError(f"clip_vision[{key!r}] must be a positive integer, got {value!r}")
    if full["width"] % full["head_width"]:
        raise ValueError(f"clip_vision: width {full['width']} does not split into heads of {full['head_width']}")
    if not isinstance(full["mlp_ratio"], (int, float)) or isinstance(full["mlp_ratio"], bool) or full["mlp_ratio"] <= 0:
        raise ValueError(f"clip_vision['mlp_ratio'] must be a positive number, got {full['mlp_ratio']!r}")
    for key in ("norm_kwargs", "act_kwargs"):
        if full[key] is not None and not isinstance(full[key], dict):
            raise ValueError(f"clip_vision[{key!r}] must be a dict or None, got {full[key]!r}")
    full["mlp_ratio"] = float(full["mlp_ratio"])  # 4 and 4.0 must hash alike
    return {k: full[k] for k in CLIP_VISION_KEYS}


def open_clip_name_for(vision: dict[str, Any]) -> str | None:
    """The first registered open_clip model (in name order) whose vision tower is the plain ViT
    `vision` describes, or None. Naming a known tower keeps configs (and their architecture
    hash) equal however the architecture was found: a preset, an HF config.json, or shapes."""
    import open_clip

    _register_clip_configs()
    wanted = check_clip_vision(vision)
    if wanted["norm_kwargs"] or wanted["act_kwargs"]:
        return None
    plain = set(CLIP_VISION_KEYS) - {"norm_kwargs", "act_kwargs"}
    for name in sorted(open_clip.list_models()):
        candidate = (open_clip.get_model_config(name) or {}).get("vision_cfg") or {}
        if not set(candidate) <= plain or not set(_CLIP_VISION_REQUIRED) <= set(candidate):
            continue  # a timm tower, extra options (layer scale, no ln_pre, pooling, ...), or incomplete
        try:
            if check_clip_vision(candidate) == wanted:
                return name
        except ValueError:
            continue
    return None


def check_fields(cls: type, data: dict[str, Any]) -> dict[str, Any]:
    """`data` if every key names a field of dataclass `cls`, else a ValueError listing them."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ValueError(f"unknown {cls.__name__} field(s) {unknown}; known fields: {sorted(names)}")
    return data


@dataclass
class TokenizerConfig:
    # Frozen CLIP encoder (open_clip): a registered open_clip model name, or, when `clip_vision`
    # is given, a label for the tower it describes (e.g. the HF CLIP folder's name).
    clip_model: str = "ViT-L-14-336"
    # Where fresh CLIP weights come from when a tokenizer is built from a config: an
    # open_clip tag ("openai"), a local file (open_clip or HF CLIP state dict), an HF CLIP
    # folder, or None for random weights. Not used when loading a saved tokenizer.
    clip_pretrained: str | None = "openai"
    # OpenAI CLIP was trained with QuickGELU; open_clip needs force_quick_gelu=True for it.
    clip_quick_gelu: bool = True
    # The CLIP ViT's architecture when open_clip has no registered name for it (a CLIP read from
    # an HF config.json or from a checkpoint's tensor shapes): open_clip `vision_cfg` keys, see
    # CLIP_VISION_KEYS. None: `clip_model` is a registered open_clip model. Left out of
    # to_dict() when None, so configs written before this field existed stay byte-identical.
    clip_vision: dict[str, Any] | None = None
    # 1-based, as HF `hidden_states[k]` (= output of transformer block k); official [2,10,18,22].
    feature_layers: tuple[int, ...] = (2, 10, 18, 22)
    resolution: int = 336

    # Quantizer: 1x1 conv to embed_dim, LFQ with num_codebooks x codebook_bits bits.
    embed_dim: int = 1024
    codebook_bits: int = 9
    num_codebooks: int = 2
    # LFQ auxiliary loss: the values hard-coded in the official `VQModel`
    # (libra/models/libra/taming/models/vqgan.py; docs/official-formats.md#tokenizer-behaviour).
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
        if self.clip_vision is not None:  # stored complete, open_clip's defaults filled in
            object.__setattr__(self, "clip_vision", check_clip_vision(self.clip_vision))

    # ---- derived quantities -------------------------------------------------------------
    @property
    def codebook_size(self) -> int:
        return 2**self.codebook_bits

    @property
    def num_bits(self) -> int:
        return self.codebook_bits * self.num_codebooks

    @property
    def clip_vision_cfg(self) -> dict[str, Any]:
        """The open_clip `vision_cfg` of the CLIP tower."""
        if self.clip_vision is not None:
            return {k: v for k, v in self.clip_vision.items() if v is not None}
        return clip_vision_config(self.clip_model)["vision_cfg"]

    @property
    def clip_embed_dim(self) -> int:
        """open_clip's `embed_dim` (the projection width; the projection itself is pruned)."""
        if self.clip_vision is not None:
            return int(self.clip_vision["width"])
        return int(clip_vision_config(self.clip_model)["embed_dim"])

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
        out = {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}
        if out["clip_vision"] is None:
            del out["clip_vision"]
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TokenizerConfig":
        return cls(**check_fields(cls, data))

    def replace(self, **changes: Any) -> "TokenizerConfig":
        return dataclasses.replace(self, **changes)

    def architecture_hash(self) -> str:
        """sha256 of everything that changes ids or features (not where weights came from, nor
        the label of a tower described by `clip_vision`)."""
        d = self.to_dict()
        d.pop("clip_pretrained")
        if self.clip_vision is not None:
            d.pop("clip_model")
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

__all__ = ["TokenizerConfig", "PRESETS", "CLIP_MEAN", "CLIP_STD", "CLIP_VISION_KEYS", "clip_vision_config",
           "check_clip_vision", "open_clip_name_for", "check_fields"]
