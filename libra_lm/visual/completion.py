"""Image completion (paper §4.3, Fig. 3 a): keep the first rows of an image's patch ids, let the
vision heads draw the rest, row-major, as the LM reads images.

    ids = image_tokenizer.encode(image_tokenizer.preprocess(["cat.jpg"])).ids[0]   # (576, 2)
    out = complete_image(model, ids, keep_rows=12, samples=4, generator=g)        # (4, 576, 2)

The prompt is the pretraining layout (libra_lm.templates.raw: `<s>` then the image) cut after
the kept patches: `<s> BOI [first K x 24 patches]`, with zero CLIP features (the paper disables
the contiguous signal for visual sequential modeling). A model whose vision system learned the
image distribution continues the kept structure; the paper's no-bridge variant repeats patterns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from libra_tok.fileio import check_output_folder
from libra_tok.preprocess import to_pil

from ..segments import Segment, concat_segments, image_segment, text_segment
from .pictures import check_tokenizer_fits, decode_pictures, hide_rows, save_grid, save_ids, save_pictures
from .sampling import grid_side, sample_image_ids

if TYPE_CHECKING:
    from PIL import Image

    from ..config import LibraConfig
    from ..model import LibraForCausalLM


def completion_prompt(image_ids: torch.Tensor, keep_rows: int, config: LibraConfig) -> Segment:
    """`<s> BOI [first keep_rows rows of patches]` from image ids (P, num_codebooks)."""
    grid = grid_side(config)
    if not 0 <= keep_rows < grid:
        raise ValueError(f"keep_rows must be in [0, {grid - 1}] for a {grid} x {grid} grid (0 = draw the whole "
                         f"image), got {keep_rows}")
    image = image_segment(image_ids, None, config)  # checks the ids' shape and range
    # <s> is what templates.raw puts before the image (its empty first part with BOS).
    return concat_segments([text_segment([config.bos_token_id], config), Segment(image.ids[: 1 + keep_rows * grid])],
                           config)


def complete_image(
    model: LibraForCausalLM,
    image_ids: torch.Tensor,
    keep_rows: int,
    samples: int = 1,
    **sampling: Any,
) -> torch.Tensor:
    """`samples` completions of one image, (samples, P, num_codebooks) image ids: the first
    `keep_rows` rows are `image_ids`' own, the rest drawn (one batch of `samples` rows).
    `sampling`: temperature, top_p, top_k, generator, progress (see sample_image_ids)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    cfg = model.config
    prompt = completion_prompt(image_ids, keep_rows, cfg)
    kept = keep_rows * grid_side(cfg)
    drawn = sample_image_ids(model, [prompt] * samples, cfg.num_image_tokens - kept, **sampling)
    head = image_ids[:kept].to(drawn.device, torch.long).expand(samples, -1, -1)
    return torch.cat([head, drawn], 1)


@dataclass
class CompletionFiles:
    grid: Path  # original | kept part | completions
    ids: Path  # safetensors: "original" (P, 2), "completions" (S, P, 2)
    completions: list[Path]


def write_completions(
    out_dir: str | Path,
    image_tokenizer: Any,
    original: Image.Image,
    image_ids: torch.Tensor,
    completions: torch.Tensor,
    keep_rows: int,
) -> CompletionFiles:
    """Decode and write: `grid.png` (the input as the tokenizer sees it | its ids decoded with
    the rows that were not kept grey | each completion), `completion_{i}.png`, `ids.safetensors`."""
    out = check_output_folder(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    grid = math.isqrt(completions.shape[1])
    pictures = decode_pictures(image_tokenizer, torch.cat([image_ids[None].to(completions.device), completions]))
    kept = hide_rows(pictures[0], keep_rows, grid)
    paths = save_pictures(out, pictures[1:], "completion")
    grid_path = save_grid(out / "grid.png", [[original, kept, *pictures[1:]]])
    ids_path = save_ids(out / "ids.safetensors", {"keep_rows": str(keep_rows)}, original=image_ids,
                        completions=completions)
    return CompletionFiles(grid_path, ids_path, paths)


def run_completion(
    model: LibraForCausalLM,
    image_tokenizer: Any,
    image: Image.Image,
    keep_rows: int,
    out_dir: str | Path,
    samples: int = 4,
    **sampling: Any,
) -> CompletionFiles:
    """The image through the tokenizer (its ids; CLIP features unused), `samples` completions
    after `keep_rows` rows, then `write_completions`."""
    check_tokenizer_fits(image_tokenizer, model.config)
    check_output_folder(out_dir)
    pixels = image_tokenizer.preprocess([image])
    ids = image_tokenizer.encode(pixels).ids[0].cpu()
    completions = complete_image(model, ids, keep_rows, samples, **sampling).cpu()
    original = to_pil(image_tokenizer.target(pixels)[0])
    return write_completions(out_dir, image_tokenizer, original, ids, completions, keep_rows)


__all__ = ["completion_prompt", "complete_image", "CompletionFiles", "write_completions", "run_completion"]
