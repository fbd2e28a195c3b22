"""LM weights: our format, HF LLaMA folders (vs transformers), the official Libra layout."""

import json
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from builders import (
    TINY,
    hf_llama,
    hf_tiny_clip,
    mixed_batch,
    official_layout,
    randomize_,
    write_official_folder,
    write_official_tokenizer_files,
)
from libra_lm import LibraForCausalLM
from libra_lm.checkpoint import CheckpointError


# ---- our format ----------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = randomize_(LibraForCausalLM(TINY)).eval()
    model.save_pretrained(tmp_path / "lm")
    assert sorted(p.name for p in (tmp_path / "lm").iterdir()) == ["config.json", "model.safetensors"]  # no temp files
    meta = json.loads((tmp_path / "lm" / "config.json").read_text())
    assert meta["format"] == "libra-lm" and meta["config"] == TINY.to_dict()
    loaded = LibraForCausalLM.from_pretrained(tmp_path / "lm")
    assert loaded.config == TINY and not loaded.training
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    ids, feats = mixed_batch(TINY, [[("t", 3), ("i", 4), ("t", 2)]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids, feats).text_logits, model(ids, feats).text_logits, rtol=0, atol=0)
    assert all(p.requires_grad for p in loaded.parameters())
    half = LibraForCausalLM.from_pretrained(tmp_path / "lm", dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16 and all(p.dtype == torch.bfloat16 for p in half.parameters())


def test_unknown_missing_and_mis_shaped_keys_are_listed(tmp_path):
    model = LibraForCausalLM(TINY)
    folder = model.save_pretrained(tmp_path / "lm")
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.0.self_attn.extra.weight"] = torch.zeros(2)
    del weights["model.layers.1.mlp.vision_up_proj.weight_B"]
    weights["model.norm.weight"] = torch.ones(65)
    save_file(weights, folder / "model.safetensors")
    with pytest.raises(CheckpointError) as info:
        LibraForCausalLM.from_pretrained(folder)
    message = str(info.value)
    assert "missing 1 key(s): 'model.layers.1.mlp.vision_up_proj.weight_B'" in message
    assert "unexpected 1 key(s): 'model.layers.0.self_attn.extra.weight'" in message
    assert "model.norm.weight: expected (64,), found (65,)" in message


def test_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        LibraForCausalLM.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no config.json"):
        LibraForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(CheckpointError, match="model_type 'gpt2'"):
        LibraForCausalLM.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "libra-lm", "format_version": 1,
                                                      "config": TINY.to_dict()}))
    with pytest.raises(FileNotFoundError, match="has no weights"):
        LibraForCausalLM.from_pretrained(tmp_path)


# ---- HF LLaMA folders ----------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["safetensors", "sharded", "bin"])
def test_hf_llama_text_logits_equal_transformers(tmp_path, layout):
    llama = hf_llama()
    folder = tmp_path / "llama"
    if layout == "bin":
        folder.mkdir()
        llama.config.save_pretrained(folder)
        torch.save(llama.state_dict(), folder / "pytorch_model.bin")
    else:
        llama.save_pretrained(folder, max_shard_size="60KB" if layout == "sharded" else "10GB")
    if layout == "sharded":
        assert (folder / "model.safetensors.index.json").is_file()
        # Loading needs no transformers at run time.
        code = (f"import sys; from libra_lm import LibraForCausalLM; "
                f"LibraForCausalLM.from_pretrained({str(folder)!r}); "
                "assert 'transformers' not in sys.modules, 'transformers was imported'")
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr

    model = LibraForCausalLM.from_pretrained(folder, contiguous_signal_size=192, num_image_tokens=64)
    cfg = model.config
    assert (cfg.hidden_size, cfg.text_vocab_size, cfg.rms_norm_eps, cfg.rope_theta) == (64, 320, 1e-6, 10000.0)
    g = torch.Generator().manual_seed(1)
    ids = torch.cat([torch.ones(2, 1, dtype=torch.long), torch.randint(3, 320, (2, 20), generator=g)], 1)
    with torch.no_grad():
        ref = llama(input_ids=ids).logits
        ours = model(ids).text_logits
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)

    # Vision parts: the official init (experts ~ N(0, 0.02), bridges' B = 0, norms 1).
    sd = model.state_dict()
    assert not sd["model.layers.0.self_attn.vision_k_bridge_on_language.weight_B"].any()
    assert sd["model.layers.0.self_attn.vision_k_bridge_on_language.weight_A"].std() > 0.01
    assert 0.01 < float(sd["model.layers.1.mlp.vision_up_proj.weight_B"].std()) < 0.03
    assert torch.equal(sd["model.layers.0.vision_input_layernorm.weight"], torch.ones(64))
    assert torch.equal(sd["model.vision_signal_norm.weight"], torch.ones(64 + 192))
    # And the image path runs on the freshly initialised expert.
    ids, feats = mixed_batch(cfg, [[("t", 2), ("i", 64), ("t", 2)]])
    assert torch.isfinite(model(ids, feats).hidden_states).all()


def test_hf_llama_tied_embeddings(tmp_path):
    llama = hf_llama(seed=3, tie_word_embeddings=True)
    llama.tie_weights()
    llama.save_pretrained(tmp_path / "tied")
    model = LibraForCausalLM.from_pretrained(tmp_path / "tied")
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)
    ids = torch.randint(3, 320, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).text_logits, llama(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def test_hf_llama_unsupported_variant(tmp_path):
    llama = hf_llama()
    llama.save_pretrained(tmp_path / "gqa")
    meta = json.loads((tmp_path / "gqa" / "config.json").read_text())
    meta["num_key_value_heads"] = 2
    (tmp_path / "gqa" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"grouped-query attention \(num_key_value_heads 2"):
        LibraForCausalLM.from_pretrained(tmp_path / "gqa")


# ---- the official Libra layout (docs/official-formats.md#lm-folder), written by hand -----------------
def test_official_layout_loads_every_key(tmp_path):
    weights = write_official_folder(tmp_path / "libra")
    model = LibraForCausalLM.from_pretrained(tmp_path / "libra")
    assert model.config == TINY
    state = model.state_dict()
    assert set(state) == set(weights)  # every weight consumed, nothing left initialised
    for k, v in weights.items():
        assert torch.equal(state[k], v.float()), k
    assert model.dtype == torch.float32
    ids, feats = mixed_batch(TINY, [[("t", 2), ("i", 64), ("t", 3)]])
    with torch.no_grad():
        assert torch.isfinite(model(ids, feats).hidden_states).all()


def test_official_unknown_key_and_unsupported_switch(tmp_path):
    write_official_folder(tmp_path / "a")
    save_file({"model.layers.0.self_attn.vision_q_proj.lora": torch.zeros(1)},
              tmp_path / "a" / "model-00003-of-00003.safetensors")
    index = json.loads((tmp_path / "a" / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.layers.0.self_attn.vision_q_proj.lora"] = "model-00003-of-00003.safetensors"
    (tmp_path / "a" / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=r"unexpected 1 key\(s\): 'model.layers.0.self_attn.vision_q_proj.lora'"):
        LibraForCausalLM.from_pretrained(tmp_path / "a")

    write_official_folder(tmp_path / "b")
    meta = json.loads((tmp_path / "b" / "config.json").read_text())
    meta["use_2d_rope"] = True
    (tmp_path / "b" / "config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match=r"use_2d_rope=True \(released: False\)"):
        LibraForCausalLM.from_pretrained(tmp_path / "b")


# ---- damaged weight files ---------------------------------------------------------------------------
def test_garbage_or_truncated_weights_name_the_file(tmp_path):
    folder = LibraForCausalLM(TINY).save_pretrained(tmp_path / "lm")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=rf"cannot read {weights}: a damaged or truncated safetensors file"):
        LibraForCausalLM.from_pretrained(folder)
    weights.write_bytes(bytes(range(256)) * 8)
    with pytest.raises(CheckpointError, match=rf"cannot read {weights}: it looks like binary data starting with 00 01"):
        LibraForCausalLM.from_pretrained(folder)
    weights.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    with pytest.raises(CheckpointError, match=r"pytorch_model.bin is not a torch checkpoint or safetensors file: "
                                              r"it looks like a PNG image$"):
        LibraForCausalLM.from_pretrained(folder)


# ---- the image tokenizer of an LM folder ------------------------------------------------------------
@pytest.fixture(scope="module")
def official_tokenizer():
    """A tiny tokenizer and its state dict in the official vqgan.ckpt naming."""
    from libra_tok import ImageTokenizer

    torch.manual_seed(7)
    ref = ImageTokenizer("tiny").eval()
    return official_layout(hf_tiny_clip(), ref), ref


def same_weights(a, b) -> bool:
    from libra_tok.pipeline import weights_digest

    return weights_digest(a) == weights_digest(b)


def test_image_tokenizer_of_an_official_folder(tmp_path, official_tokenizer, monkeypatch, tiny_pixels):
    from libra_lm.checkpoint import image_tokenizer_for
    from libra_tok import load_official

    sd, ref = official_tokenizer
    folder = tmp_path / "libra-11b-chat"
    write_official_folder(folder)
    with pytest.raises(FileNotFoundError, match=rf"{folder} is an official Libra model folder without vqgan.ckpt"):
        image_tokenizer_for(folder)
    write_official_tokenizer_files(folder, sd, monkeypatch)
    tok = image_tokenizer_for(folder)
    assert not tok.training and tok.device == torch.device("cpu")
    assert same_weights(tok, load_official(folder))
    ids = tok.encode(tiny_pixels).ids
    torch.testing.assert_close(tok.decode(ids), ref.decode(ids), rtol=1e-5, atol=1e-5)


def test_image_tokenizer_of_our_folders(tmp_path, tiny_tok):
    from libra_lm.checkpoint import image_tokenizer_for
    from libra_tok import ImageTokenizer
    from libra_tok.pipeline import load_tokenizer, tokenizer_identity

    model = LibraForCausalLM(TINY)
    hint = "pass --tokenizer PATH"
    bare = model.save_pretrained(tmp_path / "bare")
    with pytest.raises(ValueError, match=rf"{bare} does not name its image tokenizer \(no image_tokenizer/ sub-folder, "
                                         rf"no tokenizer recorded in config.json, no vqgan.ckpt\); {hint}"):
        image_tokenizer_for(bare, hint=hint)

    # An image_tokenizer/ sub-folder.
    tiny_tok.save_pretrained(bare / "image_tokenizer")
    assert same_weights(image_tokenizer_for(bare), tiny_tok)

    # The tokenizer recorded by training: its source folder...
    source = tiny_tok.save_pretrained(tmp_path / "tok")
    recorded = model.save_pretrained(tmp_path / "recorded", image_tokenizer=tokenizer_identity(tiny_tok, str(source)))
    assert same_weights(image_tokenizer_for(recorded), tiny_tok)
    # ... or, with no source, the preset's reproducible random weights.
    preset = load_tokenizer(preset="tiny", device="cpu")
    by_preset = model.save_pretrained(tmp_path / "preset", image_tokenizer=tokenizer_identity(preset, None))
    assert same_weights(image_tokenizer_for(by_preset), preset)

    # A recorded tokenizer whose weights changed is refused, in the sub-folder too.
    torch.manual_seed(1)
    ImageTokenizer("tiny").save_pretrained(source)
    with pytest.raises(ValueError, match=r"differs from the one of the LM in .*recorded \(weights digest\).*; "
                                         + hint):
        image_tokenizer_for(recorded, hint=hint)
    ImageTokenizer.from_pretrained(source).save_pretrained(recorded / "image_tokenizer")
    with pytest.raises(ValueError, match="differs from the one of the LM in"):
        image_tokenizer_for(recorded)
