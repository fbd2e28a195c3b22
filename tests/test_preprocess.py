"""Preprocessing: every image mode to an RGB square at the model resolution, as the official."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from libra_tok.config import CLIP_MEAN, CLIP_STD
from libra_tok.preprocess import (
    clip_to_unit,
    expand2square,
    mean_colour,
    normalize,
    preprocess_image,
    preprocess_images,
    to_pil,
    to_rgb,
)

MEAN_RGB = (122, 116, 104)


def normalised(rgb):
    return torch.tensor([(c / 255 - m) / s for c, m, s in zip(rgb, CLIP_MEAN, CLIP_STD, strict=True)])


def test_mean_colour_is_official():
    assert mean_colour() == MEAN_RGB


@pytest.mark.parametrize("resolution", [112, 336])
def test_every_asset_image(asset_images, resolution):
    modes = set()
    for path in asset_images:
        with Image.open(path) as img:
            modes.add(img.mode)
            x = preprocess_image(img, resolution)
        assert x.shape == (3, resolution, resolution) and x.dtype == torch.float32
        unit = clip_to_unit(x)
        assert unit.min() >= -0.02 and unit.max() <= 1.02  # bicubic may overshoot slightly
    assert {"RGB", "L"} <= modes


def test_batch_from_files(asset_images):
    from libra_tok.data import load_image

    assert preprocess_images([load_image(p) for p in asset_images], 112).shape == (len(asset_images), 3, 112, 112)
    with pytest.raises(TypeError, match="takes PIL images, got the path .*libra_tok.data.load_image"):
        preprocess_images(asset_images, 112)  # reading files is libra_tok.data's


def odd_images():
    rgba = Image.new("RGBA", (40, 30), (255, 0, 0, 0))  # fully transparent red
    cmyk = Image.new("CMYK", (30, 40), (0, 255, 255, 0))  # pure red in CMYK
    i16 = Image.fromarray(np.full((20, 20), 32768, dtype=np.uint16))  # mid-grey in 16 bits
    la = Image.new("LA", (10, 10), (200, 255))
    pal = Image.new("P", (12, 12), 0)
    pal.putpalette([0, 255, 0] + [0, 0, 0] * 255)
    pal_t = pal.copy()
    pal_t.info["transparency"] = 0
    return {
        "RGBA": rgba, "CMYK": cmyk, "I;16": i16, "LA": la, "P": pal, "P+transparency": pal_t,
        "1": Image.new("1", (9, 9), 1), "F": Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)),
        "I": Image.fromarray(np.full((8, 8), 1000, dtype=np.int32)),
        "1x1": Image.new("RGB", (1, 1), (10, 20, 30)), "5000x20": Image.new("RGB", (5000, 20), (255, 255, 255)),
        "20x5000": Image.new("L", (20, 5000), 0), "YCbCr": Image.new("YCbCr", (16, 16), (128, 128, 128)),
    }


@pytest.mark.parametrize("name", list(odd_images()))
@pytest.mark.parametrize("pad_mode", ["pad", "crop"])
def test_odd_images_preprocess_to_right_shape(name, pad_mode):
    x = preprocess_image(odd_images()[name], 112, pad_mode)
    assert x.shape == (3, 112, 112) and torch.isfinite(x).all()


def test_mode_conversions_are_right():
    imgs = odd_images()
    assert to_rgb(imgs["RGBA"]).getpixel((0, 0)) == MEAN_RGB  # transparency -> CLIP-mean colour
    assert to_rgb(imgs["P+transparency"]).getpixel((0, 0)) == MEAN_RGB
    assert to_rgb(imgs["P"]).getpixel((0, 0)) == (0, 255, 0)
    assert to_rgb(imgs["CMYK"]).getpixel((0, 0)) == (255, 0, 0)
    assert to_rgb(imgs["I;16"]).getpixel((0, 0)) == (128, 128, 128)  # scaled, not clipped to 255
    assert to_rgb(imgs["F"]).getpixel((0, 0)) == (128, 128, 128)
    assert to_rgb(imgs["LA"]).getpixel((0, 0)) == (200, 200, 200)


def test_expand2square_pads_with_mean_colour_centered():
    img = Image.new("RGB", (5000, 20), (255, 255, 255))
    sq = expand2square(img)
    assert sq.size == (5000, 5000)
    assert sq.getpixel((0, 0)) == MEAN_RGB and sq.getpixel((2500, 2490)) == (255, 255, 255)
    assert sq.getpixel((2500, 2489)) == MEAN_RGB and sq.getpixel((2500, 2510)) == MEAN_RGB
    x = preprocess_image(img, 112)
    torch.testing.assert_close(x[:, 0, 0], normalised(MEAN_RGB), atol=1e-5, rtol=0)
    # The 20 px strip shrinks to under half a pixel: the centre row is lighter than the padding.
    assert (x[:, 55:57, 56].max(1).values > x[:, 0, 0] + 0.05).all()


def test_crop_mode_takes_centre_square():
    img = Image.new("RGB", (300, 100), (0, 0, 255))
    img.paste((255, 0, 0), (100, 0, 200, 100))  # centre third is red
    x = preprocess_image(img, 112, "crop")
    torch.testing.assert_close(x[:, 56, 56], normalised((255, 0, 0)), atol=1e-5, rtol=0)
    torch.testing.assert_close(x[:, 0, 0], normalised((255, 0, 0)), atol=1e-5, rtol=0)


def test_exif_rotation_is_applied():
    img = Image.new("RGB", (40, 20), (0, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when shown
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    with Image.open(io.BytesIO(buf.getvalue())) as loaded:
        assert to_rgb(loaded).size == (20, 40)


def test_matches_clip_image_processor(asset_images):
    """Official pipeline: expand2square, then HF CLIPImageProcessor (336, bicubic, centre crop)."""
    import transformers

    # The PIL backend is what the official code ran (transformers 4.38); v5 names it ...Pil.
    processor_class = getattr(transformers, "CLIPImageProcessorPil", transformers.CLIPImageProcessor)
    proc = processor_class(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                              do_resize=True, do_center_crop=True, resample=3, image_mean=list(CLIP_MEAN),
                              image_std=list(CLIP_STD))
    for path in asset_images[:4]:
        with Image.open(path) as img:
            rgb = img.convert("RGB")
        w, h = rgb.size
        side = max(w, h)
        square = Image.new("RGB", (side, side), MEAN_RGB)  # LLaVA's expand2square, written out
        square.paste(rgb, ((side - w) // 2, (side - h) // 2))
        expected = torch.from_numpy(np.asarray(proc(square, return_tensors="np")["pixel_values"][0]))
        got = preprocess_image(rgb, 336)
        # Both resize with PIL bicubic; HF rounds to uint8 before rescaling, as we do.
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_to_pil_round_trip():
    x = torch.linspace(-1, 1, 3 * 4 * 4).reshape(3, 4, 4)
    arr = np.asarray(to_pil(x))
    assert arr.shape == (4, 4, 3) and arr.dtype == np.uint8
    assert arr[0, 0, 0] == 0 and arr[3, 3, 2] == 255


def test_high_bit_depth_is_a_fixed_function_of_the_mode():
    """One sample value gives the same grey in every image, whatever the image's other values."""
    def grey(array):
        return to_rgb(Image.fromarray(array)).getpixel((0, 0))[0]

    for low_max, high_max in (([200, 100], [200, 65535]), ([1000, 2000], [1000, 60000])):
        assert grey(np.array([low_max], dtype=np.uint16)) == grey(np.array([high_max], dtype=np.uint16))
    assert grey(np.array([[200, 100]], dtype=np.uint16)) == 1  # round(200 / 257)
    assert grey(np.array([[65535]], dtype=np.uint16)) == 255 and grey(np.array([[385]], dtype=np.uint16)) == 1
    # "I": the same 16-bit range, clipped.
    assert grey(np.array([[200, 10]], dtype=np.int32)) == grey(np.array([[200, 60000]], dtype=np.int32)) == 1
    assert grey(np.array([[-5]], dtype=np.int32)) == 0 and grey(np.array([[70000]], dtype=np.int32)) == 255
    # "F": [0, 1], clipped; NaN is black.
    assert grey(np.array([[0.5, 0.2]], dtype=np.float32)) == grey(np.array([[0.5, 3.0]], dtype=np.float32)) == 128
    assert [grey(np.array([[v]], dtype=np.float32)) for v in (-1.0, 2.0, np.nan, np.inf, 0.25)] == [0, 255, 0, 255, 64]


# Sizes that take every path: small squares (built whole), wide and tall ones resized in bands,
# upscaling, and a side equal to the resolution.
SIZES = [(640, 480), (480, 640), (3000, 40), (40, 3000), (2100, 1), (1, 2100), (700, 3), (3, 700), (10, 20),
         (336, 100), (100, 336), (2500, 2499)]


def plain_pad_or_crop(rgb, resolution, pad_mode):
    """The official path: the whole square, then one Pillow resize."""
    from libra_tok.preprocess import center_square

    square = expand2square(rgb) if pad_mode == "pad" else center_square(rgb)
    return square if square.size == (resolution, resolution) else \
        square.resize((resolution, resolution), Image.Resampling.BICUBIC)


def pixels_of(image):
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


@pytest.mark.parametrize("pad_mode", ["pad", "crop"])
def test_banded_resize_is_bit_identical_to_the_whole_square(pad_mode, monkeypatch):
    import libra_tok.preprocess as pre

    rng = np.random.default_rng(0)
    for band in (pre._BAND_PIXELS, 1000, 64):  # small bands: many bands even for small images
        monkeypatch.setattr(pre, "_BAND_PIXELS", band)
        for width, height in SIZES:
            rgb = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
            for resolution in (112, 336):
                expected = normalize(pixels_of(plain_pad_or_crop(rgb, resolution, pad_mode)))
                got = preprocess_image(rgb, resolution, pad_mode)
                assert torch.equal(got, expected), (band, width, height, resolution)


def test_thin_strips_beyond_max_square_side_are_shrunk_first(monkeypatch):
    import libra_tok.preprocess as pre

    monkeypatch.setattr(pre, "MAX_SQUARE_SIDE", 500)
    rng = np.random.default_rng(1)
    noise = rng.integers(0, 256, (6, 20, 3), dtype=np.uint8)
    strip = Image.fromarray(noise).resize((1500, 300), Image.Resampling.BILINEAR)  # square: 5x its area
    got = preprocess_image(strip, 112)
    shrunk = strip.resize((500, 100), Image.Resampling.BICUBIC)
    assert torch.equal(got, normalize(pixels_of(plain_pad_or_crop(shrunk, 112, "pad"))))
    official = normalize(pixels_of(plain_pad_or_crop(strip, 112, "pad")))
    assert 0 < (clip_to_unit(got) - clip_to_unit(official)).abs().max() < 0.05  # a small deviation
    tall = strip.transpose(Image.Transpose.ROTATE_90)
    assert torch.equal(preprocess_image(tall, 112), normalize(pixels_of(
        plain_pad_or_crop(tall.resize((100, 500), Image.Resampling.BICUBIC), 112, "pad"))))
    # Exact: a square of at most MAX_PAD_RATIO times the image's area, and every centre crop.
    wider = Image.fromarray(noise).resize((1500, 400), Image.Resampling.BILINEAR)
    for image, pad_mode in ((wider, "pad"), (wider.transpose(Image.Transpose.ROTATE_90), "pad"), (strip, "crop"),
                            (tall, "crop")):
        expected = normalize(pixels_of(plain_pad_or_crop(image, 112, pad_mode)))
        assert torch.equal(preprocess_image(image, 112, pad_mode), expected)


PEAK_SCRIPT = """
import io, resource, sys, time
import torch, libra_tok
from libra_tok.data import decode_image_bytes
from libra_tok.preprocess import preprocess_image
from PIL import Image

width, height = int(sys.argv[1]), int(sys.argv[2])
buf = io.BytesIO()
Image.new("RGB", (width, height), (255, 0, 0)).save(buf, format="PNG")
data = buf.getvalue()
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
for pad_mode in ("pad", "crop"):
    x = preprocess_image(decode_image_bytes(data), 336, pad_mode)
    assert x.shape == (3, 336, 336)
print(len(data), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024, time.perf_counter() - started)
"""


@pytest.mark.parametrize("size", [(30000, 1), (100000, 1), (1, 100000)])
def test_thin_images_preprocess_in_bounded_memory_and_time(size):
    """A few hundred bytes of PNG whose square would be 0.9 to 30 GB: the peak RSS grows by under
    150 MB over the RSS after importing torch and the package, and it takes seconds."""
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, *map(str, size)], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    png_bytes, peak_mb, seconds = map(float, result.stdout.split())
    assert png_bytes < 1000 and peak_mb < 150 and seconds < 20, result.stdout
