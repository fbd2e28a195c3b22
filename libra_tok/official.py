"""The official Libra tokenizer folder -> our TokenizerConfig and state dict.

An official folder (`YifanXu/libra-vision-tokenizer`, or an LM folder such as `libra-11b-chat`)
holds `vqgan.ckpt` and `vision_tokenizer_config.yaml`; the yaml's `params.ddconfig.encoder_name`
names a CLIP folder beside them (an HF CLIP `config.json` + weights) that the official loader
builds the CLIP tower from (`libra/models/libra/clip_encoder.py`), before the CLIP tensors of
`vqgan.ckpt` overwrite its weights (`libra/models/libra/taming/models/vqgan.py`). So the folder
gives the CLIP architecture and `vqgan.ckpt` every weight. When the folder is absent, the
architecture comes from the checkpoint's tensor shapes. See
docs/official-formats.md#tokenizer-checkpoint. Building the model is `libra_tok.checkpoint`'s.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .config import TokenizerConfig, clip_vision_config
from .conversions import (
    OFFICIAL_EXAMPLE_KEYS,
    clip_fields,
    clip_fields_from_hf_config,
    clip_state_dict_to_open_clip,
    clip_vision_from_shapes,
    config_from_official_yaml,
    is_official_state,
    official_to_ours,
)
from .hub import CLIP_ARCHITECTURE, label_for, resolve
from .weight_files import CheckpointError, read_state_dict, sample_keys, weights_in_folder

log = logging.getLogger("libra_tok.official")

CHECKPOINT_FILE = "vqgan.ckpt"
CONFIG_FILE = "vision_tokenizer_config.yaml"
# The CLIP folder the official release names (a copy of HF `openai/clip-vit-large-patch14-336`,
# which users add themselves): its architecture is known, so the folder need not be present.
KNOWN_OFFICIAL_CLIPS = {"openai-clip-vit-large-patch14-336": "ViT-L-14-336"}
_WEIGHT_SUFFIXES = (".bin", ".pt", ".pth", ".safetensors", ".ckpt")


@dataclass
class OfficialTokenizer:
    """What an official folder holds, in our terms."""

    config: TokenizerConfig
    state: dict[str, torch.Tensor]  # our names (libra_tok.conversions.official_to_ours)
    source: str  # the vqgan.ckpt read
    hint: str  # what to try when the state does not fit the config


def find_official_files(path: str | Path) -> tuple[Path, Path | None]:
    """(vqgan.ckpt, vision_tokenizer_config.yaml or None) from a file or an official folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        ckpt = path / CHECKPOINT_FILE
        if not ckpt.is_file():
            raise FileNotFoundError(
                f"{path} has no {CHECKPOINT_FILE}; expected an official Libra folder ({CHECKPOINT_FILE} + "
                f"{CONFIG_FILE}, e.g. YifanXu/libra-vision-tokenizer) or the .ckpt file itself"
            )
    elif path.is_file():
        ckpt = path
    else:
        raise FileNotFoundError(f"official tokenizer checkpoint {path} does not exist")
    yaml_path = ckpt.parent / CONFIG_FILE
    return ckpt, (yaml_path if yaml_path.is_file() else None)


def _read_yaml(path: Path) -> dict[str, Any]:
    import yaml

    try:
        data = yaml.safe_load(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid YAML ({exc}); download it again") from None
    return data if isinstance(data, dict) else {}


def _read_hf_config(folder: Path) -> dict[str, Any]:
    path = folder / "config.json"
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); download the CLIP folder again") from None


def _clip_from_shapes(tower: dict[str, torch.Tensor], label: str, source: str, quick_gelu: bool) -> dict[str, Any]:
    """CLIP fields from open_clip-named tower weights, saying what had to be assumed."""
    vision = clip_vision_from_shapes(tower, source)
    fields = clip_fields(label, vision, quick_gelu)
    log.warning(
        "%s: CLIP architecture read from tensor shapes: width %d, %d blocks, %d px patches at %d px, MLP width %d; "
        "assumed %d heads (width / %d) and %s. For an exact architecture give the HF CLIP folder (its "
        "config.json): clip=PATH, CLI --clip PATH.",
        source, vision["width"], vision["layers"], vision["patch_size"], vision["image_size"],
        int(vision["width"] * vision["mlp_ratio"]), vision["width"] // vision["head_width"], vision["head_width"],
        "QuickGELU (OpenAI CLIP)" if quick_gelu else "GELU",
    )
    return fields


def clip_from_argument(clip: str | Path, quick_gelu: bool = True, *, trust_pickle: bool = False) -> dict[str, Any]:
    """TokenizerConfig CLIP fields from what a user gave as `clip`: an open_clip model name, an HF
    CLIP folder (its config.json; without one, the shapes of its weights) or its Hub id
    (libra_tok.hub), or a weights file (the shapes of its CLIP tensors; `quick_gelu` is then
    assumed, as shapes cannot tell)."""
    path = resolve(clip, CLIP_ARCHITECTURE)
    label = path.stem  # a weights file is labelled by its name, a folder's by the folder's
    if path.is_dir():
        if (path / "config.json").is_file():
            return clip_fields_from_hf_config(_read_hf_config(path), label_for(clip, path), str(path / "config.json"))
        weights = weights_in_folder(path)
        if weights is None:
            raise FileNotFoundError(f"CLIP folder {path} holds neither config.json nor a weights file "
                                    f"(model.safetensors, pytorch_model.bin, ...); pass an HF CLIP folder")
        path, label = weights, label_for(clip, path)
    if path.is_file():
        tower = clip_state_dict_to_open_clip(read_state_dict(path, trust_pickle=trust_pickle), str(path))
        return _clip_from_shapes(tower, label, str(path), quick_gelu)
    if any(sep in str(clip) for sep in ("/", "\\")) or path.suffix in _WEIGHT_SUFFIXES:
        raise FileNotFoundError(f"CLIP folder or weights file {clip} does not exist")
    clip_vision_config(str(clip))  # a ValueError listing names when open_clip does not know it
    return {"clip_model": str(clip), "clip_vision": None}


def clip_of_encoder_name(encoder_name: str, model_folder: Path, tower: dict[str, torch.Tensor],
                         source: str) -> dict[str, Any]:
    """TokenizerConfig CLIP fields of the yaml's `encoder_name`: the HF config.json of the folder it
    names (joined to the model folder, as the official loader does); else the known CLIP of the
    official release; else the shapes of the checkpoint's CLIP tensors (`tower`, open_clip names)."""
    folder = model_folder / str(encoder_name)
    label = Path(str(encoder_name)).name or "clip"
    if (folder / "config.json").is_file():
        return clip_fields_from_hf_config(_read_hf_config(folder), label, str(folder / "config.json"))
    if label in KNOWN_OFFICIAL_CLIPS:
        return {"clip_model": KNOWN_OFFICIAL_CLIPS[label], "clip_vision": None}
    return _clip_from_shapes(tower, label, f"{source} (no CLIP folder {folder})", quick_gelu=True)


def read_official(path: str | Path, clip: str | Path | None = None, config: TokenizerConfig | str | None = None,
                  *, trust_pickle: bool = False) -> OfficialTokenizer:
    """Read an official `vqgan.ckpt` (or its folder) as our config and state dict.

    config: a TokenizerConfig or preset name; default: the folder's vision_tokenizer_config.yaml
        with the CLIP its `encoder_name` names, else the `libra-l336` preset.
    clip: the CLIP architecture, overriding the config's: an open_clip model name, an HF CLIP
        folder or a weights file (see clip_from_argument). The CLIP weights always come from
        vqgan.ckpt, as in the official loader.
    trust_pickle: allow Python objects besides tensors in the pickle (only for files you trust).
    """
    ckpt, yaml_path = find_official_files(path)
    if isinstance(config, str):
        config = TokenizerConfig.from_preset(config)
    raw = read_state_dict(ckpt, trust_pickle=trust_pickle)
    if not is_official_state(raw):
        raise CheckpointError(
            f"{ckpt} is not an official Libra tokenizer checkpoint: expected keys such as "
            f"{sample_keys(OFFICIAL_EXAMPLE_KEYS)}; found {sample_keys(raw)}"
        )
    state = official_to_ours(raw, str(ckpt))
    tower = {k[len("encoder.tower."):]: v for k, v in state.items() if k.startswith("encoder.tower.")}

    if config is None and yaml_path is not None:
        data = _read_yaml(yaml_path)
        if clip is not None:
            fields = clip_from_argument(clip, trust_pickle=trust_pickle)
        else:
            params = data.get("params") if isinstance(data.get("params"), dict) else {}
            dd = params.get("ddconfig") if isinstance(params.get("ddconfig"), dict) else {}
            fields = clip_of_encoder_name(dd.get("encoder_name", ""), yaml_path.parent, tower, str(ckpt))
        config = config_from_official_yaml(data, fields, str(yaml_path))
    else:
        config = config if config is not None else TokenizerConfig.from_preset("libra-l336")
        if clip is not None:
            config = config.replace(**clip_from_argument(clip, config.clip_quick_gelu, trust_pickle=trust_pickle))
    config = config.replace(clip_pretrained=None)

    mask = state.get("quantizer.lfq.mask")
    expected_mask = 2 ** torch.arange(config.codebook_bits - 1, -1, -1)
    if mask is not None and not torch.equal(mask.long(), expected_mask):
        raise CheckpointError(f"{ckpt}: quantize.mask is {mask.tolist()}, expected MSB-first {expected_mask.tolist()}")
    hint = (f"The model was built for clip {config.clip_model}, resolution {config.resolution}, embed_dim "
            f"{config.embed_dim}, ch {config.ch}, ch_mult {list(config.ch_mult)}; if the checkpoint has other "
            f"dimensions pass its config (config=..., CLI --config/--preset).")
    return OfficialTokenizer(config, state, str(ckpt), hint)


__all__ = ["OfficialTokenizer", "find_official_files", "read_official", "clip_from_argument", "clip_of_encoder_name",
           "KNOWN_OFFICIAL_CLIPS", "CHECKPOINT_FILE", "CONFIG_FILE"]
