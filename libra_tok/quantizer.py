"""Lookup-free quantization of CLIP features into two 9-bit ids per patch.

Official layout (`libra/models/libra/taming/models/vqgan.py` and
`libra/models/libra/taming/modules/quantization/lookup_free_quantization.py`;
docs/official-formats.md#tokenizer-behaviour): `quant_conv` 1x1 conv (4096 -> 1024), LFQ with
`project_in` Linear(1024 -> 18), sign (value > 0 -> 1, exactly 0 -> 0), split into
2 codebooks of 9 bits: dims 0-8 -> id1, dims 9-17 -> id2, first dim of a group = MSB.
Decoding: ids -> +-1 codes -> `project_out` Linear(18 -> 1024) -> `post_quant_conv`.
vector-quantize-pytorch's LFQ(dim, codebook_size=512, num_codebooks=2) has the same bit
order and the same persistent `mask` buffer (tests/test_quantizer.py proves it).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist
import vector_quantize_pytorch.lookup_free_quantization as _lfq_module
from torch import nn
from vector_quantize_pytorch import LFQ

from .config import TokenizerConfig


def _distributed_mean(t: torch.Tensor) -> torch.Tensor:
    """Differentiable mean over DDP ranks of LFQ's batch-average code probabilities."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return t
    from torch.distributed import nn as dist_nn

    return dist_nn.all_reduce(t) / dist.get_world_size()


@contextlib.contextmanager
def _correct_entropy_under_ddp() -> Iterator[None]:
    """While our LFQ runs, replace vector-quantize-pytorch's `maybe_distributed_mean`.

    Upstream bug (vector-quantize-pytorch 1.20 to 1.32, the newest checked): it discards the
    result of the out-of-place `torch.distributed.nn.all_reduce`, so under DDP the entropy term
    uses avg_prob / world_size instead of the mean over ranks, and it caches `is_distributed`
    at its first call. The replacement is installed only for the duration of our quantizer's
    forward in a multi-process run, so other users of the library in the process are untouched.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        yield
        return
    original = _lfq_module.maybe_distributed_mean
    _lfq_module.maybe_distributed_mean = _distributed_mean
    try:
        yield
    finally:
        _lfq_module.maybe_distributed_mean = original


@dataclass
class QuantizerOutput:
    z: torch.Tensor  # (B, z_channels, G, G): post_quant_conv(project_out(codes)), decoder input
    ids: torch.Tensor  # (B, G*G, num_codebooks) long, row-major grid order
    aux_loss: torch.Tensor  # LFQ entropy + commitment loss (0 in eval mode)


class Quantizer(nn.Module):
    def __init__(self, config: TokenizerConfig, feature_dim: int):
        super().__init__()
        self.grid_size = config.grid_size
        self.num_codebooks = config.num_codebooks
        self.codebook_bits = config.codebook_bits
        self.inv_temperature = config.inv_temperature
        self.quant_conv = nn.Conv2d(feature_dim, config.embed_dim, 1)
        self.lfq = LFQ(
            dim=config.embed_dim,
            codebook_size=config.codebook_size,  # per codebook
            num_codebooks=config.num_codebooks,
            entropy_loss_weight=config.entropy_loss_weight,
            commitment_loss_weight=config.commitment_loss_weight,
            diversity_gamma=config.diversity_gamma,
        )
        self.post_quant_conv = nn.Conv2d(config.embed_dim, config.z_channels, 1)

    def reset_nonpersistent_buffers(self) -> None:
        """Rebuild LFQ buffers that are not in a state dict (after meta-device construction)."""
        lfq = self.lfq
        device = lfq.mask.device
        lfq.zero = torch.tensor(0.0, device=device)
        bits = ((torch.arange(lfq.codebook_size, device=device)[:, None].int() & lfq.mask) != 0).float()
        lfq.codebook = lfq.bits_to_codes(bits).float()

    def _to_grid(self, features: torch.Tensor) -> torch.Tensor:
        b, n, c = features.shape
        g = self.grid_size
        if n != g * g:
            raise ValueError(f"expected {g * g} feature tokens ({g}x{g} grid), got {n}")
        return features.transpose(1, 2).reshape(b, c, g, g)

    def forward(self, features: torch.Tensor) -> QuantizerOutput:
        """features (B, G*G, C) -> codes through the straight-through estimator, ids, aux loss."""
        # Projection and sign in fp32 whatever the surrounding autocast: bf16 would flip
        # the ids of values near zero.
        with torch.autocast(device_type=features.device.type, enabled=False):
            h = self.quant_conv(self._to_grid(features.float()))
            tokens = h.flatten(2).transpose(1, 2)  # (B, G*G, embed_dim), row-major
            with _correct_entropy_under_ddp():
                quantized, ids, aux_loss = self.lfq(tokens, inv_temperature=self.inv_temperature)
            z = self.post_quant_conv(self._to_grid(quantized))
        return QuantizerOutput(z=z, ids=ids.long(), aux_loss=aux_loss)

    @torch.no_grad()
    def encode_ids(self, features: torch.Tensor) -> torch.Tensor:
        """features (B, G*G, C) -> ids (B, G*G, num_codebooks): the ids of `forward` without
        the codes, the decoder-side projections or the auxiliary loss."""
        with torch.autocast(device_type=features.device.type, enabled=False):
            h = self.quant_conv(self._to_grid(features.float()))
            values = self.lfq.project_in(h.flatten(2).transpose(1, 2))
        return self.codes_to_ids(values)

    # ---- ids <-> codes --------------------------------------------------------------------
    def ids_to_codes(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., num_codebooks) ids -> (..., num_codebooks * bits) codes in {-1, +1}."""
        self._check_ids(ids)
        # LFQ reads a 4-d input as an image and moves channels; a flat 3-d view never is.
        flat = ids.long().reshape(-1, 1, self.num_codebooks)
        codes = self.lfq.indices_to_codes(flat, project_out=False)
        return codes.reshape(*ids.shape[:-1], self.num_codebooks * self.codebook_bits)

    def codes_to_ids(self, codes: torch.Tensor) -> torch.Tensor:
        """(..., num_codebooks * bits) codes, or the real values before the sign -> ids;
        value > 0 is bit 1 (MSB first)."""
        bits = (codes > 0).long().unflatten(-1, (self.num_codebooks, self.codebook_bits))
        return (bits * self.lfq.mask.long()).sum(-1)

    def ids_to_z(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, G*G, num_codebooks) ids -> decoder input (B, z_channels, G, G)."""
        with torch.autocast(device_type=ids.device.type, enabled=False):
            codes = self.ids_to_codes(ids).to(self.post_quant_conv.weight.dtype)
            return self.post_quant_conv(self._to_grid(self.lfq.project_out(codes)))

    def _check_ids(self, ids: torch.Tensor) -> None:
        if ids.shape[-1] != self.num_codebooks:
            raise ValueError(f"ids must end in a dimension of {self.num_codebooks} codebooks, got shape "
                             f"{tuple(ids.shape)}")
        if ids.dtype.is_floating_point:
            raise TypeError(f"ids must be an integer tensor, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.lfq.codebook_size):
            raise ValueError(
                f"ids must lie in [0, {self.lfq.codebook_size}), got range "
                f"[{int(ids.min())}, {int(ids.max())}]"
            )


__all__ = ["Quantizer", "QuantizerOutput"]
