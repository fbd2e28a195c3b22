"""Decoder layout: official resolutions, fractional last upsample, multi-head attention."""

import pytest
import torch

from libra_tok.config import TokenizerConfig
from libra_tok.decoder import AttnBlock, Decoder


def trace_resolutions(decoder, z):
    sizes = []
    hooks = [m.register_forward_hook(lambda mod, inp, out: sizes.append(out.shape[-1]))
             for m in (decoder.up[i].upsample for i in reversed(range(1, decoder.num_resolutions)))]
    out = decoder(z)
    for h in hooks:
        h.remove()
    return sizes, out


def test_libra_l336_decoder_goes_24_48_96_192_336():
    cfg = TokenizerConfig.from_preset("libra-l336", clip_pretrained=None)
    with torch.device("meta"):
        dec = Decoder(cfg)
        sizes, out = trace_resolutions(dec, torch.empty(1, 1024, 24, 24))
    assert sizes == [48, 96, 192, 336]
    assert tuple(out.shape) == (1, 3, 336, 336)
    assert dec.up[1].upsample.scale == 1.75
    assert [len(dec.up[i].attn) for i in range(5)] == [0, 0, 0, 0, 3]  # attention only at 24x24
    assert dec.mid.attn_1.num_heads == 8


def test_tiny_decoder_has_fractional_upsample():
    cfg = TokenizerConfig.from_preset("tiny")
    dec = Decoder(cfg)
    sizes, out = trace_resolutions(dec, torch.randn(2, cfg.z_channels, 8, 8))
    assert sizes == [16, 32, 112] and dec.up[1].upsample.scale == 3.5
    assert out.shape == (2, 3, 112, 112)


def test_unreachable_resolution_is_explained():
    cfg = TokenizerConfig.from_preset("tiny", ch_mult=(1, 1, 1, 1, 2, 2))  # 8*16 = 128 > 112
    with pytest.raises(ValueError, match="cannot reach 112 px"):
        Decoder(cfg)


def test_attention_block_equals_per_head_math():
    torch.manual_seed(0)
    blk = AttnBlock(64, num_heads=4, groups=32).eval()
    x = torch.randn(2, 64, 5, 3)
    h = blk.norm(x)
    q, k, v = (m(h).reshape(2, 64, 15) for m in (blk.q, blk.k, blk.v))
    outs = []
    for head in range(4):  # channels [16*head, 16*(head+1)) form one head
        sl = slice(16 * head, 16 * (head + 1))
        w = torch.softmax(q[:, sl].transpose(1, 2) @ k[:, sl] / 16 ** 0.5, dim=-1)  # (B, HW, HW)
        outs.append(v[:, sl] @ w.transpose(1, 2))
    expected = x + blk.proj_out(torch.cat(outs, 1).reshape(2, 64, 5, 3))
    torch.testing.assert_close(blk(x), expected, rtol=1e-5, atol=1e-5)
