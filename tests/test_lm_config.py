"""LibraConfig (libra_lm.config): presets, dict round trips, unknown fields and sizes explained."""

import pytest

from builders import TINY
from libra_lm import LibraConfig


def test_config_presets_round_trip_and_errors():
    cfg = LibraConfig.from_preset("libra-7b")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == (
        4096, 32, 32, 11008)
    assert (cfg.text_vocab_size, cfg.vision_vocab_size, cfg.boi_token_id, cfg.eoi_token_id) == (
        32000, 514, 32512, 32513)
    assert (cfg.image_length, cfg.contiguous_signal_size, cfg.rms_norm_eps, cfg.max_position_embeddings) == (
        578, 4096, 1e-6, 2048)
    assert (cfg.expert_rank(4096), cfg.expert_rank(11008), cfg.bridge_rank) == (1024, 2752, 8)
    assert LibraConfig.from_dict(TINY.to_dict()) == TINY
    assert TINY.head_dim == 16 and TINY.contiguous_signal_size == 192 and TINY.num_image_tokens == 64
    assert LibraConfig.from_preset("tiny", num_hidden_layers=3).num_hidden_layers == 3
    with pytest.raises(ValueError, match=r"unknown LibraConfig field\(s\) \['hidden'\]"):
        LibraConfig.from_dict({**TINY.to_dict(), "hidden": 3})
    with pytest.raises(ValueError, match=r"unknown LibraConfig field\(s\) \['layers'\]"):
        LibraConfig.from_preset("tiny", layers=3)
    with pytest.raises(ValueError, match=r"unknown LM preset 'big'; presets: \['libra-7b', 'tiny'\]"):
        LibraConfig.from_preset("big")
    with pytest.raises(ValueError, match="not divisible by num_attention_heads"):
        LibraConfig.from_preset("tiny", num_attention_heads=5)
