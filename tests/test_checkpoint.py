"""Official vqgan.ckpt layout, our save/load format, and the libra-l336 parameter shapes."""

import json
import pickle

import pytest
import torch
import torch.nn.functional as F
import yaml

from libra_tok import CheckpointError, ImageTokenizer, TokenizerConfig, load_official
from libra_tok.checkpoint import check_tokenizer_state, official_to_ours
from test_encoder import hf_tiny_clip, hf_vision_state
from test_quantizer import official_ids

PREFIX = "encoder.vision_tower.vision_model."


def official_layout(hf_clip, ref: ImageTokenizer) -> dict:
    """A state dict written by hand in the official VQModel naming (reference 6.1)."""
    sd = {PREFIX + k: v.clone() for k, v in hf_vision_state(hf_clip).items()}
    sd[PREFIX + "embeddings.position_ids"] = torch.arange(65).unsqueeze(0)  # persistent in the official copy
    q = ref.quantizer
    sd["quant_conv.weight"], sd["quant_conv.bias"] = q.quant_conv.weight.clone(), q.quant_conv.bias.clone()
    sd["quantize.project_in.weight"] = q.lfq.project_in.weight.clone()
    sd["quantize.project_in.bias"] = q.lfq.project_in.bias.clone()
    sd["quantize.project_out.weight"] = q.lfq.project_out.weight.clone()
    sd["quantize.project_out.bias"] = q.lfq.project_out.bias.clone()
    sd["quantize.mask"] = torch.tensor([256, 128, 64, 32, 16, 8, 4, 2, 1])
    sd["post_quant_conv.weight"] = q.post_quant_conv.weight.clone()
    sd["post_quant_conv.bias"] = q.post_quant_conv.bias.clone()
    sd.update({"decoder." + k: v.clone() for k, v in ref.decoder.state_dict().items()})
    # Training-only parts that the loader must drop.
    sd["loss.perceptual_loss.net.slice1.0.weight"] = torch.randn(64, 3, 3, 3)
    sd["loss.discriminator.main.0.weight"] = torch.randn(64, 3, 4, 4)
    return sd


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    torch.manual_seed(7)
    hf = hf_tiny_clip()
    ref = ImageTokenizer("tiny").eval()
    sd = official_layout(hf, ref)
    path = tmp_path_factory.mktemp("official") / "vqgan.ckpt"
    # Like the released file: the state dict plus other top-level entries.
    torch.save({"state_dict": sd, "global_step": 123, "optimizer_states": [{"lr": 1e-4}]}, path)
    return path, hf, ref, sd


def test_official_checkpoint_reproduces_direct_computation(official, tiny_pixels):
    path, hf, ref, sd = official
    tok = load_official(path, config="tiny").eval()
    out = tok.encode(tiny_pixels)

    # Features: HF CLIP hidden_states[2, 10, 18, 22]-style selection (tiny: 1, 2, 3), CLS dropped.
    with torch.no_grad():
        hidden = hf(pixel_values=tiny_pixels, output_hidden_states=True).hidden_states
    features = torch.cat([hidden[k][:, 1:] for k in (1, 2, 3)], -1)
    torch.testing.assert_close(out.features, features, rtol=1e-4, atol=1e-4)

    # Ids: the official conv -> Linear -> sign -> MSB-first bits, from the raw tensors.
    grid = features.transpose(1, 2).reshape(4, -1, 8, 8)
    h = F.conv2d(grid, sd["quant_conv.weight"], sd["quant_conv.bias"]).flatten(2).transpose(1, 2)
    values = F.linear(h, sd["quantize.project_in.weight"], sd["quantize.project_in.bias"])
    near_zero = values.abs().min(-1).values < 1e-4  # float noise may flip a sign that close to 0
    expected = official_ids(values)
    assert torch.equal(out.ids[~near_zero], expected[~near_zero])

    # Decoded images equal those of the same decoder weights computed directly.
    torch.testing.assert_close(tok.decode(out.ids), ref.decode(out.ids), rtol=1e-5, atol=1e-5)


def test_every_official_key_is_consumed(official):
    _, _, _, sd = official
    mapped = official_to_ours(sd)
    assert not any(k.startswith("loss") for k in mapped)
    model = ImageTokenizer.empty(TokenizerConfig.from_preset("tiny"))
    assert set(mapped) >= set(model.state_dict())
    # The only mapped keys the model lacks are the tower parts after the last feature layer.
    assert sorted(set(mapped) - set(model.state_dict())) == sorted(
        [k for k in mapped if k.startswith("encoder.tower.transformer.resblocks.3.")]
        + ["encoder.tower.ln_post.weight", "encoder.tower.ln_post.bias"])


def test_folder_with_yaml(official, tmp_path, tiny_pixels):
    path, _, ref, _ = official
    folder = tmp_path / "libra-vision-tokenizer"
    folder.mkdir()
    (folder / "vqgan.ckpt").write_bytes(path.read_bytes())
    cfg = TokenizerConfig.from_preset("tiny")
    (folder / "vision_tokenizer_config.yaml").write_text(yaml.safe_dump({
        "freeze": True, "max_vision_token_length": 66,
        "params": {"embed_dim": cfg.embed_dim, "ckpt_path": "vqgan.ckpt", "codebook_size": 512, "num_codebook": 2,
                   "ddconfig": {"encoder_name": "openai-clip-vit-large-patch14-336", "select_layer": [1, 2, 3],
                                "double_z": False, "z_channels": cfg.z_channels, "resolution": 112, "in_channels": 3,
                                "out_ch": 3, "ch": cfg.ch, "ch_mult": list(cfg.ch_mult), "num_res_blocks": 1,
                                "attn_resolutions": [8], "dropout": 0.0, "initial_resolution": 8,
                                "num_attn_head": 4}}}))
    tok = load_official(folder, clip="libra-tiny-vit")
    assert tok.config.feature_layers == (1, 2, 3) and tok.config.num_attn_heads == 4
    ids = tok.encode(tiny_pixels).ids
    torch.testing.assert_close(tok.decode(ids), ref.decode(ids), rtol=1e-5, atol=1e-5)
    # from_pretrained recognises the official folder too.
    with pytest.raises(ValueError, match="ViT-L-14-336 is built for a 24x24 grid"):
        ImageTokenizer.from_pretrained(folder)  # the yaml names ViT-L at 112 px: explained, not guessed


def test_wrong_files_are_explained(tmp_path, official):
    _, _, _, sd = official
    not_official = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"fc.weight": torch.zeros(2, 2)}}, not_official)
    with pytest.raises(CheckpointError, match=r"not an official Libra tokenizer checkpoint.*expected keys such as"):
        load_official(not_official, config="tiny")

    text = tmp_path / "notes.ckpt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match=r"not a torch checkpoint or safetensors file: it looks like text \('hello'\)"):
        load_official(text, config="tiny")

    extra = tmp_path / "extra.ckpt"
    torch.save({"state_dict": {**sd, "ema.decoder.conv_in.weight": torch.zeros(1)}}, extra)
    with pytest.raises(CheckpointError, match="ema.decoder.conv_in.weight"):
        load_official(extra, config="tiny")

    with pytest.raises(CheckpointError, match=r"(?s)shape mismatch.*expected \(577, 1024\), found \(65, 64\).*pass its config"):
        load_official(_official_copy(tmp_path, sd))  # no yaml, no config: libra-l336 is assumed

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no vqgan.ckpt"):
        load_official(empty)


def _official_copy(tmp_path, sd):
    path = tmp_path / "copy" / "vqgan.ckpt"
    path.parent.mkdir()
    torch.save({"state_dict": sd}, path)
    return path


class Opaque:  # an object a weights-only unpickler refuses
    pass


def test_pickled_objects_need_trust(tmp_path, official):
    _, _, _, sd = official
    path = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": sd, "callbacks": Opaque()}, path)
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        load_official(path, config="tiny")
    assert isinstance(load_official(path, config="tiny", trust_pickle=True), ImageTokenizer)


def test_save_and_load_round_trip(tiny_tok, tiny_pixels, tmp_path):
    folder = tiny_tok.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format"] == "libra-tok" and meta["config"]["clip_model"] == "libra-tiny-vit"
    loaded = ImageTokenizer.from_pretrained(folder).eval()
    assert loaded.config == tiny_tok.config
    for (k, a), (k2, b) in zip(tiny_tok.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    a, b = tiny_tok.encode(tiny_pixels), loaded.encode(tiny_pixels)
    assert torch.equal(a.ids, b.ids) and torch.equal(a.features, b.features)
    assert torch.equal(tiny_tok.decode(a.ids), loaded.decode(a.ids))
    # Non-persistent LFQ buffers are rebuilt, not left uninitialised.
    assert torch.equal(loaded.quantizer.lfq.codebook, tiny_tok.quantizer.lfq.codebook)


def test_from_pretrained_explains_wrong_paths(tmp_path):
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        ImageTokenizer.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(CheckpointError, match="not a libra-tok config"):
        ImageTokenizer.from_pretrained(tmp_path)


# ---- libra-l336 has exactly the official shapes ---------------------------------------------
def official_l336_shapes() -> dict[str, tuple]:
    """Every tensor of the official vqgan.ckpt (reference 6.1), written out."""
    s = {}
    c = PREFIX
    s[c + "embeddings.class_embedding"] = (1024,)
    s[c + "embeddings.patch_embedding.weight"] = (1024, 3, 14, 14)
    s[c + "embeddings.position_embedding.weight"] = (577, 1024)
    s[c + "embeddings.position_ids"] = (1, 577)
    for n in ("pre_layrnorm", "post_layernorm"):
        s[c + n + ".weight"] = s[c + n + ".bias"] = (1024,)
    for i in range(24):
        L = f"{c}encoder.layers.{i}."
        for p in "qkv":
            s[L + f"self_attn.{p}_proj.weight"], s[L + f"self_attn.{p}_proj.bias"] = (1024, 1024), (1024,)
        s[L + "self_attn.out_proj.weight"], s[L + "self_attn.out_proj.bias"] = (1024, 1024), (1024,)
        for n in ("layer_norm1", "layer_norm2"):
            s[L + n + ".weight"] = s[L + n + ".bias"] = (1024,)
        s[L + "mlp.fc1.weight"], s[L + "mlp.fc1.bias"] = (4096, 1024), (4096,)
        s[L + "mlp.fc2.weight"], s[L + "mlp.fc2.bias"] = (1024, 4096), (1024,)
    s["quant_conv.weight"], s["quant_conv.bias"] = (1024, 4096, 1, 1), (1024,)
    s["quantize.project_in.weight"], s["quantize.project_in.bias"] = (18, 1024), (18,)
    s["quantize.project_out.weight"], s["quantize.project_out.bias"] = (1024, 18), (1024,)
    s["quantize.mask"] = (9,)
    s["post_quant_conv.weight"], s["post_quant_conv.bias"] = (1024, 1024, 1, 1), (1024,)

    def conv(name, cout, cin, k):
        s[name + ".weight"], s[name + ".bias"] = (cout, cin, k, k), (cout,)

    def norm(name, ch):
        s[name + ".weight"] = s[name + ".bias"] = (ch,)

    def resblock(name, cin, cout):
        norm(name + ".norm1", cin)
        conv(name + ".conv1", cout, cin, 3)
        norm(name + ".norm2", cout)
        conv(name + ".conv2", cout, cout, 3)
        if cin != cout:
            conv(name + ".nin_shortcut", cout, cin, 1)

    def attn(name, ch):
        norm(name + ".norm", ch)
        for p in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{p}", ch, ch, 1)

    conv("decoder.conv_in", 1024, 1024, 3)
    resblock("decoder.mid.block_1", 1024, 1024)
    attn("decoder.mid.attn_1", 1024)
    resblock("decoder.mid.block_2", 1024, 1024)
    chans = {4: 1024, 3: 512, 2: 256, 1: 128, 0: 128}
    cin = 1024
    for level in (4, 3, 2, 1, 0):
        for b in range(3):
            resblock(f"decoder.up.{level}.block.{b}", cin if b == 0 else chans[level], chans[level])
            if level == 4:
                attn(f"decoder.up.4.attn.{b}", 1024)
        cin = chans[level]
        if level > 0:
            conv(f"decoder.up.{level}.upsample.conv", chans[level], chans[level], 3)
    norm("decoder.norm_out", 128)
    conv("decoder.conv_out", 3, 128, 3)
    return s


def test_libra_l336_has_official_shapes():
    shapes = official_l336_shapes()
    cfg = TokenizerConfig.from_preset("libra-l336", clip_pretrained=None)
    with torch.device("meta"):
        model = ImageTokenizer(cfg, load_clip_weights=False)
        fake = {k: torch.empty(v, dtype=torch.long if k.endswith(("mask", "position_ids")) else torch.float32)
                for k, v in shapes.items()}
    fake["loss.discriminator.main.0.weight"] = torch.empty(64, 3, 4, 4, device="meta")
    # Every key matched and every shape equal (raises a CheckpointError listing problems otherwise).
    check_tokenizer_state(model, official_to_ours(fake), "official table")
    decoder_params = sum(torch.Size(v).numel() for k, v in shapes.items() if k.startswith("decoder."))
    assert decoder_params == sum(p.numel() for p in model.decoder.parameters())
    assert 155e6 < decoder_params < 157e6  # reference 1.5: ~156 M
    assert model.config.grid_size == 24 and model.num_tokens == 576 and model.config.feature_dim == 4096


def test_convert_official_cli(official, tmp_path, tiny_pixels):
    from click.testing import CliRunner

    from cli.tok import main

    path, _, ref, _ = official
    res = CliRunner().invoke(main, ["convert-official", str(path), str(tmp_path / "converted"), "--preset", "tiny"])
    assert res.exit_code == 0, res.output
    assert "wrote" in res.output and "64 tokens x 2 ids of 9 bits" in res.output
    tok = ImageTokenizer.from_pretrained(tmp_path / "converted")
    direct = load_official(path, config="tiny")
    assert torch.equal(tok.encode(tiny_pixels).ids, direct.encode(tiny_pixels).ids)
    bad = CliRunner().invoke(main, ["convert-official", str(path), str(tmp_path / "x")])  # libra-l336 assumed
    assert bad.exit_code == 1 and bad.output.startswith("Error: ") and "does not fit the model" in bad.output
    info = CliRunner().invoke(main, ["info", str(tmp_path / "converted")])
    assert info.exit_code == 0 and "8x8 = 64 tokens at 112 px" in info.output


# ---- files that are not checkpoints, damaged files, LM folders -------------------------------
PNG_BYTES = b"\x89PNG\r\n\x1a\n" + bytes(64)


@pytest.mark.parametrize("content, looks_like", [
    (PNG_BYTES, "a PNG image"),
    (b"", "an empty file"),
    (bytes(range(256)) * 4, "binary data starting with 00 01 02 03"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n", "a Git LFS pointer"),
    (pickle.dumps({"a": 1}), "a Python pickle that torch.save did not write"),
], ids=["png", "empty", "binary", "git-lfs", "plain-pickle"])
def test_files_that_are_not_checkpoints_get_no_pickle_hint(tmp_path, content, looks_like):
    path = tmp_path / "vqgan.ckpt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        load_official(path, config="tiny")
    message = str(info.value)
    assert message.startswith(f"{path} is not a torch checkpoint or safetensors file: it looks like {looks_like}")
    assert "trust" not in message and "Python objects" not in message


def test_pickle_hint_only_for_real_torch_pickles(tmp_path, official):
    _, _, _, sd = official
    legacy = tmp_path / "legacy.ckpt"
    torch.save({"state_dict": sd, "callbacks": Opaque()}, legacy, _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointError, match=r"contains Python objects besides tensors.*Opaque.*trust_pickle=True "
                                              r"\(command line: --trust-pickle\)"):
        load_official(legacy, config="tiny")
    assert isinstance(load_official(legacy, config="tiny", trust_pickle=True), ImageTokenizer)

    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": sd}, whole)
    data = whole.read_bytes()
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"{truncated} is a damaged or truncated torch checkpoint") as info:
        load_official(truncated, config="tiny")
    assert "trust" not in str(info.value)
    legacy_cut = tmp_path / "legacy_cut.ckpt"
    legacy_cut.write_bytes(legacy.read_bytes()[:200])
    with pytest.raises(CheckpointError, match=rf"{legacy_cut} is a damaged or truncated torch checkpoint"):
        load_official(legacy_cut, config="tiny")


def test_garbage_or_truncated_safetensors_names_the_file(tiny_tok, tmp_path):
    folder = tiny_tok.save_pretrained(tmp_path / "tok")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=rf"cannot read {weights}: a damaged or truncated safetensors file"):
        ImageTokenizer.from_pretrained(folder)
    weights.write_bytes(b"garbage" * 100)
    with pytest.raises(CheckpointError, match=rf"cannot read {weights}: it looks like text \('garbagegarbage"):
        ImageTokenizer.from_pretrained(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=rf"{folder / 'config.json'} is not valid JSON"):
        ImageTokenizer.from_pretrained(folder)


def test_formats_are_recognised_whatever_the_name(tiny_tok, tmp_path):
    from safetensors.torch import save_file

    from libra_tok.checkpoint import read_state_dict

    state = {k: v.contiguous() for k, v in tiny_tok.state_dict().items()}
    save_file(state, tmp_path / "weights.bin")
    loaded = read_state_dict(tmp_path / "weights.bin")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    torch.save(state, tmp_path / "pickled.safetensors")
    with pytest.raises(CheckpointError, match=r"pickled.safetensors: it looks like a torch checkpoint \(zip archive\), "
                                              r"not a safetensors file"):
        read_state_dict(tmp_path / "pickled.safetensors")


def write_official_tokenizer_files(folder, state_dict, monkeypatch):
    """vqgan.ckpt + vision_tokenizer_config.yaml of the tiny architecture in `folder` (the
    yaml's encoder name is made known to the loader, which only knows ViT-L-14-336)."""
    from libra_tok import checkpoint

    monkeypatch.setitem(checkpoint._OFFICIAL_CLIP_NAMES, "libra-tiny-vit", "libra-tiny-vit")
    cfg = TokenizerConfig.from_preset("tiny")
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"state_dict": state_dict, "global_step": 1}, folder / "vqgan.ckpt")
    (folder / "vision_tokenizer_config.yaml").write_text(yaml.safe_dump({
        "params": {"embed_dim": cfg.embed_dim, "codebook_size": 512, "num_codebook": 2,
                   "ddconfig": {"encoder_name": "libra-tiny-vit", "select_layer": list(cfg.feature_layers),
                                "z_channels": cfg.z_channels, "resolution": cfg.resolution, "ch": cfg.ch,
                                "ch_mult": list(cfg.ch_mult), "num_res_blocks": cfg.num_res_blocks,
                                "attn_resolutions": list(cfg.attn_resolutions),
                                "num_attn_head": cfg.num_attn_heads}}}))
    return folder


def test_from_pretrained_on_lm_folders(official, tmp_path, tiny_pixels, monkeypatch):
    _, _, ref, sd = official
    # An official Libra LM folder: the LM's config.json beside the tokenizer's files.
    lm = write_official_tokenizer_files(tmp_path / "libra-11b-chat", sd, monkeypatch)
    (lm / "config.json").write_text(json.dumps({"architectures": ["LibraForCausalLM"], "model_type": "libra"}))
    tok = ImageTokenizer.from_pretrained(lm).eval()
    assert tok.config.clip_model == "libra-tiny-vit"
    ids = tok.encode(tiny_pixels).ids
    assert torch.equal(ids, load_official(lm / "vqgan.ckpt", config="tiny").encode(tiny_pixels).ids)
    torch.testing.assert_close(tok.decode(ids), ref.decode(ids), rtol=1e-5, atol=1e-5)

    ours = tmp_path / "ours"
    ours.mkdir()
    (ours / "config.json").write_text(json.dumps({"format": "libra-lm", "format_version": 1, "config": {}}))
    with pytest.raises(CheckpointError, match=rf"{ours} is a libra-lm model folder, not an image tokenizer; "):
        ImageTokenizer.from_pretrained(ours)
    (ours / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(CheckpointError, match="is an HF LLaMA model folder, not an image tokenizer"):
        ImageTokenizer.from_pretrained(ours)
