"""The frozen CLIP encoder: 1-based HF hidden_states[k] <-> open_clip block k-1."""

import pytest
import torch

from builders import Opaque, hf_tiny_clip, hf_vision_state
from libra_tok.config import TokenizerConfig
from libra_tok.conversions import clip_state_dict_to_open_clip
from libra_tok.encoder import ClipFeatureEncoder


def hand_features(tower, pixels, layers):
    """The same computation from the tower's own modules, step by step."""
    x = tower.conv1(pixels)  # (B, C, g, g)
    x = x.flatten(2).transpose(1, 2)  # row-major patches
    cls = tower.class_embedding.view(1, 1, -1).expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], 1) + tower.positional_embedding
    hidden = [tower.ln_pre(x)]  # HF hidden_states[0]
    for block in tower.transformer.resblocks:
        hidden.append(block(hidden[-1]))  # HF hidden_states[k] = output of block k (1-based)
    return torch.cat([hidden[k][:, 1:] for k in layers], -1)


def test_features_are_outputs_of_one_based_blocks(tiny_tok, tiny_pixels):
    enc = tiny_tok.encoder
    with torch.no_grad():
        expected = hand_features(enc.tower, tiny_pixels, tiny_tok.config.feature_layers)
    got = enc(tiny_pixels)
    assert got.shape == (4, 64, 3 * 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # An off-by-one selection would differ clearly.
    with torch.no_grad():
        shifted = hand_features(enc.tower, tiny_pixels, [k - 1 for k in tiny_tok.config.feature_layers])
    assert (got - shifted).abs().max() > 1e-2


def test_matches_hf_clip_hidden_states(tiny_pixels):
    """Independent reference: HF CLIPVisionModel's hidden_states[k], CLS dropped."""
    hf = hf_tiny_clip()
    cfg = TokenizerConfig.from_preset("tiny")
    enc = ClipFeatureEncoder(cfg, load_weights=False)
    state = clip_state_dict_to_open_clip({"vision_model." + k: v for k, v in hf_vision_state(hf).items()})
    enc.tower.load_state_dict({k: v for k, v in state.items() if k in enc.tower.state_dict()}, strict=True)
    with torch.no_grad():
        hidden = hf(pixel_values=tiny_pixels, output_hidden_states=True).hidden_states
    expected = torch.cat([hidden[k][:, 1:] for k in cfg.feature_layers], -1)
    torch.testing.assert_close(enc(tiny_pixels), expected, rtol=1e-4, atol=1e-4)


def test_encoder_is_frozen_and_stays_in_eval(tiny_tok, tiny_pixels):
    enc = tiny_tok.encoder
    assert not any(p.requires_grad for p in enc.parameters())
    tiny_tok.train()
    try:
        assert not enc.training and tiny_tok.decoder.training
        out = enc(tiny_pixels)
        assert not out.requires_grad
    finally:
        tiny_tok.eval()
    assert not any(p is q for p in tiny_tok.trainable_parameters() for q in enc.parameters())


def test_blocks_after_last_feature_layer_are_pruned():
    cfg = TokenizerConfig.from_preset("libra-l336", clip_pretrained=None)
    with torch.device("meta"):
        enc = ClipFeatureEncoder(cfg, load_weights=False)
    assert len(enc.tower.transformer.resblocks) == 22
    assert enc.block_indices == [1, 9, 17, 21]
    assert enc.feature_dim == 4096


def test_feature_layer_out_of_range_is_explained():
    cfg = TokenizerConfig.from_preset("tiny", feature_layers=(0, 2))
    with pytest.raises(ValueError, match=r"1-based block numbers 1\.\.4"):
        ClipFeatureEncoder(cfg, load_weights=False)


def test_clip_weights_from_hf_folder_file(tmp_path, tiny_pixels):
    """clip_pretrained may be an HF CLIP weights file (what users have on disk)."""
    from safetensors.torch import save_file

    hf = hf_tiny_clip()
    save_file({"vision_model." + k: v.contiguous() for k, v in hf_vision_state(hf).items()},
              str(tmp_path / "model.safetensors"))
    cfg = TokenizerConfig.from_preset("tiny", clip_pretrained=str(tmp_path))
    enc = ClipFeatureEncoder(cfg)
    with torch.no_grad():
        hidden = hf(pixel_values=tiny_pixels, output_hidden_states=True).hidden_states
    torch.testing.assert_close(enc(tiny_pixels), torch.cat([hidden[k][:, 1:] for k in (1, 2, 3)], -1),
                               rtol=1e-4, atol=1e-4)


def test_missing_clip_weights_file_is_explained(tmp_path):
    cfg = TokenizerConfig.from_preset("tiny", clip_pretrained=str(tmp_path / "nope.bin"))
    with pytest.raises(FileNotFoundError, match="nope.bin does not exist"):
        ClipFeatureEncoder(cfg)


def test_clip_weights_with_python_objects_need_trust(tmp_path, tiny_pixels):
    from libra_tok import CheckpointError, ImageTokenizer

    hf = hf_tiny_clip()
    path = tmp_path / "clip.ckpt"
    torch.save({"state_dict": {"vision_model." + k: v for k, v in hf_vision_state(hf).items()}, "cb": Opaque()}, path)
    cfg = TokenizerConfig.from_preset("tiny", clip_pretrained=str(path))
    with pytest.raises(CheckpointError, match="contains Python objects besides tensors.*trust_pickle=True"):
        ClipFeatureEncoder(cfg)
    enc = ClipFeatureEncoder(cfg, trust_pickle=True)
    with torch.no_grad():
        hidden = hf(pixel_values=tiny_pixels, output_hidden_states=True).hidden_states
    expected = torch.cat([hidden[k][:, 1:] for k in (1, 2, 3)], -1)
    torch.testing.assert_close(enc(tiny_pixels), expected, rtol=1e-4, atol=1e-4)
    tok = ImageTokenizer(cfg, trust_pickle=True)
    torch.testing.assert_close(tok.encode(tiny_pixels).features, expected, rtol=1e-4, atol=1e-4)
