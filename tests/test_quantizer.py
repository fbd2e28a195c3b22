"""Bit order and ids <-> codes of the LFQ quantizer against the official definition."""

import pytest
import torch
from vector_quantize_pytorch import LFQ

from builders import official_ids
from libra_tok.config import TokenizerConfig
from libra_tok.quantizer import Quantizer


def official_codes(ids: torch.Tensor, bits: int = 9) -> torch.Tensor:
    codes = []
    for g in range(ids.shape[-1]):
        for k in range(bits):
            bit = (ids[..., g] >> (bits - 1 - k)) & 1
            codes.append(bit.float() * 2 - 1)
    return torch.stack(codes, -1)


@pytest.fixture
def quantizer():
    torch.manual_seed(0)
    cfg = TokenizerConfig.from_preset("tiny")
    return Quantizer(cfg, feature_dim=48).eval()


def test_library_lfq_bit_order_is_official():
    torch.manual_seed(1)
    lfq = LFQ(dim=18, codebook_size=512, num_codebooks=2).eval()  # no projections at dim 18
    values = torch.randn(3, 50, 18)
    values[0, 0] = 0.0  # exactly zero is bit 0, as the official `x > 0`
    _, ids, _ = lfq(values)
    assert torch.equal(ids, official_ids(values))
    assert torch.equal(ids[0, 0], torch.tensor([0, 0]))
    assert lfq.mask.tolist() == [256, 128, 64, 32, 16, 8, 4, 2, 1]


def test_quantizer_ids_match_official_definition(quantizer):
    features = torch.randn(2, 64, 48)
    grid = features.transpose(1, 2).reshape(2, 48, 8, 8)
    # Official path by hand: 1x1 conv, row-major flatten, Linear to 18, sign bits.
    h = torch.nn.functional.conv2d(grid, quantizer.quant_conv.weight, quantizer.quant_conv.bias)
    values = torch.nn.functional.linear(h.flatten(2).transpose(1, 2), quantizer.lfq.project_in.weight,
                                        quantizer.lfq.project_in.bias)
    expected = official_ids(values)
    assert torch.equal(quantizer(features).ids, expected)
    assert torch.equal(quantizer.encode_ids(features), expected)
    assert quantizer(features).ids.shape == (2, 64, 2)


def test_ids_codes_round_trip_all_pairs(quantizer):
    a, b = torch.meshgrid(torch.arange(512), torch.arange(512), indexing="ij")
    ids = torch.stack([a.flatten(), b.flatten()], -1)  # every (id1, id2) pair
    codes = quantizer.ids_to_codes(ids)
    assert codes.shape == (512 * 512, 18)
    assert torch.equal(codes, official_codes(ids))
    assert torch.equal(quantizer.codes_to_ids(codes), ids)
    assert torch.equal(official_ids(codes), ids)


def test_ids_to_codes_keeps_leading_shape(quantizer):
    ids = torch.randint(0, 512, (2, 8, 8, 2))  # a 4-d grid must not be read as an image
    assert torch.equal(quantizer.ids_to_codes(ids), official_codes(ids))


def test_ids_to_z_equals_quantized_forward(quantizer):
    features = torch.randn(2, 64, 48)
    out = quantizer(features)
    assert torch.allclose(quantizer.ids_to_z(out.ids), out.z, atol=1e-6)


def test_training_mode_gives_aux_loss_and_gradients(quantizer):
    quantizer.train()
    features = torch.randn(2, 64, 48)
    out = quantizer(features)
    assert out.aux_loss.ndim == 0 and out.aux_loss.item() != 0.0
    (out.z.square().mean() + out.aux_loss).backward()
    assert quantizer.quant_conv.weight.grad is not None
    assert quantizer.quant_conv.weight.grad.abs().sum() > 0  # straight-through reaches the input side


@pytest.mark.parametrize("bad, message", [
    (torch.full((1, 64, 2), 512), r"\[0, 512\)"),
    (torch.full((1, 64, 2), -1), r"\[0, 512\)"),
    (torch.zeros(1, 64, 3, dtype=torch.long), "2 codebooks"),
    (torch.zeros(1, 64, 2), "integer"),
])
def test_bad_ids_are_rejected(quantizer, bad, message):
    with pytest.raises((ValueError, TypeError), match=message):
        quantizer.ids_to_codes(bad)


def test_ddp_entropy_fix_is_scoped_to_our_quantizer(monkeypatch):
    """The upstream LFQ helper is replaced only while our quantizer runs in a multi-process
    group; importing libra_tok leaves the library as it is for everyone else."""
    import vector_quantize_pytorch.lookup_free_quantization as lfq_module

    from libra_tok import quantizer as q

    original = lfq_module.maybe_distributed_mean
    assert original is not q._distributed_mean
    with q._correct_entropy_under_ddp():  # one process: nothing to correct
        assert lfq_module.maybe_distributed_mean is original
    monkeypatch.setattr(q.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(q.dist, "get_world_size", lambda: 2)
    seen = []
    model = Quantizer(TokenizerConfig.from_preset("tiny"), feature_dim=48).train()
    monkeypatch.setattr(model.lfq, "forward", lambda *a, **k: seen.append(lfq_module.maybe_distributed_mean)
                        or (torch.zeros(1, 64, 64), torch.zeros(1, 64, 2, dtype=torch.long), torch.zeros(())))
    model(torch.randn(1, 64, 48))
    assert seen == [q._distributed_mean]
    assert lfq_module.maybe_distributed_mean is original
