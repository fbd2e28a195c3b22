"""The taming-transformers convolutional decoder in the official Libra layout.

Module names equal the official `decoder.*` keys (`libra/models/libra/taming/modules/
diffusionmodules/model.py`; docs/official-formats.md#tokenizer-checkpoint), so official weights
load without renaming. Differences from stock taming: the start grid is the CLIP grid
(`initial_resolution` 24 there, not resolution / 2^(levels-1)), attention is multi-head,
and the last upsample (level 1) jumps to the output size with a fractional nearest scale
(336 / 192 = 1.75 for libra-l336).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import TokenizerConfig


def _norm(channels: int, groups: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=groups, num_channels=channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = _norm(in_channels, groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Spatial self-attention with 1x1 conv q/k/v/proj_out; channels split into heads."""

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"{channels} channels do not split into {num_heads} attention heads")
        self.num_heads = num_heads
        self.norm = _norm(channels, groups)
        self.q = nn.Conv2d(channels, channels, 1)
        self.k = nn.Conv2d(channels, channels, 1)
        self.v = nn.Conv2d(channels, channels, 1)
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, hgt, wid = x.shape
        h = self.norm(x)

        def heads(t: torch.Tensor) -> torch.Tensor:  # (B, C, H, W) -> (B, heads, HW, C/heads)
            return t.reshape(b, self.num_heads, c // self.num_heads, hgt * wid).transpose(2, 3)

        # softmax(q k^T / sqrt(c / heads)) v, as the official multi-head path.
        out = F.scaled_dot_product_attention(heads(self.q(h)), heads(self.k(h)), heads(self.v(h)))
        out = out.transpose(2, 3).reshape(b, c, hgt, wid)
        return x + self.proj_out(out)


class Upsample(nn.Module):
    """Nearest upsample by `scale` (2, or fractional for the last level), then 3x3 conv."""

    def __init__(self, channels: int, scale: float):
        super().__init__()
        self.scale = scale
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=self.scale, mode="nearest"))


class Decoder(nn.Module):
    def __init__(self, config: TokenizerConfig):
        super().__init__()
        ch, ch_mult, groups = config.ch, config.ch_mult, config.norm_groups
        levels = len(ch_mult)
        self.num_resolutions = levels
        self.num_res_blocks = config.num_res_blocks
        curr_res = config.grid_size
        block_in = ch * ch_mult[-1]

        self.conv_in = nn.Conv2d(config.z_channels, block_in, 3, padding=1)
        self.mid = nn.Module()
        self.mid.block_1 = ResnetBlock(block_in, block_in, config.dropout, groups)
        self.mid.attn_1 = AttnBlock(block_in, config.num_attn_heads, groups)
        self.mid.block_2 = ResnetBlock(block_in, block_in, config.dropout, groups)

        self.up = nn.ModuleList()
        for i_level in reversed(range(levels)):
            up = nn.Module()
            up.block = nn.ModuleList()
            up.attn = nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(config.num_res_blocks + 1):
                up.block.append(ResnetBlock(block_in, block_out, config.dropout, groups))
                block_in = block_out
                if curr_res in config.attn_resolutions:
                    up.attn.append(AttnBlock(block_in, config.num_attn_heads, groups))
            if i_level > 1:
                up.upsample = Upsample(block_in, 2.0)
                curr_res *= 2
            elif i_level == 1:
                # Official: the last upsample jumps to the output size; curr_res is left as is.
                scale = config.resolution / curr_res
                if scale < 1 or int(curr_res * scale) != config.resolution:
                    raise ValueError(
                        f"decoder cannot reach {config.resolution} px from a {config.grid_size} grid with "
                        f"ch_mult {list(ch_mult)}: the levels before the last upsample already give "
                        f"{curr_res} px; use fewer levels"
                    )
                up.upsample = Upsample(block_in, scale)
            self.up.insert(0, up)
        if levels == 1 and config.grid_size != config.resolution:
            raise ValueError("a one-level decoder needs grid_size == resolution")

        self.norm_out = _norm(block_in, groups)
        self.conv_out = nn.Conv2d(block_in, config.out_ch, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block, block in enumerate(up.block):
                h = block(h)
                if len(up.attn):
                    h = up.attn[i_block](h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


__all__ = ["Decoder", "ResnetBlock", "AttnBlock", "Upsample"]
