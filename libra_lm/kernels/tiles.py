"""Tile configurations of the fused kernels and the shared memory each needs.

Mirrors `KernelConfig` and `fwd_smem_bytes` / `bwd_smem_bytes` of csrc/bridged_attn.h (a test
reads the header and compares; the extension's `config()` is checked against this table when
it loads, and the emulator reports the shared memory of every launch). Variant 0 of a head
dim is the fast one; a later variant needs less shared memory per block, so that GPUs with a
99 KiB opt-in limit (sm_86, sm_89, sm_120) run d = 128 too. `choose` picks the first that fits.
"""

from __future__ import annotations

from dataclasses import dataclass

PLAN_BLOCK_M = 128  # queries per tile of the partition plan = the forward's block
KEY_GROUP = 32  # keys per entry of the plan's key_segment


@dataclass(frozen=True)
class TileConfig:
    head_dim: int
    variant: int
    fwd_block_n: int  # keys per forward step
    fwd_warps: int  # 32 query rows each
    bwd_block_m: int  # queries per backward step
    bwd_block_n: int  # keys per backward block, 16 per warp
    fwd_block_m: int = PLAN_BLOCK_M

    @property
    def bwd_warps(self) -> int:
        return self.bwd_block_n // 16

    @property
    def fwd_smem(self) -> int:
        """Bytes of dynamic shared memory of the forward block (16-bit inputs, padded rows)."""
        return (self.fwd_block_m + 4 * self.fwd_block_n) * (self.head_dim + 8) * 2

    @property
    def bwd_smem(self) -> int:
        m, n, d = self.bwd_block_m, self.bwd_block_n, self.head_dim
        return (2 * n + 4 * m) * (d + 8) * 2 + n * (m + 8) * 2 + 2 * m * 16

    @property
    def smem(self) -> int:
        return max(self.fwd_smem, self.bwd_smem)

    def as_extension_tuple(self) -> tuple[int, ...]:
        """The layout of the extension's `config(head_dim, variant)`."""
        return (self.fwd_block_m, self.fwd_block_n, self.fwd_warps, self.bwd_block_m, self.bwd_block_n,
                self.bwd_warps, self.fwd_smem, self.bwd_smem)


CONFIGS: dict[int, tuple[TileConfig, ...]] = {
    64: (TileConfig(64, 0, fwd_block_n=64, fwd_warps=4, bwd_block_m=64, bwd_block_n=128),),
    128: (
        TileConfig(128, 0, fwd_block_n=64, fwd_warps=4, bwd_block_m=64, bwd_block_n=128),
        TileConfig(128, 1, fwd_block_n=32, fwd_warps=4, bwd_block_m=32, bwd_block_n=64),
    ),
}
HEAD_DIMS = tuple(CONFIGS)


def choose(head_dim: int, smem_optin: int) -> TileConfig | None:
    """The fastest configuration whose forward and backward fit `smem_optin` bytes of shared
    memory per block; None when none does (or the head dim has no kernel)."""
    for config in CONFIGS.get(head_dim, ()):
        if config.smem <= smem_optin:
            return config
    return None


def config_for(head_dim: int, variant: int = 0) -> TileConfig:
    return CONFIGS[head_dim][variant]


def smallest(head_dim: int) -> TileConfig:
    return min(CONFIGS[head_dim], key=lambda c: c.smem)
