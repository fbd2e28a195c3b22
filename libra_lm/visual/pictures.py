"""Image ids back to pictures through the image tokenizer's decoder, and the files the visual
commands write: PNGs, grids of them, the ids themselves (safetensors)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from libra_tok.fileio import atomic_save_image, atomic_save_safetensors
from libra_tok.preprocess import side_by_side, to_pil

if TYPE_CHECKING:
    from PIL import Image

    from ..config import LibraConfig

# The part of a completion's input that was not kept is drawn in this grey.
HIDDEN_GREY = (128, 128, 128)


def check_tokenizer_fits(image_tokenizer: Any, config: LibraConfig) -> None:
    """ValueError unless the image tokenizer's grid and codebooks are the LM's."""
    t = image_tokenizer.config
    ours = (t.num_tokens, t.num_codebooks, t.codebook_size)
    theirs = (config.num_image_tokens, config.num_codebooks, config.codebook_size)
    if ours != theirs:
        raise ValueError(f"the image tokenizer has {ours[0]} patches and {ours[1]} codebooks of {ours[2]} ids, the LM "
                         f"{theirs[0]} patches and {theirs[1]} codebooks of {theirs[2]}; use the tokenizer the model "
                         "was trained with")


@torch.no_grad()
def decode_pictures(image_tokenizer: Any, ids: torch.Tensor, batch_size: int = 8) -> list[Image.Image]:
    """(S, P, num_codebooks) image ids -> S RGB pictures (the tokenizer's resolution)."""
    pictures = []
    for start in range(0, ids.shape[0], batch_size):
        images = image_tokenizer.decode(ids[start:start + batch_size].to(image_tokenizer.device))
        pictures += [to_pil(image) for image in images]
    return pictures


def hide_rows(picture: Image.Image, keep_rows: int, grid: int) -> Image.Image:
    """A copy of `picture` with everything below its first `keep_rows` of `grid` patch rows grey."""
    from PIL import ImageDraw

    out = picture.copy()
    top = round(picture.height * keep_rows / grid)
    if top < picture.height:
        ImageDraw.Draw(out).rectangle([0, top, picture.width, picture.height], fill=HIDDEN_GREY)
    return out


def save_pictures(folder: Path, pictures: Sequence[Image.Image], stem: str) -> list[Path]:
    """`folder/{stem}_{i}.png` for each picture, written atomically."""
    paths = []
    for i, picture in enumerate(pictures):
        path = folder / f"{stem}_{i}.png"
        atomic_save_image(picture, path)
        paths.append(path)
    return paths


def save_grid(path: Path, rows: Sequence[Sequence[Image.Image]]) -> Path:
    """One PNG of the pictures, a list per row, written atomically."""
    atomic_save_image(side_by_side(rows), path)
    return path


def save_ids(path: Path, metadata: dict[str, str] | None = None, **ids: torch.Tensor) -> Path:
    """Image ids as int64 tensors in a safetensors file (`safetensors.torch.load_file` reads them)."""
    atomic_save_safetensors({k: v.long() for k, v in ids.items()}, path, metadata=metadata)
    return path


__all__ = ["HIDDEN_GREY", "check_tokenizer_fits", "decode_pictures", "hide_rows", "save_pictures", "save_grid",
           "save_ids"]
