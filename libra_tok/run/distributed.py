"""The processes of a run: one by default, or those torchrun starts (DDP / FSDP).

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them a run is one process and none of
these helpers touches torch.distributed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    """This process's place among the run's processes."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """The process that writes the run folder."""
        return self.rank == 0


def setup_distributed(device: torch.device) -> Dist:
    """Join the process group torchrun describes (NCCL on CUDA, gloo otherwise)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def process_device(requested: str | None) -> tuple[torch.device, Dist]:
    """(device of this process, Dist): `requested` (default: cuda if available); under
    torchrun each process takes the GPU of its local rank."""
    device = torch.device(requested or ("cuda" if torch.cuda.is_available() else "cpu"))
    d = setup_distributed(device)
    if device.type == "cuda" and d.world > 1:
        device = torch.device("cuda", d.local_rank)
        torch.cuda.set_device(device)
    return device, d


def all_reduce_sum(value: torch.Tensor, d: Dist) -> torch.Tensor:
    """`value` summed over the processes, in place (unchanged in a one-process run)."""
    if d.world > 1:
        dist.all_reduce(value)
    return value


def barrier(d: Dist) -> None:
    """Wait for every process (nothing in a one-process run)."""
    if d.world > 1:
        dist.barrier()


__all__ = ["Dist", "setup_distributed", "process_device", "all_reduce_sum", "barrier"]
