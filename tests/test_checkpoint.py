"""load_official (libra_tok.checkpoint): the official vqgan.ckpt layout and folders, any CLIP ViT the
official loader would load, files that are not checkpoints, and the libra-l336 parameter shapes."""

import json
import pickle

import pytest
import torch
import torch.nn.functional as F
import yaml

from builders import (
    Opaque,
    hf_tiny_clip,
    official_ids,
    official_l336_shapes,
    official_layout,
    write_official_tokenizer_files,
)
from libra_tok import CheckpointError, ImageTokenizer, TokenizerConfig, load_official
from libra_tok.conversions import official_to_ours
from libra_tok.model import check_tokenizer_state


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
    with pytest.raises(CheckpointError,
                       match=r"not a torch checkpoint or safetensors file: it looks like text \('hello'\)"):
        load_official(text, config="tiny")

    extra = tmp_path / "extra.ckpt"
    torch.save({"state_dict": {**sd, "ema.decoder.conv_in.weight": torch.zeros(1)}}, extra)
    with pytest.raises(CheckpointError, match="ema.decoder.conv_in.weight"):
        load_official(extra, config="tiny")

    with pytest.raises(CheckpointError,
                       match=r"(?s)shape mismatch.*expected \(577, 1024\), found \(65, 64\).*pass its config"):
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


def test_pickled_objects_need_trust(tmp_path, official):
    _, _, _, sd = official
    path = tmp_path / "vqgan.ckpt"
    torch.save({"state_dict": sd, "callbacks": Opaque()}, path)
    with pytest.raises(CheckpointError, match="trust_pickle=True"):
        load_official(path, config="tiny")
    assert isinstance(load_official(path, config="tiny", trust_pickle=True), ImageTokenizer)


# ---- libra-l336 has exactly the official shapes ---------------------------------------------
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
    assert 155e6 < decoder_params < 157e6  # the official decoder (diffusionmodules/model.py) has ~156 M
    assert model.config.grid_size == 24 and model.num_tokens == 576 and model.config.feature_dim == 4096


def test_convert_official_cli(official, tmp_path, tiny_pixels):
    from click.testing import CliRunner

    from libra_cli.tok import main

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


def test_from_pretrained_on_lm_folders(official, tmp_path, tiny_pixels):
    _, _, ref, sd = official
    # An official Libra LM folder: the LM's config.json beside the tokenizer's files.
    lm = write_official_tokenizer_files(tmp_path / "libra-11b-chat", sd)
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


# ---- any CLIP ViT the official loader would load -------------------------------------------------
def random_hf_clip(seed, **sizes):
    """A transformers CLIPVisionModel of the given sizes with non-trivial random weights."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(seed)
    model = CLIPVisionModel(CLIPVisionConfig(**sizes)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


# Neither CLIP is registered with open_clip: a 3-head GELU ViT with LayerNorm eps 1e-6 and MLP
# ratio 2 (its architecture must come from its config.json), and a 1-head QuickGELU ViT whose
# heads are width / 64, so that its architecture can be read from tensor shapes alone.
SMALL_CLIP = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=3, image_size=96,
                  patch_size=16, hidden_act="gelu", layer_norm_eps=1e-6)
SHAPES_CLIP = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=1, image_size=56,
                   patch_size=14, hidden_act="quick_gelu", layer_norm_eps=1e-5)


def decoder_yaml(resolution, feature_layers, encoder_name):
    """vision_tokenizer_config.yaml of a small tokenizer (grid 6 or 4 -> x2 -> the resolution)."""
    return {"params": {"embed_dim": 32, "ckpt_path": "vqgan.ckpt", "codebook_size": 512, "num_codebook": 2,
                       "ddconfig": {"encoder_name": encoder_name, "select_layer": list(feature_layers),
                                    "double_z": False, "z_channels": 32, "resolution": resolution, "in_channels": 3,
                                    "out_ch": 3, "ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1,
                                    "attn_resolutions": [], "dropout": 0.0, "num_attn_head": 2}}}


def small_config(hf, feature_layers):
    """Our config of the official tokenizer around `hf` (the architecture written out by hand)."""
    c = hf.config
    return TokenizerConfig(
        clip_model="hand-written", clip_pretrained=None, clip_quick_gelu=c.hidden_act == "quick_gelu",
        clip_vision={"width": c.hidden_size, "layers": c.num_hidden_layers,
                     "head_width": c.hidden_size // c.num_attention_heads,
                     "mlp_ratio": c.intermediate_size / c.hidden_size, "patch_size": c.patch_size,
                     "image_size": c.image_size,
                     "norm_kwargs": None if c.layer_norm_eps == 1e-5 else {"eps": c.layer_norm_eps}},
        feature_layers=tuple(feature_layers), resolution=c.image_size, embed_dim=32, z_channels=32, ch=32,
        ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(), num_attn_heads=2)


def official_folder(root, hf, feature_layers, encoder_name, with_clip_folder):
    """An official-layout folder around `hf`: vqgan.ckpt + yaml, and the CLIP folder the yaml
    names (written by transformers' save_pretrained) if `with_clip_folder`. Returns the folder,
    the reference tokenizer (same quantizer and decoder weights) and the raw state dict."""
    torch.manual_seed(11)
    ref = ImageTokenizer(small_config(hf, feature_layers), load_clip_weights=False).eval()
    sd = official_layout(hf, ref)
    root.mkdir(parents=True)
    torch.save({"state_dict": sd, "global_step": 5}, root / "vqgan.ckpt")
    (root / "vision_tokenizer_config.yaml").write_text(
        yaml.safe_dump(decoder_yaml(hf.config.image_size, feature_layers, encoder_name)))
    if with_clip_folder:
        hf.save_pretrained(root / encoder_name)
    return root, ref, sd


def expected_official_ids(hf, sd, pixels, feature_layers):
    """The official ids computed from the raw tensors: HF CLIP hidden_states, conv, Linear, the
    hand-written official LFQ (builders.official_ids, checked in tests/test_quantizer.py); and the
    patches whose pre-sign value is too close to 0 for float noise (left out of the comparison)."""
    with torch.no_grad():
        hidden = hf(pixel_values=pixels, output_hidden_states=True).hidden_states
        features = torch.cat([hidden[k][:, 1:] for k in feature_layers], -1)
        g = hf.config.image_size // hf.config.patch_size
        grid = features.transpose(1, 2).reshape(len(pixels), -1, g, g)
        h = F.conv2d(grid, sd["quant_conv.weight"], sd["quant_conv.bias"]).flatten(2).transpose(1, 2)
        values = F.linear(h, sd["quantize.project_in.weight"], sd["quantize.project_in.bias"])
    return official_ids(values), values.abs().min(-1).values < 1e-4, features


def pixels_for(tok, asset_images):
    return tok.preprocess(asset_images[:4])


def test_yaml_names_an_hf_clip_folder(tmp_path, asset_images, caplog):
    """(a) The yaml's encoder_name is a CLIP folder beside vqgan.ckpt (config.json + weights of
    transformers' save_pretrained): its architecture is built, the ids are the official ones."""
    hf = random_hf_clip(21, **SMALL_CLIP)
    folder, ref, sd = official_folder(tmp_path / "official", hf, (1, 3), "small-clip-b16", with_clip_folder=True)
    with caplog.at_level("WARNING", logger="libra_tok"):
        tok = load_official(folder).eval()
    assert "assumed" not in caplog.text  # nothing guessed: the folder said it all
    cfg = tok.config
    assert cfg.clip_model == "small-clip-b16" and cfg.clip_quick_gelu is False
    assert cfg.clip_vision == small_config(hf, (1, 3)).clip_vision
    assert cfg.architecture_hash() == small_config(hf, (1, 3)).architecture_hash()  # the label is not hashed

    pixels = pixels_for(tok, asset_images)
    out = tok.encode(pixels)
    expected, near_zero, features = expected_official_ids(hf, sd, pixels, (1, 3))
    torch.testing.assert_close(out.features, features, rtol=1e-4, atol=1e-4)
    assert torch.equal(out.ids[~near_zero], expected[~near_zero])
    torch.testing.assert_close(tok.decode(out.ids), ref.decode(out.ids), rtol=1e-5, atol=1e-5)

    # from_pretrained finds the same; the converted folder round-trips the described CLIP.
    assert torch.equal(ImageTokenizer.from_pretrained(folder).encode(pixels).ids, out.ids)
    saved = ImageTokenizer.from_pretrained(tok.save_pretrained(tmp_path / "converted")).eval()
    assert saved.config == cfg and torch.equal(saved.encode(pixels).ids, out.ids)


def test_clip_argument_is_an_hf_folder_or_a_weights_file(tmp_path, asset_images, caplog):
    """(b) clip=<HF CLIP folder> gives the architecture when the yaml's folder is not there; a
    weights file gives it from shapes, which cannot tell the heads of a 48-wide CLIP."""
    hf = random_hf_clip(21, **SMALL_CLIP)
    folder, _, sd = official_folder(tmp_path / "official", hf, (1, 3), "not-here", with_clip_folder=False)
    elsewhere = tmp_path / "downloads" / "small-clip"
    hf.save_pretrained(elsewhere)
    with caplog.at_level("WARNING", logger="libra_tok"):
        tok = load_official(folder, clip=elsewhere).eval()
    assert "assumed" not in caplog.text
    assert tok.config.clip_vision == small_config(hf, (1, 3)).clip_vision
    pixels = pixels_for(tok, asset_images)
    expected, near_zero, _ = expected_official_ids(hf, sd, pixels, (1, 3))
    assert torch.equal(tok.encode(pixels).ids[~near_zero], expected[~near_zero])
    # A string works too, and so does clip= with an explicit config of other CLIP dimensions.
    other = small_config(hf, (1, 3)).replace(clip_model="libra-tiny-vit", clip_vision=None)
    assert load_official(folder / "vqgan.ckpt", clip=str(elsewhere), config=other).config.clip_vision is not None

    with pytest.raises(CheckpointError, match=r"width 48 has no heads of 64 channels.*HF CLIP folder"):
        load_official(folder, clip=elsewhere / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="CLIP folder or weights file .*nope does not exist"):
        load_official(folder, clip=tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown open_clip model 'ViT-Nope'"):
        load_official(folder, clip="ViT-Nope")


def test_architecture_from_shapes_without_the_clip_folder(tmp_path, asset_images, caplog):
    """(c) No CLIP folder beside vqgan.ckpt: width, blocks, patch, image size and MLP width come
    from the checkpoint's shapes, the heads from width / 64, and the log says what was assumed."""
    hf = random_hf_clip(22, **SHAPES_CLIP)
    folder, ref, sd = official_folder(tmp_path / "official", hf, (1, 2), "some-clip", with_clip_folder=False)
    with caplog.at_level("WARNING", logger="libra_tok"):
        tok = load_official(folder).eval()
    assert "tensor shapes: width 64, 2 blocks, 14 px patches at 56 px, MLP width 128" in caplog.text
    assert "assumed 1 heads (width / 64) and QuickGELU" in caplog.text
    assert tok.config.clip_vision == small_config(hf, (1, 2)).clip_vision and tok.config.clip_model == "some-clip"
    pixels = pixels_for(tok, asset_images)
    out = tok.encode(pixels)
    expected, near_zero, _ = expected_official_ids(hf, sd, pixels, (1, 2))
    assert torch.equal(out.ids[~near_zero], expected[~near_zero])
    torch.testing.assert_close(tok.decode(out.ids), ref.decode(out.ids), rtol=1e-5, atol=1e-5)
    # A weights file of that CLIP given as clip= is read the same way.
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, str(tmp_path / "clip.safetensors"))
    assert load_official(folder, clip=tmp_path / "clip.safetensors").config.clip_vision == tok.config.clip_vision
