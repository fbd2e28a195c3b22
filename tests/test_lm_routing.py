"""The routing primitives (libra_lm.routing): the per-modality Router and the low-rank experts."""

import pytest
import torch

from libra_lm.routing import LowRankLinear, Router, exact_low_rank_factors


@pytest.mark.parametrize("pattern", ["mixed", "text", "vision"])
def test_router_applies_each_modality_function(pattern):
    x = torch.randn(3, 7, 5)
    is_vision = {"mixed": torch.rand(3, 7) > 0.5, "text": torch.zeros(3, 7, dtype=torch.bool),
                 "vision": torch.ones(3, 7, dtype=torch.bool)}[pattern]
    router = Router(is_vision)
    out = router(x, lambda t: t * 2 + 1, lambda t: -t)
    expected = torch.where(is_vision[..., None], -x, x * 2 + 1)
    torch.testing.assert_close(out, expected)
    text, vision = router.split(x)
    assert text.shape == (int((~is_vision).sum()), 5) and vision.shape == (int(is_vision.sum()), 5)
    torch.testing.assert_close(router.merge(text, vision), x)


@pytest.mark.parametrize("pattern", ["mixed", "text", "vision"])
def test_router_with_a_known_count_routes_alike(pattern):
    """The decoding path gives the vision count from the host: the same indices, no nonzero."""
    is_vision = {"mixed": torch.rand(4, 6) > 0.5, "text": torch.zeros(4, 6, dtype=torch.bool),
                 "vision": torch.ones(4, 6, dtype=torch.bool)}[pattern]
    counted = Router(is_vision)
    given = Router(is_vision, num_vision=int(is_vision.sum()))
    assert torch.equal(given.vision_index, counted.vision_index) and torch.equal(given.text_index, counted.text_index)
    assert (given.num_vision, given.num_text) == (counted.num_vision, counted.num_text)


def test_low_rank_linear_official_init_and_exact_factors():
    torch.manual_seed(0)
    expert = LowRankLinear(256, 512, 128).requires_grad_(False)
    bridge = LowRankLinear(256, 512, 8, zero_init_b=True).requires_grad_(False)
    assert abs(float(expert.weight_A.std()) - 0.02) < 0.001 and abs(float(expert.weight_B.std()) - 0.02) < 0.001
    assert abs(float(bridge.weight_A.std()) - 0.02) < 0.002 and not bridge.weight_B.any()
    x = torch.randn(4, 256)
    torch.testing.assert_close(expert(x), x @ (expert.weight_B @ expert.weight_A).T, rtol=1e-4, atol=1e-6)
    w = torch.randn(48, 32)
    a, b = exact_low_rank_factors(w)
    assert torch.equal(b @ a, w)
