"""Training losses: official discriminator layout, hinge loss, adaptive weight, LPIPS term."""

import pytest
import torch
from torch import nn

from libra_tok.loss import LossWeights, NLayerDiscriminator, TokenizerLoss, adaptive_weight, hinge_d_loss


def test_discriminator_has_official_key_layout():
    disc = NLayerDiscriminator()
    convs = {k.split(".")[1] for k, v in disc.state_dict().items() if v.ndim == 4}
    norms = {k.split(".")[1] for k in disc.state_dict() if k.endswith("running_mean")}
    assert convs == {"0", "2", "5", "8", "11"} and norms == {"3", "6", "9"}  # main.{0,2,3,5,6,8,9,11}
    assert disc.state_dict()["main.8.weight"].shape == (512, 256, 4, 4)
    assert disc(torch.randn(2, 3, 112, 112)).shape == (2, 1, 12, 12)  # 30x30-style patch logits


def test_hinge_loss():
    real = torch.tensor([2.0, 0.5, -1.0])
    fake = torch.tensor([-2.0, 0.0, 1.0])
    expected = 0.5 * ((0 + 0.5 + 2.0) / 3 + (0 + 1.0 + 2.0) / 3)
    assert hinge_d_loss(real, fake).item() == pytest.approx(expected)


def test_adaptive_weight_is_gradient_norm_ratio():
    torch.manual_seed(0)
    last = nn.Parameter(torch.randn(4, 3))
    x = torch.randn(5, 4)
    nll = (x @ last).square().mean()
    g = -(x @ last).sum()
    gn = torch.autograd.grad(nll, last, retain_graph=True)[0].norm()
    gg = torch.autograd.grad(g, last, retain_graph=True)[0].norm()
    w = adaptive_weight(nll, g, last, disc_weight=0.5)
    assert w.item() == pytest.approx((gn / (gg + 1e-4)).item() * 0.5, rel=1e-6)
    assert not w.requires_grad


def test_generator_loss_parts_and_gan_start():
    torch.manual_seed(0)
    from libra_tok.metrics import build_lpips

    perceptual = build_lpips("vgg", random_backbone=True)  # LPIPS heads of the package, random VGG trunk
    disc = NLayerDiscriminator(ndf=8)
    loss = TokenizerLoss(LossWeights(l1=1.0, l2=0.5, perceptual=0.3, codebook=2.0, disc=1.0, disc_start=10),
                         perceptual, disc)
    head = nn.Conv2d(3, 3, 3, padding=1)
    target = torch.rand(2, 3, 64, 64) * 2 - 1
    recon = head(target)
    aux = torch.tensor(0.25)
    before, parts = loss.generator_loss(target, recon, aux, step=9, last_layer=head.weight)
    expected = (parts["l1"] + 0.5 * parts["l2"] + 0.3 * parts["lpips"] + 2.0 * 0.25)
    assert before.item() == pytest.approx(expected, rel=1e-5)
    assert parts["l1"] == pytest.approx((target - recon).abs().mean().item(), rel=1e-6)
    assert "g_loss" not in parts and not loss.gan_active(9) and loss.gan_active(10)
    after, parts = loss.generator_loss(target, recon, aux, step=10, last_layer=head.weight)
    assert after.item() == pytest.approx(before.item() + parts["d_weight"] * parts["g_loss"], rel=1e-5)
    d_loss, d_parts = loss.discriminator_loss(target, recon, step=10)
    assert d_loss.requires_grad and d_parts["d_loss"] > 0
