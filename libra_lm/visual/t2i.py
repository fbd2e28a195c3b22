"""Text-to-image generation from the vision heads (paper §4.3, Fig. 3 b, c).

    ids = generate_images(model, text_tok, "a red apple", samples=4, generator=g)     # (4, 576, 2)

The prompt is the layout of the text-to-image stage (libra_lm.data.t2i; `libra-lm train --stage
t2i`) up to BOI: `<s>{caption}\\n BOI` (the official `<img_gen>` placeholder becomes BOI), with
the caption processed as in training (lowercase, at most 64 words). Patches are drawn with the
contiguous signal zero, batched over the samples.

Optional classifier-free guidance (`cfg_scale`; the unconditional prompt is the empty caption,
`<s>\\n BOI`) as LlamaGen-style generators use it. Libra did not use it and never trained on empty
captions, so its unconditional branch is out of distribution: guidance is off by default.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from libra_tok.fileio import atomic_write_text, check_output_folder

from .. import templates
from ..data.captions import preprocess_caption
from ..data.t2i import t2i_parts
from ..segments import Segment, concat_segments
from ..text import check_text_tokenizer
from .pictures import check_tokenizer_fits, decode_pictures, save_grid, save_ids, save_pictures
from .sampling import sample_image_ids

if TYPE_CHECKING:
    from ..config import LibraConfig
    from ..model import LibraForCausalLM
    from ..text import TextTokenizer


def t2i_prompt(text_tokenizer: TextTokenizer, config: LibraConfig, caption: str, max_words: int = 64) -> Segment:
    """`<s>{caption}\\n BOI`: a text-to-image training sequence up to its BOI."""
    check_text_tokenizer(text_tokenizer, config)
    parts = t2i_parts(preprocess_caption(caption, max_words))[:-1]  # the text before the image
    text = [segment for _, segment in templates.encode_parts(parts, text_tokenizer, config)]
    boi = Segment(torch.full((1, config.num_codebooks), config.boi_token_id))
    return concat_segments([*text, boi], config)


def generate_images(
    model: LibraForCausalLM,
    text_tokenizer: TextTokenizer,
    caption: str,
    samples: int = 1,
    *,
    cfg_scale: float | None = None,
    max_words: int = 64,
    **sampling: Any,
) -> torch.Tensor:
    """`samples` images for `caption`: (samples, P, num_codebooks) image ids, drawn in one
    batch. cfg_scale: classifier-free guidance against the empty caption (None = off).
    `sampling`: temperature, top_p, top_k, generator, progress (see sample_image_ids)."""
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    cfg = model.config
    prompt = t2i_prompt(text_tokenizer, cfg, caption, max_words)
    uncond = [t2i_prompt(text_tokenizer, cfg, "", max_words)] * samples if cfg_scale is not None else None
    return sample_image_ids(model, [prompt] * samples, cfg.num_image_tokens, unconditional=uncond,
                            cfg_scale=cfg_scale, **sampling)


@dataclass
class GeneratedFiles:
    grid: Path  # the samples side by side
    ids: Path  # safetensors: "images" (S, P, 2)
    images: list[Path]


def run_generation(
    model: LibraForCausalLM,
    text_tokenizer: TextTokenizer,
    image_tokenizer: Any,
    caption: str,
    out_dir: str | Path,
    samples: int = 4,
    *,
    cfg_scale: float | None = None,
    **sampling: Any,
) -> GeneratedFiles:
    """`generate_images`, then `image_{i}.png`, `grid.png`, `ids.safetensors` and `prompt.txt` in `out_dir`."""
    check_tokenizer_fits(image_tokenizer, model.config)
    out = check_output_folder(out_dir)
    ids = generate_images(model, text_tokenizer, caption, samples, cfg_scale=cfg_scale, **sampling).cpu()
    pictures = decode_pictures(image_tokenizer, ids)
    out.mkdir(parents=True, exist_ok=True)
    paths = save_pictures(out, pictures, "image")
    grid = save_grid(out / "grid.png", [pictures])
    meta = {"prompt": caption, "cfg_scale": str(cfg_scale)}
    ids_path = save_ids(out / "ids.safetensors", meta, images=ids)
    atomic_write_text(out / "prompt.txt", caption + "\n")
    return GeneratedFiles(grid, ids_path, paths)


__all__ = ["t2i_prompt", "generate_images", "GeneratedFiles", "run_generation"]
