"""Image preprocessing as the official Libra pipeline, robust to every PIL image mode.

Official (reference 3.2, 4): `expand2square` with the CLIP mean colour (122, 116, 104) as
background, then CLIPImageProcessor (bicubic resize to 336, centre crop, CLIP mean/std).
After the square padding the centre crop is a no-op, so pad -> bicubic resize -> normalise
is exact. "crop" mode takes the centre square instead of padding.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import CLIP_MEAN, CLIP_STD


def mean_colour(mean: Sequence[float] = CLIP_MEAN) -> tuple[int, int, int]:
    """The official padding colour: int(m * 255) per channel, (122, 116, 104) for CLIP."""
    return tuple(int(m * 255) for m in mean)  # type: ignore[return-value]


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale modes to 8-bit 'L' by scaling, not clipping (PIL clips)."""
    arr = np.asarray(image)
    if image.mode == "F":
        arr = arr.astype(np.float64)
        top = 1.0 if arr.size and np.nanmax(arr) <= 1.0 else 255.0
        arr = np.clip(np.nan_to_num(arr) / top * 255.0, 0, 255)
    else:  # I;16*, I: integer samples; treat anything above 255 as a 16-bit range
        arr = arr.astype(np.float64)
        if arr.size and arr.max() > 255:
            arr = arr / 65535.0 * 255.0
        arr = np.clip(arr, 0, 255)
    return Image.fromarray(np.rint(arr).astype(np.uint8))


def to_rgb(image: Image.Image, background: tuple[int, int, int] = mean_colour()) -> Image.Image:
    """Any PIL image -> 8-bit RGB: EXIF rotation applied, first frame of animations,
    transparency composited on `background`, 16-bit and float samples rescaled."""
    if getattr(image, "is_animated", False):
        image.seek(0)
    image = ImageOps.exif_transpose(image) or image
    mode = image.mode
    if mode.startswith("I;16") or mode in ("I", "F"):
        image = _high_bit_depth_to_l(image)
        mode = "L"
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    if mode == "RGB":
        return image
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def expand2square(image: Image.Image, background: tuple[int, int, int] = mean_colour()) -> Image.Image:
    """Pad the shorter side symmetrically (official LLaVA/Libra expand2square)."""
    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    result = Image.new(image.mode, (side, side), background)
    result.paste(image, ((side - width) // 2, (side - height) // 2))
    return result


def center_square(image: Image.Image) -> Image.Image:
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side))


def load_image(path: str | Path) -> Image.Image:
    """Open an image file fully (so the file handle is released) and convert it to RGB."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def preprocess_image(
    image: Image.Image,
    resolution: int,
    pad_mode: str = "pad",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """One image -> (3, R, R) float32, CLIP-normalised."""
    rgb = to_rgb(image, mean_colour(mean))
    if pad_mode == "pad":
        square = expand2square(rgb, mean_colour(mean))
    elif pad_mode == "crop":
        square = center_square(rgb)
    else:
        raise ValueError(f"pad_mode must be 'pad' or 'crop', got {pad_mode!r}")
    if square.size != (resolution, resolution):
        square = square.resize((resolution, resolution), Image.Resampling.BICUBIC)
    # Scale and transpose in numpy: one contiguous (3, R, R) array, no strided torch op.
    pixels = torch.from_numpy(np.ascontiguousarray((np.asarray(square, dtype=np.float32) / 255.0).transpose(2, 0, 1)))
    return normalize(pixels, mean, std)


def preprocess_images(
    images: Iterable[Image.Image | str | Path],
    resolution: int,
    pad_mode: str = "pad",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """PIL images or paths -> (B, 3, R, R)."""
    tensors = []
    for item in images:
        image = load_image(item) if isinstance(item, (str, Path)) else item
        tensors.append(preprocess_image(image, resolution, pad_mode, mean, std))
    if not tensors:
        raise ValueError("preprocess needs at least one image")
    return torch.stack(tensors)


def _channel_view(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1)


def normalize(pixels01: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """[0, 1] pixels (..., 3, H, W) -> CLIP-normalised."""
    return (pixels01 - _channel_view(mean, pixels01)) / _channel_view(std, pixels01)


def clip_to_unit(pixels: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """CLIP-normalised pixels -> [0, 1]."""
    return pixels * _channel_view(std, pixels) + _channel_view(mean, pixels)


def clip_to_signed(pixels: torch.Tensor, mean: Sequence[float] = CLIP_MEAN, std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """CLIP-normalised pixels -> [-1, 1]: the decoder's target (official `clip_to_rgb`)."""
    return clip_to_unit(pixels, mean, std) * 2.0 - 1.0


def to_pil(image: torch.Tensor) -> Image.Image:
    """(3, H, W) tensor in [-1, 1] (a decoder output) -> 8-bit RGB PIL image."""
    unit = ((image.detach().float().clamp(-1, 1) + 1.0) / 2.0).cpu()
    arr = (unit.permute(1, 2, 0).numpy() * 255.0).round().astype(np.uint8)
    return Image.fromarray(arr)


def side_by_side(rows: Sequence[Sequence[Any]], pad: int = 4, background=(255, 255, 255)):
    """A grid image of PIL images (one list per row)."""
    from PIL import Image

    width = max(sum(im.width for im in row) + pad * (len(row) + 1) for row in rows)
    height = sum(max(im.height for im in row) for row in rows) + pad * (len(rows) + 1)
    canvas = Image.new("RGB", (width, height), background)
    y = pad
    for row in rows:
        x = pad
        for im in row:
            canvas.paste(im, (x, y))
            x += im.width + pad
        y += max(im.height for im in row) + pad
    return canvas


__all__ = [
    "side_by_side",
    "to_rgb",
    "expand2square",
    "center_square",
    "load_image",
    "preprocess_image",
    "preprocess_images",
    "normalize",
    "clip_to_unit",
    "clip_to_signed",
    "to_pil",
    "mean_colour",
]
