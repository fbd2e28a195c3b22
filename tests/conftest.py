import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "assets"
ASSET_IMAGES = sorted(p for p in ASSETS.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def assets_dir() -> Path:
    return ASSETS


@pytest.fixture(scope="session")
def asset_images() -> list[Path]:
    assert len(ASSET_IMAGES) >= 10, "assets/ should hold the sample images"
    return ASSET_IMAGES


@pytest.fixture(scope="session")
def tiny_tok():
    """A seeded tiny tokenizer (random frozen CLIP, random decoder), eval mode."""
    from libra_tok import ImageTokenizer

    torch.manual_seed(0)
    return ImageTokenizer("tiny").eval()


@pytest.fixture(scope="session")
def tiny_pixels(tiny_tok, asset_images):
    return tiny_tok.preprocess(asset_images[:4])
