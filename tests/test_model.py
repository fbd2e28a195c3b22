"""ImageTokenizer: the encode/decode contract of DESIGN.md, and its own folder format
(save_pretrained / from_pretrained)."""

import json

import pytest
import torch

from libra_tok import CheckpointError, ImageTokenizer


def test_encode_decode_contract(tiny_tok, tiny_pixels):
    out = tiny_tok.encode(tiny_pixels)
    assert out.ids.shape == (4, 64, 2) and out.ids.dtype == torch.long
    assert 0 <= int(out.ids.min()) and int(out.ids.max()) < 512
    assert out.features.shape == (4, 64, 192) and out.features.dtype == torch.float32
    images = tiny_tok.decode(out.ids)
    assert images.shape == (4, 3, 112, 112)
    assert images.min() >= -1 and images.max() <= 1
    assert torch.equal(tiny_tok.encode(tiny_pixels).ids, out.ids)  # deterministic


def test_forward_equals_encode_then_decode_in_eval(tiny_tok, tiny_pixels):
    with torch.no_grad():
        fwd = tiny_tok(tiny_pixels)
    enc = tiny_tok.encode(tiny_pixels)
    assert torch.equal(fwd.ids, enc.ids)
    torch.testing.assert_close(fwd.reconstruction.clamp(-1, 1), tiny_tok.decode(enc.ids), rtol=1e-5, atol=1e-5)
    assert float(fwd.aux_loss) == 0.0


def test_training_gradients_reach_only_trainable_parts(tiny_pixels):
    torch.manual_seed(0)
    tok = ImageTokenizer("tiny").train()
    out = tok(tiny_pixels[:2])
    loss = (out.reconstruction - tok.target(tiny_pixels[:2])).abs().mean() + out.aux_loss
    loss.backward()
    assert all(p.grad is None for p in tok.encoder.parameters())
    trainable = list(tok.trainable_parameters())
    assert all(p.grad is not None for p in trainable)
    assert len(trainable) == len(list(tok.quantizer.parameters())) + len(list(tok.decoder.parameters()))


def test_target_is_image_in_signed_range(tiny_tok, tiny_pixels):
    t = tiny_tok.target(tiny_pixels)
    assert t.min() >= -1.05 and t.max() <= 1.05


@pytest.mark.parametrize("shape", [(1, 3, 64, 64), (3, 112, 112), (1, 1, 112, 112)])
def test_wrong_pixel_shapes_are_explained(tiny_tok, shape):
    with pytest.raises(ValueError, match=r"expected pixels of shape \(B, 3, 112, 112\)"):
        tiny_tok.encode(torch.zeros(shape))


def test_wrong_id_shapes_are_explained(tiny_tok):
    with pytest.raises(ValueError, match=r"expected ids of shape \(B, 64, 2\)"):
        tiny_tok.decode(torch.zeros(1, 576, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="precision"):
        tiny_tok.encode(torch.zeros(1, 3, 112, 112), precision="fp8")


def test_preset_by_name_and_unknown_preset():
    with pytest.raises(ValueError, match="presets: \\['libra-l336', 'tiny'\\]"):
        ImageTokenizer("huge")


def test_unreadable_image_paths_are_named(tiny_tok, asset_images, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(asset_images[0].read_bytes()[:100])  # a truncated PNG
    with pytest.raises(ValueError, match=rf"cannot read image {broken}: corrupt image"):
        tiny_tok.preprocess([asset_images[0], broken])
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    with pytest.raises(ValueError, match=rf"cannot read image {text}: not an image"):
        tiny_tok.preprocess(text)
    # Readable paths give exactly what PIL images give.
    from PIL import Image

    with Image.open(asset_images[1]) as image:
        assert torch.equal(tiny_tok.preprocess([asset_images[1]]), tiny_tok.preprocess([image.copy()]))


# ---- our folder format: save_pretrained / from_pretrained ---------------------------------------------
def test_save_and_load_round_trip(tiny_tok, tiny_pixels, tmp_path):
    folder = tiny_tok.save_pretrained(tmp_path / "tok")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    meta = json.loads((folder / "config.json").read_text())
    assert meta["format"] == "libra-tok" and meta["config"]["clip_model"] == "libra-tiny-vit"
    loaded = ImageTokenizer.from_pretrained(folder).eval()
    assert loaded.config == tiny_tok.config
    for (k, a), (k2, b) in zip(tiny_tok.state_dict().items(), loaded.state_dict().items(), strict=True):
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
