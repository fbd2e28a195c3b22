"""Image preprocessing as the official Libra pipeline, robust to every PIL image mode: pixels
only (reading files is `libra_tok.data`'s).

Official (`libra/data/processors/libra_processor.py`, `demo/libra_demo.ipynb`;
docs/official-formats.md#tokenizer-behaviour): `expand2square` with the CLIP mean colour
(122, 116, 104) as background, then CLIPImageProcessor (bicubic resize to 336, centre crop,
CLIP mean/std).
After the square padding the centre crop is a no-op, so pad -> bicubic resize -> normalise
is exact. "crop" mode takes the centre square instead of padding. The square is resized in
bands, never held whole (same bytes); a thin strip whose padded square would be far larger
than the image is first shrunk (see MAX_SQUARE_SIDE), so time and memory stay bounded.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

from .config import CLIP_MEAN, CLIP_STD


def mean_colour(mean: Sequence[float] = CLIP_MEAN) -> tuple[int, int, int]:
    """The official padding colour: int(m * 255) per channel, (122, 116, 104) for CLIP."""
    return tuple(int(m * 255) for m in mean)  # type: ignore[return-value]


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """16-bit and 32-bit greyscale modes to 8-bit 'L' by a fixed function of the mode, never of
    the image's content, so one sample value gives the same grey in every image:
    'I;16*' -> round(v / 257); 'I' -> the same 16-bit range (0..65535, clipped);
    'F' -> the range [0, 1] (clipped, NaN -> 0) -> round(255 v)."""
    arr = np.asarray(image)
    out = np.empty(arr.shape, dtype=np.uint8)
    # In bands of rows: the float64 temporaries stay small whatever the image size.
    step = max(1, (1 << 20) // max(1, arr.shape[1]))
    for top in range(0, arr.shape[0], step):
        block = arr[top: top + step]
        if image.mode == "F":
            unit = np.clip(np.nan_to_num(block.astype(np.float64), nan=0.0, posinf=1.0, neginf=0.0), 0.0, 1.0)
            out[top: top + step] = np.floor(unit * 255.0 + 0.5)
        else:  # no ties: v / 257 is never k + 1/2 for an integer v
            out[top: top + step] = np.rint(np.clip(block.astype(np.float64), 0, 65535) / 257.0)
    return Image.fromarray(out, "L")


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


# Preprocessing pads (or crops) to a square and resizes that square to the model resolution.
# The square is never allocated whole (`_resize_square`; same bytes), but padding still costs
# time in proportion to the square's area, and a 200-byte 100000x1 PNG pads to 10^10 pixels.
# So an image whose padded square has a side above MAX_SQUARE_SIDE and more than MAX_PAD_RATIO
# times the image's own area (a thin strip) is first shrunk (bicubic, aspect kept, each side
# >= 1) until the side is MAX_SQUARE_SIDE: a small deviation from the official result, only
# for such images; every other image is preprocessed exactly as the official code does, with
# time in proportion to max(its area, MAX_SQUARE_SIDE^2). A centre crop lies inside the image
# and needs no such bound.
MAX_SQUARE_SIDE = 8192
MAX_PAD_RATIO = 4
# Pixels per band of the square resized at once (about 16 MB as Pillow RGB); squares up to this
# area are simply built and resized whole, as the official code does.
_BAND_PIXELS = 1 << 22


def _resize_square(side: int, resolution: int, rows_of) -> Image.Image:
    """Pillow's bicubic resize of a `side` x `side` RGB square to `resolution`^2, the square given
    by `rows_of(top, count)` -> its rows top..top+count-1 as an image. Pillow resizes in two
    passes, each row on its own horizontally into an 8-bit image, then that image vertically
    (Resample.c); resizing bands of rows horizontally and the stacked bands vertically is
    therefore byte-for-byte the resize of the whole square, with a band in memory at a time."""
    temp = Image.new("RGB", (resolution, side))
    step = max(1, _BAND_PIXELS // side)
    for top in range(0, side, step):
        count = min(step, side - top)
        temp.paste(rows_of(top, count).resize((resolution, count), Image.Resampling.BICUBIC), (0, top))
    return temp.resize((resolution, resolution), Image.Resampling.BICUBIC)


def _pad_and_resize(rgb: Image.Image, resolution: int, background: tuple[int, int, int]) -> Image.Image:
    """`expand2square` then a bicubic resize to `resolution`, without building the square."""
    width, height = rgb.size
    side = max(width, height)
    if side * side <= _BAND_PIXELS or side == resolution:
        square = expand2square(rgb, background)
        return square if side == resolution else square.resize((resolution, resolution), Image.Resampling.BICUBIC)
    left, top = (side - width) // 2, (side - height) // 2
    if width >= height:
        # Whole rows of padding above and below: one padding row resized stands for all of them.
        pad_row = Image.new("RGB", (side, 1), background).resize((resolution, 1), Image.Resampling.BICUBIC)
        temp = pad_row.resize((resolution, side), Image.Resampling.NEAREST)  # that row, repeated
        temp.paste(rgb.resize((resolution, height), Image.Resampling.BICUBIC), (0, top))
        return temp.resize((resolution, resolution), Image.Resampling.BICUBIC)

    def rows_of(first: int, count: int) -> Image.Image:
        band = Image.new("RGB", (side, count), background)
        band.paste(rgb.crop((0, first, width, first + count)), (left, 0))
        return band

    return _resize_square(side, resolution, rows_of)


def _crop_and_resize(rgb: Image.Image, resolution: int) -> Image.Image:
    """`center_square` then a bicubic resize to `resolution`, without copying the square."""
    width, height = rgb.size
    side = min(width, height)
    if side * side <= _BAND_PIXELS or side == resolution:
        square = center_square(rgb)
        return square if side == resolution else square.resize((resolution, resolution), Image.Resampling.BICUBIC)
    left, top = (width - side) // 2, (height - side) // 2
    return _resize_square(side, resolution,
                          lambda first, count: rgb.crop((left, top + first, left + side, top + first + count)))


def _shrink_thin(rgb: Image.Image) -> Image.Image:
    """A thin strip whose padded square is too large shrunk so that the square's side is
    MAX_SQUARE_SIDE (bicubic, aspect kept, each side >= 1); any other image as it is."""
    width, height = rgb.size
    side = max(width, height)
    if side <= MAX_SQUARE_SIDE or side * side <= MAX_PAD_RATIO * width * height:
        return rgb
    scale = MAX_SQUARE_SIDE / side
    return rgb.resize((max(1, round(width * scale)), max(1, round(height * scale))), Image.Resampling.BICUBIC)


def preprocess_image(
    image: Image.Image,
    resolution: int,
    pad_mode: str = "pad",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """One image -> (3, R, R) float32, CLIP-normalised. Memory beyond the decoded image stays
    small and time in proportion to the image's area, whatever its shape (see MAX_SQUARE_SIDE)."""
    rgb = to_rgb(image, mean_colour(mean))
    if pad_mode == "pad":
        square = _pad_and_resize(_shrink_thin(rgb), resolution, mean_colour(mean))
    elif pad_mode == "crop":
        square = _crop_and_resize(rgb, resolution)
    else:
        raise ValueError(f"pad_mode must be 'pad' or 'crop', got {pad_mode!r}")
    # Scale and transpose in numpy: one contiguous (3, R, R) array, no strided torch op.
    pixels = torch.from_numpy(np.ascontiguousarray((np.asarray(square, dtype=np.float32) / 255.0).transpose(2, 0, 1)))
    return normalize(pixels, mean, std)


def preprocess_images(
    images: Iterable[Image.Image],
    resolution: int,
    pad_mode: str = "pad",
    mean: Sequence[float] = CLIP_MEAN,
    std: Sequence[float] = CLIP_STD,
) -> torch.Tensor:
    """PIL images -> (B, 3, R, R). Files are read by `libra_tok.data.load_image` (or
    `ImageTokenizer.preprocess`, which takes paths too)."""
    tensors = []
    for image in images:
        if isinstance(image, (str, Path)):
            raise TypeError(f"preprocess_images takes PIL images, got the path {str(image)!r}; read it with "
                            "libra_tok.data.load_image, or pass paths to ImageTokenizer.preprocess")
        tensors.append(preprocess_image(image, resolution, pad_mode, mean, std))
    if not tensors:
        raise ValueError("preprocess needs at least one image")
    return torch.stack(tensors)


def _channel_view(values: Sequence[float], like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 1, 1)


def normalize(pixels01: torch.Tensor, mean: Sequence[float] = CLIP_MEAN,
              std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """[0, 1] pixels (..., 3, H, W) -> CLIP-normalised."""
    return (pixels01 - _channel_view(mean, pixels01)) / _channel_view(std, pixels01)


def clip_to_unit(pixels: torch.Tensor, mean: Sequence[float] = CLIP_MEAN,
                 std: Sequence[float] = CLIP_STD) -> torch.Tensor:
    """CLIP-normalised pixels -> [0, 1]."""
    return pixels * _channel_view(std, pixels) + _channel_view(mean, pixels)


def clip_to_signed(pixels: torch.Tensor, mean: Sequence[float] = CLIP_MEAN,
                   std: Sequence[float] = CLIP_STD) -> torch.Tensor:
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
    "MAX_SQUARE_SIDE",
    "MAX_PAD_RATIO",
    "side_by_side",
    "to_rgb",
    "expand2square",
    "center_square",
    "preprocess_image",
    "preprocess_images",
    "normalize",
    "clip_to_unit",
    "clip_to_signed",
    "to_pil",
    "mean_colour",
]
