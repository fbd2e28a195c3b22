"""Official and Hugging Face formats -> ours, as pure functions of dicts.

Nothing here reads a file or builds a model: state dicts in, state dicts out; parsed configs
in, our config out. The layouts are described in docs/official-formats.md#tokenizer-checkpoint:

  official `VQModel` (libra/models/libra/taming/models/vqgan.py)   ours (libra_tok.model)
  encoder.vision_tower.vision_model.*  HF CLIP, q/k/v separate  ->  encoder.tower.*  open_clip, in_proj fused
  quant_conv.*, quantize.*, post_quant_conv.*                   ->  quantizer.{quant_conv,lfq,post_quant_conv}.*
  decoder.*                                                     ->  decoder.*  (same names)
  loss.*  LPIPS + discriminator, training only                  ->  dropped

and the architecture of a CLIP: from an HF `config.json` (transformers' CLIPVisionConfig), or
from the tensor shapes of its weights.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from .config import TokenizerConfig, check_clip_vision, open_clip_name_for
from .weight_files import CheckpointError, sample_keys

OFFICIAL_CLIP_PREFIX = "encoder.vision_tower.vision_model."
OFFICIAL_EXAMPLE_KEYS = (
    OFFICIAL_CLIP_PREFIX + "embeddings.patch_embedding.weight",
    "quant_conv.weight",
    "quantize.project_in.weight",
    "decoder.conv_in.weight",
)
# Official top-level module -> ours (everything but the CLIP tower, which is renamed per key).
_OFFICIAL_PREFIXES = {
    "quant_conv.": "quantizer.quant_conv.",
    "quantize.": "quantizer.lfq.",
    "post_quant_conv.": "quantizer.post_quant_conv.",
    "decoder.": "decoder.",
}
# Names inside the official LFQ that our LFQ rebuilds (non-persistent there too) may appear.
_OFFICIAL_OPTIONAL = {"quantize.codebook", "quantize.zero"}


# ---- CLIP weights: HF naming -> open_clip naming -----------------------------------------------
_HF_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_HF_DIRECT = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
_HF_LAYER_SUB = {
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}


def hf_clip_vision_to_open_clip(hf: dict[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """HF CLIPVisionTransformer keys (relative to `vision_model.`) -> open_clip VisionTransformer.

    q/k/v projections are concatenated into `attn.in_proj_{weight,bias}` in that order, as
    nn.MultiheadAttention expects. `embeddings.position_ids` (a buffer) is dropped. Any key
    that has no open_clip counterpart is an error, so nothing is silently ignored.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in hf.items():
        if key == "embeddings.position_ids":
            continue
        if key in _HF_DIRECT:
            out[_HF_DIRECT[key]] = value
            continue
        match = _HF_LAYER.fullmatch(key)
        if match:
            layer, rest = int(match.group(1)), match.group(2)
            attn = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if attn:
                qkv.setdefault((layer, attn.group(2)), {})[attn.group(1)] = value
                continue
            if rest in _HF_LAYER_SUB:
                out[f"transformer.resblocks.{layer}.{_HF_LAYER_SUB[rest]}"] = value
                continue
        unknown.append(key)
    if unknown:
        raise CheckpointError(f"unrecognised CLIP vision keys in {source}: {sample_keys(unknown, 10)}")
    for (layer, kind), parts in sorted(qkv.items()):
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise CheckpointError(f"{source}: layer {layer} lacks self_attn.{missing[0]}_proj.{kind}")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


def clip_state_dict_to_open_clip(sd: dict[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """Vision-tower weights in open_clip naming from open_clip, HF or official-Libra naming."""
    for prefix in (OFFICIAL_CLIP_PREFIX, "vision_model."):
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if sub:
            out = hf_clip_vision_to_open_clip(sub, source)
            if "visual_projection.weight" in sd:  # HF CLIPModel: Linear(width -> embed), no bias
                out["proj"] = sd["visual_projection.weight"].t()
            return out
    if "embeddings.patch_embedding.weight" in sd:  # HF vision tower without its prefix
        return hf_clip_vision_to_open_clip(sd, source)
    if any(k.startswith("visual.") for k in sd):
        return {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    if "conv1.weight" in sd:
        return dict(sd)
    raise CheckpointError(
        f"no CLIP vision weights found in {source}: expected keys starting with 'vision_model.' "
        f"(HF), 'visual.' (open_clip) or '{OFFICIAL_CLIP_PREFIX}' (official Libra); found {sample_keys(sd)}"
    )


def is_official_state(sd: dict[str, Any]) -> bool:
    """Whether a state dict has the official `VQModel` layout (a CLIP tower and `quant_conv`)."""
    return any(k.startswith(OFFICIAL_CLIP_PREFIX) for k in sd) and "quant_conv.weight" in sd


def official_to_ours(sd: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename an official `VQModel` state dict to ours; `loss.*` is dropped, nothing else."""
    clip = {k[len(OFFICIAL_CLIP_PREFIX):]: v for k, v in sd.items() if k.startswith(OFFICIAL_CLIP_PREFIX)}
    out = {"encoder.tower." + k: v for k, v in hf_clip_vision_to_open_clip(clip, source).items()}
    unconsumed = []
    for key, value in sd.items():
        if key.startswith(OFFICIAL_CLIP_PREFIX) or key.startswith("loss."):
            continue
        prefix = next((p for p in _OFFICIAL_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            unconsumed.append(key)
        elif key not in _OFFICIAL_OPTIONAL:
            out[_OFFICIAL_PREFIXES[prefix] + key[len(prefix):]] = value
    if unconsumed:
        raise CheckpointError(
            f"{source}: keys outside the official Libra tokenizer layout: {sample_keys(unconsumed, 10)} "
            f"(expected only {', '.join(repr(p + '*') for p in ['loss.', OFFICIAL_CLIP_PREFIX, *_OFFICIAL_PREFIXES])})"
        )
    return out


# ---- the architecture of a CLIP ----------------------------------------------------------------
# transformers' CLIPVisionConfig defaults: a config.json leaves out what equals them.
_HF_VISION_DEFAULTS = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                       "num_attention_heads": 12, "num_channels": 3, "image_size": 224, "patch_size": 32,
                       "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
# HF activation -> (QuickGELU?, open_clip act_kwargs for nn.GELU).
_HF_ACTIVATIONS = {"quick_gelu": (True, None), "gelu": (False, None), "gelu_new": (False, {"approximate": "tanh"}),
                   "gelu_pytorch_tanh": (False, {"approximate": "tanh"})}
# The head width assumed when only tensor shapes are known: every OpenAI CLIP ViT has 64.
ASSUMED_HEAD_WIDTH = 64


def _mlp_ratio(width: int, mlp_width: int) -> float:
    """The open_clip mlp_ratio that gives `mlp_width` (open_clip builds int(width * mlp_ratio))."""
    ratio = mlp_width / width
    return ratio if int(width * ratio) == mlp_width else (mlp_width + 0.5) / width


def clip_fields(label: str, vision: dict[str, Any], quick_gelu: bool) -> dict[str, Any]:
    """The TokenizerConfig fields of a CLIP tower (`clip_model`, `clip_vision`, `clip_quick_gelu`):
    the registered open_clip name when one has exactly this tower, else `label` with the tower
    described in `clip_vision`."""
    name = open_clip_name_for(vision)
    if name is not None:
        return {"clip_model": name, "clip_vision": None, "clip_quick_gelu": quick_gelu}
    return {"clip_model": label, "clip_vision": check_clip_vision(vision), "clip_quick_gelu": quick_gelu}


def clip_fields_from_hf_config(hf: dict[str, Any], label: str, source: str = "config.json") -> dict[str, Any]:
    """TokenizerConfig CLIP fields from a parsed HF CLIP `config.json`: a CLIPModel's (its
    `vision_config`) or a CLIPVisionModel's (the keys at top level)."""
    if not isinstance(hf, dict):
        raise CheckpointError(f"{source} holds a JSON {type(hf).__name__}, not an HF CLIP config")
    vision = hf.get("vision_config") if isinstance(hf.get("vision_config"), dict) else hf
    model_type = hf.get("model_type")
    if model_type not in (None, "clip", "clip_vision_model") or "hidden_size" not in vision:
        raise CheckpointError(f"{source} is not an HF CLIP config (model_type {model_type!r}); expected the "
                              f"config.json of a CLIPModel or CLIPVisionModel, with vision_config or hidden_size")
    v = {**_HF_VISION_DEFAULTS, **vision}
    act = v["hidden_act"]
    if act not in _HF_ACTIVATIONS:
        raise CheckpointError(f"{source}: hidden_act {act!r} has no open_clip equivalent here; "
                              f"supported: {sorted(_HF_ACTIVATIONS)}")
    if int(v["num_channels"]) != 3:
        raise CheckpointError(f"{source}: num_channels {v['num_channels']}; the tokenizer reads RGB images (3)")
    width, heads = int(v["hidden_size"]), int(v["num_attention_heads"])
    if width % heads:
        raise CheckpointError(f"{source}: hidden_size {width} does not split into {heads} attention heads")
    quick_gelu, act_kwargs = _HF_ACTIVATIONS[act]
    eps = float(v["layer_norm_eps"])
    described = {
        "width": width,
        "layers": int(v["num_hidden_layers"]),
        "head_width": width // heads,
        "mlp_ratio": _mlp_ratio(width, int(v["intermediate_size"])),
        "patch_size": int(v["patch_size"]),
        "image_size": int(v["image_size"]),
        "norm_kwargs": None if eps == 1e-5 else {"eps": eps},  # open_clip's LayerNorm default is 1e-5
        "act_kwargs": act_kwargs,
    }
    return clip_fields(label, described, quick_gelu)


def clip_vision_from_shapes(sd: dict[str, torch.Tensor], source: str = "state dict") -> dict[str, Any]:
    """The open_clip vision_cfg of a CLIP ViT from the shapes of its open_clip-named weights
    (`clip_state_dict_to_open_clip`): width, blocks, patch size, image size (from the position
    embedding) and MLP width. Shapes cannot tell the number of heads: it is taken as width / 64
    (ASSUMED_HEAD_WIDTH), nor the activation: callers say so."""
    needed = ("conv1.weight", "positional_embedding", "transformer.resblocks.0.mlp.c_fc.weight")
    missing = [k for k in needed if k not in sd]
    if missing:
        raise CheckpointError(f"{source}: cannot tell the CLIP architecture without {missing} "
                              f"(found {sample_keys(sd)})")
    width, _, patch, _ = sd["conv1.weight"].shape
    grid = math.isqrt(sd["positional_embedding"].shape[0] - 1)
    if grid * grid + 1 != sd["positional_embedding"].shape[0]:
        raise CheckpointError(f"{source}: {sd['positional_embedding'].shape[0]} position embeddings are not a square "
                              f"grid plus the class token")
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"transformer\.resblocks\.(\d+)\.", k))}
    if not blocks or sorted(blocks) != list(range(len(blocks))):
        raise CheckpointError(f"{source}: the CLIP blocks are not numbered 0..n-1 (found {sorted(blocks)[:8]})")
    if width % ASSUMED_HEAD_WIDTH:
        raise CheckpointError(f"{source}: a CLIP of width {width} has no heads of {ASSUMED_HEAD_WIDTH} channels, "
                              f"so its number of heads cannot be assumed; give its HF CLIP folder with its config.json "
                              f"(load_official(..., clip=FOLDER), CLI --clip FOLDER)")
    mlp_width = sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0]
    return {"width": int(width), "layers": len(blocks), "head_width": ASSUMED_HEAD_WIDTH,
            "mlp_ratio": _mlp_ratio(int(width), int(mlp_width)), "patch_size": int(patch),
            "image_size": int(grid * patch)}


# ---- the official vision_tokenizer_config.yaml ------------------------------------------------
def config_from_official_yaml(data: dict[str, Any], clip: dict[str, Any],
                              source: str = "vision_tokenizer_config.yaml") -> TokenizerConfig:
    """TokenizerConfig from the parsed official vision_tokenizer_config.yaml (read by the official
    `LibraTokenizer.init_image_tokenizer`, libra/models/libra/tokenization_libra.py) and the CLIP
    fields of its `encoder_name` (see clip_fields). The LFQ loss weights are not in the yaml:
    the official `VQModel` hard-codes the values that are our defaults."""
    params = data.get("params") if isinstance(data, dict) else None
    dd = params.get("ddconfig") if isinstance(params, dict) else None
    if not dd:
        raise CheckpointError(f"{source} has no params.ddconfig section; is it a Libra vision_tokenizer_config.yaml?")
    codebook_size = int(params.get("codebook_size", 512))
    return TokenizerConfig(
        **clip,
        clip_pretrained=None,
        feature_layers=tuple(dd["select_layer"]),
        resolution=int(dd["resolution"]),
        embed_dim=int(params["embed_dim"]),
        codebook_bits=codebook_size.bit_length() - 1,
        num_codebooks=int(params.get("num_codebook", 2)),
        z_channels=int(dd["z_channels"]),
        ch=int(dd["ch"]),
        ch_mult=tuple(dd["ch_mult"]),
        num_res_blocks=int(dd["num_res_blocks"]),
        attn_resolutions=tuple(dd["attn_resolutions"]),
        num_attn_heads=int(dd.get("num_attn_head", 1)),
        dropout=float(dd.get("dropout", 0.0)),
        out_ch=int(dd.get("out_ch", 3)),
    )


__all__ = [
    "OFFICIAL_CLIP_PREFIX",
    "OFFICIAL_EXAMPLE_KEYS",
    "ASSUMED_HEAD_WIDTH",
    "hf_clip_vision_to_open_clip",
    "clip_state_dict_to_open_clip",
    "is_official_state",
    "official_to_ours",
    "clip_fields",
    "clip_fields_from_hf_config",
    "clip_vision_from_shapes",
    "config_from_official_yaml",
]
