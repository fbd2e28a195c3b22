"""The query partition of bridged attention (docs/attention.md; the `sdpa` backend of libra_lm/attention.py).

Which key/value a query sees depends only on the pair of modalities, so queries of one
modality all attend over one view: text queries see `k` at text keys and `k_x` at vision keys,
vision queries see `k` at vision keys and `k_x` at text keys. Sorting queries by modality and
cutting them into tiles of one modality lets every tile run a plain causal attention over its
view; the causal mask keeps using original positions. The plan below is that sort and cut,
computed with tensor ops on the inputs' device (no host sync), and shared by the CUDA kernels
and the PyTorch reference in `reference.py`. It depends only on `is_vision` and `segment_ids`:
`cached_plan` builds it once per batch for every layer, and the backward reuses the forward's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .layout_cache import LastLayout
from .tiles import KEY_GROUP, PLAN_BLOCK_M


@dataclass
class Plan:
    """perm (B, N) int32: query positions, text first then vision, ascending inside each.
    tiles (B, T, 4) int32: per tile slot `q_start, q_end` (a range of `perm`, one modality),
    `key_lo, key_hi` (the keys any of its queries can see lie in [key_lo, key_hi)); unused
    slots are all zero. Tiles [0, ceil(n_text / block_m)) are text, the next ones vision.
    n_text (B,) int32. segment (B, N) int32 or None: each token's segment as the position of
    its first token (equal labels <=> equal `segment_ids`, whatever their dtype). With
    segments, tile_segment (B, T) int32: the label all of a tile's queries share, else -1; and
    key_segment (B, ceil(N / KEY_GROUP)) int32: the label all keys of a group of KEY_GROUP
    share, else -1. The kernels skip the mask on key blocks whose labels equal the tile's."""

    perm: torch.Tensor
    tiles: torch.Tensor
    n_text: torch.Tensor
    segment: torch.Tensor | None
    block_m: int
    tile_segment: torch.Tensor | None = None
    key_segment: torch.Tensor | None = None

    def tensors(self) -> tuple:
        """(perm, tiles, n_text, segment, tile_segment, key_segment): the op's plan arguments."""
        return self.perm, self.tiles, self.n_text, self.segment, self.tile_segment, self.key_segment

    @property
    def num_tiles(self) -> int:
        return self.tiles.shape[1]


def num_tile_slots(n: int, block_m: int) -> int:
    # ceil(a/m) + ceil(b/m) <= ceil((a+b)/m) + 1 for the two modalities.
    return -(-n // block_m) + 1


def segment_first_position(segment_ids: torch.Tensor) -> torch.Tensor:
    """(B, N) ids of any integer dtype -> (B, N) int64: position of the first token with the
    same id in the row. Segments need not be contiguous."""
    b, n = segment_ids.shape
    sorted_ids, order = segment_ids.sort(dim=1, stable=True)
    new_run = torch.ones_like(sorted_ids, dtype=torch.bool)
    new_run[:, 1:] = sorted_ids[:, 1:] != sorted_ids[:, :-1]
    idx = torch.arange(n, device=segment_ids.device).expand(b, n)
    run_start = torch.where(new_run, idx, torch.zeros_like(idx)).cummax(dim=1).values
    # Stable sort: the first element of a run has the smallest position of that id.
    first_sorted = order.gather(1, run_start)
    return torch.empty_like(order).scatter_(1, order, first_sorted)


def make_plan(is_vision: torch.Tensor, segment_ids: torch.Tensor | None, block_m: int) -> Plan:
    if is_vision.dim() != 2:
        raise ValueError(f"is_vision must be (B, N), got shape {tuple(is_vision.shape)}")
    b, n = is_vision.shape
    dev = is_vision.device
    vis = is_vision.to(torch.int64)
    perm = torch.argsort(vis, dim=1, stable=True)  # text (0) first, positions ascending
    n_text = n - vis.sum(1)  # (B,)
    tiles_text = (n_text + block_m - 1) // block_m
    tiles_vision = (n - n_text + block_m - 1) // block_m
    slots = num_tile_slots(n, block_m)

    t = torch.arange(slots, device=dev).expand(b, slots)
    text_tile = t < tiles_text[:, None]
    u = t - tiles_text[:, None]
    nt = n_text[:, None]
    q_start = torch.where(text_tile, t * block_m, nt + u * block_m)
    q_end = torch.where(text_tile, torch.minimum((t + 1) * block_m, nt), torch.clamp(nt + (u + 1) * block_m, max=n))
    used = t < (tiles_text + tiles_vision)[:, None]
    q_start = torch.where(used, q_start, 0)
    q_end = torch.where(used, q_end, 0)

    # Tile of every sorted slot, then per tile the largest position (+1) and the smallest
    # first-position-of-segment among its queries.
    s = torch.arange(n, device=dev).expand(b, n)
    slot_tile = torch.where(s < nt, s // block_m, tiles_text[:, None] + (s - nt) // block_m)
    key_hi = torch.zeros(b, slots, dtype=torch.int64, device=dev)
    key_hi.scatter_reduce_(1, slot_tile, perm + 1, reduce="amax")
    tile_segment = key_segment = None
    if segment_ids is None:
        segment = None
        key_lo = torch.zeros(b, slots, dtype=torch.int64, device=dev)
    else:
        if segment_ids.shape != is_vision.shape:
            raise ValueError(
                f"segment_ids must have the shape of is_vision {tuple(is_vision.shape)}, got {tuple(segment_ids.shape)}"
            )
        if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
            raise ValueError(f"segment_ids must be an integer tensor, got {segment_ids.dtype}")
        segment = segment_first_position(segment_ids.to(dev))
        sorted_labels = segment.gather(1, perm)
        key_lo = torch.full((b, slots), n, dtype=torch.int64, device=dev)
        key_lo.scatter_reduce_(1, slot_tile, sorted_labels, reduce="amin")
        label_hi = torch.full((b, slots), -1, dtype=torch.int64, device=dev)
        label_hi.scatter_reduce_(1, slot_tile, sorted_labels, reduce="amax")
        key_lo = torch.where(used, key_lo, 0)
        tile_segment = torch.where(used & (key_lo == label_hi), key_lo, -1).to(torch.int32).contiguous()
        groups = -(-n // KEY_GROUP)
        padded = torch.full((b, groups * KEY_GROUP), -1, dtype=torch.int64, device=dev)  # -1: past the sequence
        padded[:, :n] = segment
        padded = padded.view(b, groups, KEY_GROUP)
        lo, hi = padded.amin(-1), padded.amax(-1)
        key_segment = torch.where(lo == hi, lo, -1).to(torch.int32).contiguous()
        segment = segment.to(torch.int32).contiguous()

    tiles = torch.stack([q_start, q_end, key_lo, key_hi], dim=-1).to(torch.int32).contiguous()
    return Plan(
        perm=perm.to(torch.int32).contiguous(),
        tiles=tiles,
        n_text=n_text.to(torch.int32).contiguous(),
        segment=segment,
        block_m=block_m,
        tile_segment=tile_segment,
        key_segment=key_segment,
    )


_plans = LastLayout()


def cached_plan(is_vision: torch.Tensor, segment_ids: torch.Tensor | None, block_m: int = PLAN_BLOCK_M) -> Plan:
    """`make_plan`, built once per batch (libra_lm.kernels.layout_cache)."""
    return _plans.get(lambda: make_plan(is_vision, segment_ids, block_m), is_vision, segment_ids, block_m)
