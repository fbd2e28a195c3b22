"""Tokenizer training losses: reconstruction, LPIPS, PatchGAN hinge with the adaptive weight.

The official `VQLPIPSWithDiscriminator` (`libra/models/libra/taming/modules/losses/vqperceptual.py`;
docs/official-formats.md#tokenizer-behaviour), made runnable:
    nll   = mean(l1 * |x - x^| + l2 * (x - x^)^2 + perceptual_weight * LPIPS(x, x^))
    g     = -mean(D(x^))
    w     = clamp(||grad_last nll|| / (||grad_last g|| + 1e-4), 0, 1e4) * disc_weight
    L_gen = nll + w * disc_factor * g + codebook_weight * LFQ_aux      (g only after disc_start)
    L_D   = disc_factor * 0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x^))))
The LFQ auxiliary loss (entropy 0.1, diversity 2.5, commitment 1.0, inverse temperature 100)
comes from the quantizer. Images are in [-1, 1] (CLIP input un-normalised, `ImageTokenizer.target`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class NLayerDiscriminator(nn.Module):
    """PatchGAN discriminator (taming/pix2pix), n_layers=3, BatchNorm: official key layout
    `main.{0,2,3,5,6,8,9,11}`."""

    def __init__(self, in_channels: int = 3, ndf: int = 64, n_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, True)]
        mult = 1
        for n in range(1, n_layers + 1):
            prev, mult = mult, min(2**n, 8)
            stride = 2 if n < n_layers else 1
            layers += [
                nn.Conv2d(ndf * prev, ndf * mult, 4, stride, 1, bias=False),
                nn.BatchNorm2d(ndf * mult),
                nn.LeakyReLU(0.2, True),
            ]
        layers.append(nn.Conv2d(ndf * mult, 1, 4, 1, 1))
        self.main = nn.Sequential(*layers)
        self.apply(_init_weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.main(x)


def _init_weights(m: nn.Module) -> None:
    # taming `weights_init`: DCGAN-style.
    if isinstance(m, nn.Conv2d):
        nn.init.normal_(m.weight, 0.0, 0.02)
    elif isinstance(m, nn.BatchNorm2d):
        nn.init.normal_(m.weight, 1.0, 0.02)
        nn.init.zeros_(m.bias)


def hinge_d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def adaptive_weight(nll: torch.Tensor, g_loss: torch.Tensor, last_layer: torch.Tensor,
                    disc_weight: float) -> torch.Tensor:
    """Balance the GAN gradient against the reconstruction gradient at the decoder's last layer."""
    nll_grad = torch.autograd.grad(nll, last_layer, retain_graph=True)[0]
    g_grad = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    weight = nll_grad.norm() / (g_grad.norm() + 1e-4)
    return torch.clamp(weight, 0.0, 1e4).detach() * disc_weight


@dataclass
class LossWeights:
    l1: float = 1.0
    l2: float = 0.0
    perceptual: float = 1.0
    codebook: float = 1.0
    disc: float = 1.0
    disc_factor: float = 1.0
    disc_start: int = 5000


class TokenizerLoss(nn.Module):
    """Generator and discriminator losses; `perceptual` is an LPIPS module (or None when its
    weight is 0), `discriminator` a PatchGAN (or None to train without a GAN)."""

    def __init__(self, weights: LossWeights, perceptual: nn.Module | None, discriminator: nn.Module | None):
        super().__init__()
        self.w = weights
        self.perceptual = perceptual
        if perceptual is not None:
            perceptual.requires_grad_(False).eval()
        self.discriminator = discriminator

    def gan_active(self, step: int) -> bool:
        return self.discriminator is not None and self.w.disc_factor > 0 and step >= self.w.disc_start

    def reconstruction(self, target: torch.Tensor, recon: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts: dict[str, torch.Tensor] = {}
        rec = recon.float()
        tgt = target.float()
        per_pixel = torch.zeros((), device=rec.device)
        if self.w.l1:
            parts["l1"] = (tgt - rec).abs().mean()
            per_pixel = per_pixel + self.w.l1 * parts["l1"]
        if self.w.l2:
            parts["l2"] = (tgt - rec).square().mean()
            per_pixel = per_pixel + self.w.l2 * parts["l2"]
        if self.perceptual is not None and self.w.perceptual:
            parts["lpips"] = self.perceptual(tgt, rec).mean()
            per_pixel = per_pixel + self.w.perceptual * parts["lpips"]
        return per_pixel, parts

    def generator_loss(self, target: torch.Tensor, recon: torch.Tensor, aux_loss: torch.Tensor, step: int,
                       last_layer: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, float]]:
        nll, parts = self.reconstruction(target, recon)
        total = nll + self.w.codebook * aux_loss
        log = {k: float(v.detach()) for k, v in parts.items()}
        log["aux"] = float(aux_loss.detach())
        if self.gan_active(step):
            g_loss = -self.discriminator(recon).float().mean()
            if last_layer is not None and torch.is_grad_enabled():
                d_weight = adaptive_weight(nll, g_loss, last_layer, self.w.disc)
            else:
                d_weight = torch.tensor(self.w.disc, device=nll.device)
            total = total + d_weight * self.w.disc_factor * g_loss
            log["g_loss"] = float(g_loss.detach())
            log["d_weight"] = float(d_weight)
        return total, log

    def discriminator_loss(self, target: torch.Tensor, recon: torch.Tensor, step: int,
                           disc: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Hinge loss on real and reconstructed images (`disc`: e.g. the DDP-wrapped module)."""
        disc = disc if disc is not None else self.discriminator
        logits_real = disc(target.detach()).float()
        logits_fake = disc(recon.detach()).float()
        d_loss = self.w.disc_factor * hinge_d_loss(logits_real, logits_fake)
        return d_loss, {"d_loss": float(d_loss.detach()), "logits_real": float(logits_real.detach().mean()),
                        "logits_fake": float(logits_fake.detach().mean())}


__all__ = ["NLayerDiscriminator", "hinge_d_loss", "adaptive_weight", "LossWeights", "TokenizerLoss"]
