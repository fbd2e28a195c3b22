"""TokenizerConfig: presets, JSON round trips, the architecture hash, and a CLIP described by
`clip_vision` (a tower open_clip has no registered name for)."""

import json

import pytest

from libra_tok.config import PRESETS, TokenizerConfig, check_clip_vision, open_clip_name_for

SMALL_VISION = {"width": 48, "layers": 3, "head_width": 16, "mlp_ratio": 2, "patch_size": 16, "image_size": 96}


def small(**overrides):
    return TokenizerConfig.from_preset("tiny", **{"clip_model": "my-clip", "clip_vision": SMALL_VISION,
                                                  "resolution": 96, **overrides})


def test_preset_hashes_do_not_change():
    """Shard manifests and LM runs record these: a new config field must leave them as they are."""
    assert PRESETS["libra-l336"].architecture_hash() == (
        "6a6bd9e1a1d408a2097477ea5fac7d03164c45326866b66f34b0af4936680897")
    assert PRESETS["tiny"].architecture_hash() == "9c1c4a0dc4199e3a6ccb28902607d3512a1cc2e1813dc91d7ae4fed14068f6ba"
    assert "clip_vision" not in PRESETS["tiny"].to_dict()  # config.json files stay as they were written


def test_clip_vision_round_trips_through_json():
    cfg = small()
    assert cfg.clip_vision == {**SMALL_VISION, "mlp_ratio": 2.0, "norm_kwargs": None, "act_kwargs": None}
    loaded = TokenizerConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert loaded == cfg and loaded.architecture_hash() == cfg.architecture_hash()
    assert cfg.clip_vision_cfg == {**SMALL_VISION, "mlp_ratio": 2.0} and cfg.clip_width == 48
    assert cfg.grid_size == 6 and cfg.feature_dim == 48 * 3


def test_the_hash_follows_the_architecture_not_the_label():
    assert small().architecture_hash() == small(clip_model="another-name").architecture_hash()
    assert small().architecture_hash() == TokenizerConfig.from_preset(
        "tiny", clip_model="my-clip", resolution=96,
        clip_vision={**SMALL_VISION, "mlp_ratio": 2.0, "norm_kwargs": None}).architecture_hash()
    assert small().architecture_hash() != small(clip_vision={**SMALL_VISION, "head_width": 48}).architecture_hash()
    assert small().architecture_hash() != small(clip_quick_gelu=False).architecture_hash()


@pytest.mark.parametrize("vision, message", [
    ({**SMALL_VISION, "heads": 3}, r"unknown key\(s\) \['heads'\]"),
    ({"width": 48}, r"missing key\(s\) \['layers', 'patch_size', 'image_size'\]"),
    ({**SMALL_VISION, "head_width": 20}, "width 48 does not split into heads of 20"),
    ({**SMALL_VISION, "layers": 0}, r"clip_vision\['layers'\] must be a positive integer"),
    ("ViT-B-16", "must be a dict of open_clip vision_cfg keys"),
])
def test_bad_clip_vision_is_explained(vision, message):
    with pytest.raises(ValueError, match=message):
        small(clip_vision=vision)


def test_registered_towers_are_named():
    assert open_clip_name_for({"width": 1024, "layers": 24, "patch_size": 14, "image_size": 336}) == "ViT-L-14-336"
    assert open_clip_name_for({"width": 64, "layers": 4, "head_width": 16, "patch_size": 14,
                               "image_size": 112}) == "libra-tiny-vit"
    assert open_clip_name_for(SMALL_VISION) is None
    assert open_clip_name_for({"width": 1024, "layers": 24, "patch_size": 14, "image_size": 336,
                               "norm_kwargs": {"eps": 1e-6}}) is None
    assert check_clip_vision(SMALL_VISION)["norm_kwargs"] is None
