"""The holistic embedding module: image patches and text tokens into one space, then a few
causal LLaMA layers; its last hidden states are the LLM's input embeddings.

    pixels (M, 3, R, R) -> Conv2d(kernel = stride = patch) + position embedding (bicubic for other grids)
                        -> [pixel shuffle 2 x 2: concat 4 neighbours -> Linear(4D, D) -> GELU -> Linear(D, D)]
                        -> (M, P, D) patch embeddings, placed at the image positions of the sequence in order
    text ids            -> a copy of the LLM's embedding table; BOI / EOI -> two learned rows
    sequence (B, N, D)  -> num_embedding_layers causal decoder layers (own KV cache when generating)

As the HoVLE paper (§3.1, Fig. 2) and its released model code (OpenGVLab/HoVLE); the pixel
shuffle is InternVL's (`pixel_shuffle` with scale 0.5, the order of `pixel_shuffle_reference`
below).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model import KVCache
from .config import HoVLEConfig
from .llama import LlamaDecoderLayer, StackInput, run_layers


def pixel_shuffle(x: torch.Tensor) -> torch.Tensor:
    """(M, g, g, C) -> (M, g/2, g/2, 4C): out[i, j] = [x[2i, 2j], x[2i, 2j+1], x[2i+1, 2j], x[2i+1, 2j+1]]."""
    m, h, w, c = x.shape
    if h % 2 or w % 2:
        raise ValueError(f"pixel shuffle needs an even grid, got {h} x {w}")
    return x.view(m, h // 2, 2, w // 2, 2, c).permute(0, 1, 3, 2, 4, 5).reshape(m, h // 2, w // 2, 4 * c)


def pixel_shuffle_reference(x: torch.Tensor) -> torch.Tensor:
    """The definition of `pixel_shuffle`, written as loops (for tests and readers)."""
    m, h, w, c = x.shape
    out = x.new_empty(m, h // 2, w // 2, 4 * c)
    for i in range(h // 2):
        for j in range(w // 2):
            out[:, i, j] = torch.cat([x[:, 2 * i, 2 * j], x[:, 2 * i, 2 * j + 1],
                                      x[:, 2 * i + 1, 2 * j], x[:, 2 * i + 1, 2 * j + 1]], -1)
    return out


def resize_positions(pos: torch.Tensor, gh: int, gw: int) -> torch.Tensor:
    """A (1, g * g, D) position embedding on a gh x gw grid: bicubic interpolation of the square
    grid (InternVL / HoVLE do the same for other image sizes); unchanged when the grid is equal."""
    d, g = pos.shape[-1], round(pos.shape[1] ** 0.5)
    if g * g != pos.shape[1]:
        raise ValueError(f"a position embedding of {pos.shape[1]} rows is not a square grid")
    if (gh, gw) == (g, g):
        return pos
    grid = pos.reshape(1, g, g, d).permute(0, 3, 1, 2).float()
    grid = F.interpolate(grid, size=(gh, gw), mode="bicubic", align_corners=False)
    return grid.permute(0, 2, 3, 1).reshape(1, gh * gw, d).to(pos.dtype)


class PatchEmbedding(nn.Module):
    """Conv2d(3, D, kernel = stride = patch_size) plus a learned position embedding of the
    configured grid, resized bicubically when an image of another size comes in."""

    def __init__(self, config: HoVLEConfig):
        super().__init__()
        self.patch_size, self.grid = config.patch_size, config.patch_grid
        self.proj = nn.Conv2d(3, config.hidden_size, kernel_size=config.patch_size, stride=config.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, self.grid * self.grid, config.hidden_size))

    def positions(self, gh: int, gw: int) -> torch.Tensor:
        """(1, gh * gw, D): the position embedding on a gh x gw grid."""
        return resize_positions(self.position_embedding, gh, gw)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        """(M, 3, H, W) -> (M, gh, gw, D), gh = H / patch_size."""
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixel_values must be (M, 3, H, W), got {tuple(pixels.shape)}")
        x = self.proj(pixels.to(self.proj.weight.dtype))  # (M, D, gh, gw)
        m, d, gh, gw = x.shape
        x = x.flatten(2).transpose(1, 2) + self.positions(gh, gw)
        return x.view(m, gh, gw, d)


class HolisticEmbedding(nn.Module):
    def __init__(self, config: HoVLEConfig):
        super().__init__()
        d = config.hidden_size
        self.config = config
        # A copy of the LLM's table, owned (and in stage 1 and 2 trained) by the module.
        self.embed_tokens = nn.Embedding(config.text_vocab_size, d, padding_idx=config.pad_token_id)
        self.image_boundaries = nn.Embedding(2, d)  # BOI, EOI
        self.patch_embed = PatchEmbedding(config)
        self.shuffle_mlp = (nn.Sequential(nn.Linear(4 * d, d), nn.GELU(), nn.Linear(d, d))
                            if config.pixel_shuffle else None)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_embedding_layers))

    def image_tokens(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(M, 3, R, R) -> (M, P, D) patch embeddings in row-major grid order."""
        x = self.patch_embed(pixel_values)
        if self.shuffle_mlp is not None:
            x = self.shuffle_mlp(pixel_shuffle(x))
        return x.flatten(1, 2)

    def embed(self, ids: torch.Tensor, pixel_values: torch.Tensor | None, check: bool = True) -> torch.Tensor:
        """ids (B, N) in the joint space (column 0 of the joint ids) -> (B, N, D): text rows from
        the table, BOI/EOI rows, and image patches filled with `pixel_values`' patch embeddings
        (image k of the batch, in row-major order of appearance, fills the k-th run of patches)."""
        cfg = self.config
        v_t = cfg.text_vocab_size
        is_text = ids < v_t
        x = self.embed_tokens(torch.where(is_text, ids, 0))
        boundary = ids - (v_t + cfg.codebook_size)
        is_boundary = (boundary >= 0) & (boundary < 2)
        x = torch.where(is_boundary[..., None], self.image_boundaries(boundary.clamp(0, 1)).to(x.dtype), x)
        is_patch = ~is_text & ~is_boundary
        if not check and pixel_values is None:
            return x
        num_patches = int(is_patch.sum())
        num_images = 0 if pixel_values is None else pixel_values.shape[0]
        if num_patches != num_images * cfg.num_image_tokens:
            raise ValueError(f"the ids hold {num_patches} image patch positions, the pixel_values {num_images} images "
                             f"of {cfg.num_image_tokens} tokens each: give one image per BOI [patches] EOI run")
        if num_images:
            tokens = self.image_tokens(pixel_values)
            x = x.masked_scatter(is_patch[..., None], tokens.to(x.dtype))
        return x

    def forward(self, x: torch.Tensor, ctx: StackInput, cache: KVCache | None = None,
                checkpointing: bool = False) -> torch.Tensor:
        return run_layers(self.layers, x, ctx, cache, checkpointing)


__all__ = ["resize_positions", "pixel_shuffle", "pixel_shuffle_reference", "PatchEmbedding", "HolisticEmbedding"]
