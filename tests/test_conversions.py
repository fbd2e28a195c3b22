"""Official and HF formats -> ours (libra_tok.conversions): pure functions of dicts. The official
state-dict renaming is exercised end to end in tests/test_checkpoint.py."""

import pytest
import torch

from builders import official_l336_shapes
from libra_tok.config import TokenizerConfig
from libra_tok.conversions import (
    clip_fields,
    clip_fields_from_hf_config,
    clip_state_dict_to_open_clip,
    clip_vision_from_shapes,
    config_from_official_yaml,
    official_to_ours,
)
from libra_tok.weight_files import CheckpointError


def test_hf_config_of_a_clip_model_or_a_vision_model():
    """A CLIPModel config.json nests the tower in vision_config; a CLIPVisionModel's has it at the
    top; keys left out take transformers' CLIPVisionConfig defaults."""
    l336 = {"model_type": "clip", "vision_config": {"hidden_size": 1024, "intermediate_size": 4096,
                                                    "num_attention_heads": 16, "num_hidden_layers": 24,
                                                    "image_size": 336, "patch_size": 14}}
    assert clip_fields_from_hf_config(l336, "openai-clip-vit-large-patch14-336") == {
        "clip_model": "ViT-L-14-336", "clip_vision": None, "clip_quick_gelu": True}
    b32 = clip_fields_from_hf_config({"model_type": "clip_vision_model", "hidden_size": 768,
                                      "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6}, "b32")
    assert b32["clip_model"] == "b32" and b32["clip_quick_gelu"] is False
    assert b32["clip_vision"] == {"width": 768, "layers": 12, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 32,
                                  "image_size": 224, "norm_kwargs": {"eps": 1e-6},
                                  "act_kwargs": {"approximate": "tanh"}}


@pytest.mark.parametrize("config, message", [
    ({"model_type": "llama", "hidden_size": 64}, "is not an HF CLIP config"),
    ({"hidden_size": 64, "hidden_act": "relu"}, "hidden_act 'relu' has no open_clip equivalent"),
    ({"hidden_size": 64, "num_attention_heads": 3}, "hidden_size 64 does not split into 3 attention heads"),
    ({"hidden_size": 64, "num_attention_heads": 1, "num_channels": 1}, "num_channels 1"),
])
def test_unusable_hf_configs_are_explained(config, message):
    with pytest.raises(CheckpointError, match=message):
        clip_fields_from_hf_config(config, "x", "clip/config.json")


@pytest.mark.parametrize("width, mlp", [(64, 256), (48, 100), (1280, 5120), (128, 333)])
def test_mlp_width_is_kept_exactly(width, mlp):
    """open_clip builds int(width * mlp_ratio) channels: the ratio must give the checkpoint's MLP
    width even where the float division rounds down."""
    hf = {"hidden_size": width, "intermediate_size": mlp, "num_attention_heads": 1}
    assert int(width * clip_fields_from_hf_config(hf, "x")["clip_vision"]["mlp_ratio"]) == mlp
    if width % 64 == 0:
        with torch.device("meta"):
            shapes = {"conv1.weight": torch.empty(width, 3, 14, 14), "positional_embedding": torch.empty(65, width),
                      "transformer.resblocks.0.mlp.c_fc.weight": torch.empty(mlp, width)}
        vision = clip_vision_from_shapes(shapes)
        assert int(width * vision["mlp_ratio"]) == mlp and vision["image_size"] == 8 * 14 and vision["layers"] == 1


def test_shapes_that_tell_no_architecture_are_explained():
    with pytest.raises(CheckpointError, match="cannot tell the CLIP architecture without"):
        clip_vision_from_shapes({"conv1.weight": torch.empty(64, 3, 14, 14)})
    with pytest.raises(CheckpointError, match="are not a square grid"):
        clip_vision_from_shapes({"conv1.weight": torch.empty(64, 3, 14, 14),
                                 "positional_embedding": torch.empty(60, 64),
                                 "transformer.resblocks.0.mlp.c_fc.weight": torch.empty(256, 64)})


def test_clip_weights_in_any_naming():
    hf = {"vision_model.embeddings.patch_embedding.weight": torch.ones(1)}
    assert clip_state_dict_to_open_clip(hf) == {"conv1.weight": hf["vision_model.embeddings.patch_embedding.weight"]}
    assert clip_state_dict_to_open_clip({"visual.conv1.weight": torch.ones(1)}).keys() == {"conv1.weight"}
    with pytest.raises(CheckpointError, match="no CLIP vision weights found in state dict"):
        clip_state_dict_to_open_clip({"fc.weight": torch.ones(1)})


def test_official_yaml_without_ddconfig_is_explained():
    with pytest.raises(CheckpointError, match="vision_tokenizer_config.yaml has no params.ddconfig section"):
        config_from_official_yaml({"params": {"embed_dim": 1024}}, {"clip_model": "ViT-L-14-336"})
    cfg = config_from_official_yaml(
        {"params": {"embed_dim": 1024, "codebook_size": 512, "num_codebook": 2,
                    "ddconfig": {"encoder_name": "openai-clip-vit-large-patch14-336", "select_layer": [2, 10, 18, 22],
                                 "z_channels": 1024, "resolution": 336, "ch": 128, "ch_mult": [1, 1, 2, 4, 8],
                                 "num_res_blocks": 2, "attn_resolutions": [24], "num_attn_head": 8}}},
        {"clip_model": "ViT-L-14-336"})
    assert cfg == TokenizerConfig.from_preset("libra-l336", clip_pretrained=None)  # the released yaml is the preset


def test_shapes_of_the_official_clip_name_its_open_clip_model():
    """The official CLIP-L/336, read from shapes, is open_clip's ViT-L-14-336: the config (and its
    hash) equal the libra-l336 preset's however the architecture was found."""
    with torch.device("meta"):
        fake = {k: torch.empty(v) for k, v in official_l336_shapes().items()}
    tower = {k[len("encoder.tower."):]: v for k, v in official_to_ours(fake).items() if k.startswith("encoder.tower.")}
    vision = clip_vision_from_shapes(tower)
    assert vision == {"width": 1024, "layers": 24, "head_width": 64, "mlp_ratio": 4.0, "patch_size": 14,
                      "image_size": 336}
    assert clip_fields("openai-clip-vit-large-patch14-336", vision, True) == {
        "clip_model": "ViT-L-14-336", "clip_vision": None, "clip_quick_gelu": True}
