"""Sampling image ids with the vision heads: the decoding loop of image completion and
text-to-image generation, with optional classifier-free guidance.

    ids = sample_image_ids(model, prompts, num_new=576, temperature=1.0, generator=g)   # (B, 576, 2)

Prompts end inside an image (BOI, or BOI and the first patches); each step draws one id per
codebook from the vision heads (BOI and EOI excluded: the image is a fixed 24 x 24 grid) and
feeds it back through the KV cache with zero CLIP features, as `libra_lm.generate` does inside
an image. The prompts' own CLIP features are not used either: the paper disables the
contiguous signal for visual sequential modeling (§4.3).

Why a loop of its own beside `libra_lm.generate.generate`: classifier-free guidance (LlamaGen's
`logits = uncond + scale * (cond - uncond)`) runs every prompt twice, with its caption and with
the empty one, and both rows must be fed the same drawn id, which a per-row sampler cannot do.
Without guidance the loop draws what `generate` draws greedily (tests/test_visual_t2i.py).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from ..generate import check_sampling, collate_prompts, sample_logits
from ..model import KVCache
from ..segments import Segment

if TYPE_CHECKING:
    from ..config import LibraConfig
    from ..model import LibraForCausalLM


def grid_side(config: LibraConfig) -> int:
    """Patches per side of the LM's image grid (24 for Libra); ValueError unless square."""
    side = math.isqrt(config.num_image_tokens)
    if side * side != config.num_image_tokens:
        raise ValueError(f"num_image_tokens {config.num_image_tokens} is not a square grid")
    return side


def open_image_patches(prompt: Segment, config: LibraConfig) -> int:
    """Patches after the last BOI of a prompt that ends inside an image (0: it ends at BOI);
    ValueError if it ends outside one."""
    col = prompt.ids[:, 0].tolist()
    boi = max((i for i, t in enumerate(col) if t == config.boi_token_id), default=-1)
    eoi = max((i for i, t in enumerate(col) if t == config.eoi_token_id), default=-1)
    if boi < 0 or eoi > boi:
        raise ValueError("an image prompt must end inside an image: with BOI, or BOI and the first patches")
    return len(col) - 1 - boi


@torch.no_grad()
def sample_image_ids(
    model: LibraForCausalLM,
    prompts: Sequence[Segment],
    num_new: int,
    *,
    unconditional: Sequence[Segment] | None = None,
    cfg_scale: float | None = None,
    temperature: float = 1.0,
    top_p: float = 1.0,
    top_k: int = 0,
    generator: torch.Generator | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """The next `num_new` patches of every prompt: (B, num_new, num_codebooks) image ids in
    [0, codebook_size).

    cfg_scale (None = no guidance): each prompt is also run as `unconditional[i]` (same
    number of open patches) and every step draws from uncond + cfg_scale * (cond - uncond),
    feeding the drawn ids to both rows; 1 draws what no guidance draws (at twice the cost).
    temperature 0 is greedy; top_p / top_k as `libra_lm.generate.sample_logits`."""
    cfg = model.config
    check_sampling(temperature, top_p, top_k)
    if not prompts:
        raise ValueError("no prompts to continue")
    open_patches = [open_image_patches(p, cfg) for p in prompts]
    if num_new < 0 or any(k + num_new > cfg.num_image_tokens for k in open_patches):
        raise ValueError(f"num_new must be >= 0 and fit the image: {cfg.num_image_tokens} patches, "
                         f"{max(open_patches)} already in a prompt, {num_new} asked for")
    guided = cfg_scale is not None
    if guided:
        if not math.isfinite(cfg_scale):
            raise ValueError(f"cfg_scale must be a finite number, got {cfg_scale}")
        if unconditional is None or len(unconditional) != len(prompts):
            raise ValueError("classifier-free guidance needs one unconditional prompt per prompt")
        if [open_image_patches(p, cfg) for p in unconditional] != open_patches:
            raise ValueError("each unconditional prompt must hold as many image patches as its prompt")
    rows = list(prompts) + (list(unconditional) if guided else [])
    b = len(prompts)
    device = model.device
    if num_new == 0:
        return torch.zeros(b, 0, cfg.num_codebooks, dtype=torch.long, device=device)
    longest = max(p.ids.shape[0] for p in rows)
    if longest + num_new > cfg.max_position_embeddings:
        raise ValueError(f"a prompt of {longest} tokens and {num_new} patches do not fit the model's context of "
                         f"{cfg.max_position_embeddings} tokens (max_position_embeddings); shorten the prompt")

    ids, _, mask = collate_prompts(rows, cfg, device)  # CLIP features left out: zero (§4.3)
    was_training = model.training
    model.eval()
    cache = KVCache(cfg.num_hidden_layers, capacity=ids.shape[1] + num_new)
    out = model(ids, None, mask, past_key_values=cache, logits_to_keep=1)
    drawn = []
    for step in tqdm(range(num_new), desc="patches", disable=not progress, leave=False):
        logits = out.vision_logits[:, -1, :, : cfg.codebook_size]  # (rows, codebooks, ids): no BOI/EOI
        if guided:
            cond, uncond = logits[:b], logits[b:]
            logits = uncond + cfg_scale * (cond - uncond)
        nxt = sample_logits(logits, temperature, top_p, top_k, generator)  # (B, codebooks)
        drawn.append(nxt)
        if step == num_new - 1:
            break
        tokens = nxt + cfg.text_vocab_size
        if guided:
            tokens = torch.cat([tokens, tokens])
        out = model.decode_step(tokens[:, None], cache, num_vision=tokens.shape[0])
    model.train(was_training)
    return torch.stack(drawn, 1)


__all__ = ["grid_side", "open_image_patches", "sample_image_ids"]
