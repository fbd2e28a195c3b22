"""The official folder -> our config and state (libra_tok.official): finding the files and the
CLIP architecture. Loading whole official tokenizers is in tests/test_checkpoint.py."""

import json

import pytest
import torch

from builders import hf_tiny_clip_config
from libra_tok.official import KNOWN_OFFICIAL_CLIPS, clip_from_argument, clip_of_encoder_name, find_official_files
from libra_tok.weight_files import CheckpointError


def test_find_official_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no vqgan.ckpt; expected an official Libra folder"):
        find_official_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="official tokenizer checkpoint .*nope.ckpt does not exist"):
        find_official_files(tmp_path / "nope.ckpt")
    (tmp_path / "vqgan.ckpt").write_bytes(b"x")
    assert find_official_files(tmp_path) == (tmp_path / "vqgan.ckpt", None)
    (tmp_path / "vision_tokenizer_config.yaml").write_text("params: {}")
    assert find_official_files(tmp_path / "vqgan.ckpt") == (tmp_path / "vqgan.ckpt",
                                                             tmp_path / "vision_tokenizer_config.yaml")


def test_clip_argument(tmp_path):
    assert clip_from_argument("ViT-B-16") == {"clip_model": "ViT-B-16", "clip_vision": None}
    hf_tiny_clip_config().save_pretrained(tmp_path / "tiny")
    assert clip_from_argument(tmp_path / "tiny") == {"clip_model": "libra-tiny-vit", "clip_vision": None,
                                                     "clip_quick_gelu": True}
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds neither config.json nor a weights file"):
        clip_from_argument(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="CLIP folder or weights file clip.bin does not exist"):
        clip_from_argument("clip.bin")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text("{oops")
    with pytest.raises(CheckpointError, match=r"bad/config.json is not valid JSON"):
        clip_from_argument(tmp_path / "bad")


def test_encoder_name_folder_then_known_name_then_shapes(tmp_path, caplog):
    config = hf_tiny_clip_config()
    config.save_pretrained(tmp_path / "my-clip")
    assert clip_of_encoder_name("my-clip", tmp_path, {}, "ckpt")["clip_model"] == "libra-tiny-vit"
    # the folder wins over the known name; without it the known name needs no folder
    (tmp_path / "openai-clip-vit-large-patch14-336").mkdir()
    (tmp_path / "openai-clip-vit-large-patch14-336" / "config.json").write_text(json.dumps(config.to_dict()))
    assert clip_of_encoder_name("openai-clip-vit-large-patch14-336", tmp_path, {}, "ckpt")["clip_model"] == (
        "libra-tiny-vit")
    assert clip_of_encoder_name("openai-clip-vit-large-patch14-336", tmp_path / "elsewhere", {}, "ckpt") == {
        "clip_model": KNOWN_OFFICIAL_CLIPS["openai-clip-vit-large-patch14-336"], "clip_vision": None}
    with torch.device("meta"):
        tower = {"conv1.weight": torch.empty(128, 3, 16, 16), "positional_embedding": torch.empty(50, 128),
                 "transformer.resblocks.0.mlp.c_fc.weight": torch.empty(512, 128),
                 "transformer.resblocks.1.mlp.c_fc.weight": torch.empty(512, 128)}
    with caplog.at_level("WARNING", logger="libra_tok"):
        fields = clip_of_encoder_name("some/clip-b", tmp_path, tower, "ckpt")
    assert fields["clip_model"] == "clip-b" and fields["clip_vision"]["image_size"] == 7 * 16
    assert "assumed 2 heads (width / 64)" in caplog.text
