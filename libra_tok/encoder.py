"""The frozen CLIP encoder: multi-layer patch features of an open_clip ViT.

Official behaviour (`libra/models/libra/clip_encoder.py`; docs/official-formats.md#tokenizer-behaviour):
run CLIP, take HF `hidden_states[k]` for k in `select_layer` = [2, 10, 18, 22], concatenate on
channels, drop the CLS token. HF's `hidden_states[0]` is the pre-LayerNorm'd embedding and
`hidden_states[k]` the output of encoder layer k (1-based), which is open_clip's
`transformer.resblocks[k - 1]`. Blocks after the last selected one never influence the
features, so they are pruned (for libra-l336, 2 of 24 blocks and the final
LayerNorm/projection: ~8 % less compute than a full forward).
"""

from __future__ import annotations

import torch
from torch import nn

from .config import TokenizerConfig
from .conversions import clip_state_dict_to_open_clip
from .hub import CLIP_WEIGHTS, resolve
from .weight_files import read_state_dict, weights_in_folder


def build_clip_tower(config: TokenizerConfig) -> nn.Module:
    """The open_clip VisionTransformer of `config` with random weights (no text tower is built):
    a registered open_clip model, or the tower `config.clip_vision` describes."""
    from open_clip.model import _build_vision_tower

    return _build_vision_tower(config.clip_embed_dim, config.clip_vision_cfg, quick_gelu=config.clip_quick_gelu)


def pretrained_clip_state_dict(clip_model: str, source: str, quick_gelu: bool = True, *,
                               trust_pickle: bool = False) -> dict:
    """Vision-tower weights in open_clip naming from an open_clip tag, a file or an HF folder.

    Accepted sources: an open_clip pretrained tag (e.g. "openai"; open_clip fetches or reads
    its cache), a state-dict file (open_clip full model or visual tower, HF CLIPModel or
    CLIPVisionModel, or an official Libra vqgan.ckpt) as .safetensors/.bin/.pt/.ckpt, or an
    HF CLIP folder holding model.safetensors or pytorch_model.bin, or its Hub id (e.g.
    openai/clip-vit-large-patch14-336; libra_tok.hub). trust_pickle: allow Python objects
    besides tensors in a pickled file (only for files you trust).
    """
    path = resolve(source, CLIP_WEIGHTS)
    if path.is_dir():
        weights = weights_in_folder(path)
        if weights is not None:
            return clip_state_dict_to_open_clip(read_state_dict(weights, trust_pickle=trust_pickle),
                                                source=str(weights))
        raise FileNotFoundError(
            f"CLIP folder {path} holds no model.safetensors, pytorch_model.bin or "
            f"open_clip_pytorch_model.bin; point --clip-weights at the weights file instead"
        )
    if path.is_file():
        return clip_state_dict_to_open_clip(read_state_dict(path, trust_pickle=trust_pickle), source=str(path))
    if any(sep in source for sep in ("/", "\\")) or path.suffix in (".bin", ".pt", ".pth", ".safetensors", ".ckpt"):
        raise FileNotFoundError(f"CLIP weights file {source} does not exist")

    import open_clip

    try:
        model = open_clip.create_model(clip_model, pretrained=source, force_quick_gelu=quick_gelu)
    except Exception as exc:  # network, cache or tag errors: one actionable message
        raise OSError(
            f"could not load CLIP weights {clip_model!r} pretrained={source!r}: {exc}\n"
            f"Without network access, download the weights once elsewhere and pass the file "
            f"or folder instead of the tag, e.g. open_clip's 'open_clip_pytorch_model.bin' for "
            f"{clip_model}/{source} or the HF folder 'openai/clip-vit-large-patch14-336' (or that Hub id, from "
            f"the Hub cache) (TokenizerConfig.clip_pretrained; CLI: libra-tok train --clip-weights PATH|ID)."
        ) from exc
    return model.visual.state_dict()


class ClipFeatureEncoder(nn.Module):
    """Frozen CLIP ViT -> (B, grid*grid, width * len(feature_layers)) patch features.

    load_weights: load config.clip_pretrained (if set); trust_pickle: allow Python objects
    besides tensors in that file (only for files you trust)."""

    def __init__(self, config: TokenizerConfig, load_weights: bool = True, *, trust_pickle: bool = False):
        super().__init__()
        tower = build_clip_tower(config)
        num_blocks = len(tower.transformer.resblocks)
        bad = [k for k in config.feature_layers if not 1 <= k <= num_blocks]
        if bad:
            raise ValueError(
                f"feature_layers {list(config.feature_layers)} out of range for {config.clip_model} "
                f"({num_blocks} blocks): use 1-based block numbers 1..{num_blocks} as HF hidden_states[k]"
            )
        if tuple(tower.grid_size) != (config.grid_size, config.grid_size):
            raise ValueError(
                f"resolution {config.resolution} gives a {config.grid_size}x{config.grid_size} grid but "
                f"{config.clip_model} is built for a {tower.grid_size[0]}x{tower.grid_size[1]} grid"
            )
        self.block_indices = [k - 1 for k in config.feature_layers]
        # Drop blocks after the last feature layer, the final LayerNorm and the projection.
        tower.prune_intermediate_layers(self.block_indices, prune_norm=True, prune_head=True)
        if load_weights and config.clip_pretrained is not None:
            state = pretrained_clip_state_dict(config.clip_model, config.clip_pretrained, config.clip_quick_gelu,
                                               trust_pickle=trust_pickle)
            state = {k: v for k, v in state.items() if k in tower.state_dict()}
            tower.load_state_dict(state, strict=True)
        self.tower = tower
        self.width = int(tower.transformer.width)
        self.feature_dim = self.width * len(self.block_indices)
        self.requires_grad_(False)
        super().train(False)

    def train(self, mode: bool = True) -> "ClipFeatureEncoder":
        # Never trained: stays in eval mode whatever the parent does.
        return super().train(False)

    @torch.no_grad()
    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        out = self.tower.forward_intermediates(
            pixels,
            indices=self.block_indices,
            stop_early=True,
            intermediates_only=True,
            output_fmt="NLC",  # CLS token already split off by open_clip
        )
        return torch.cat(out["image_intermediates"], dim=-1)


__all__ = ["ClipFeatureEncoder", "build_clip_tower", "pretrained_clip_state_dict"]
