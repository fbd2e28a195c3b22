"""Official and HF LLaMA state dicts -> ours: pure dict functions, no model class involved."""

import ast

import pytest
import torch

from builders import ROOT
from libra_lm.convert import OFFICIAL_IGNORED_NAMES, fresh_keys, is_ignored_key, tie_embeddings, to_ours


def test_ignored_keys_are_dropped_for_official_and_llama_layouts():
    state = {
        "model.layers.0.self_attn.q_proj.weight": torch.zeros(2, 2),
        "model.layers.0.self_attn.rotary_emb.inv_freq": torch.zeros(1),
        "model.naive_placeholder": torch.zeros(1),
        "vision_hidden_placeholder": torch.zeros(1),
        "lm_head.weight": torch.zeros(3, 2),
    }
    kept = ["model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]
    for kind in ("official", "llama"):
        assert list(to_ours(state, kind)) == kept
    assert to_ours(state, "ours") == state  # our own files hold exactly our keys; nothing is hidden
    assert is_ignored_key("rotary_emb.inv_freq") and not is_ignored_key("model.inv_freq")
    assert "eoi_to_newline_logits_placeholder" in OFFICIAL_IGNORED_NAMES
    with pytest.raises(ValueError, match="unknown checkpoint kind 'gguf'"):
        to_ours(state, "gguf")


def test_tied_embeddings_and_fresh_keys():
    embed = torch.randn(5, 4)
    tied = tie_embeddings({"model.embed_tokens.weight": embed})
    assert torch.equal(tied["lm_head.weight"], embed) and tied["lm_head.weight"] is not embed
    untied = {"model.embed_tokens.weight": embed, "lm_head.weight": torch.zeros(5, 4)}
    assert tie_embeddings(untied) is untied
    keys = ["model.embed_tokens.weight", "model.vision_norm.weight", "model.layers.0.mlp.vision_up_proj.weight_A"]
    assert fresh_keys(keys, "llama") == keys[1:]
    assert fresh_keys(keys, "official") == [] and fresh_keys(keys, "ours") == []


def test_the_conversions_import_no_model_class():
    tree = ast.parse((ROOT / "libra_lm" / "convert.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    assert not any("model" in (name or "") for name in imported), imported
