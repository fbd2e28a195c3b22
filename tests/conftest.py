"""Fixtures shared by several test modules. Plain helpers that build test objects are in
builders.py; what one module needs stays in that module."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch

# Tests never touch the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# The helpers in builders.py assert like test code: rewrite their asserts as pytest does those of
# test modules (registered before anything imports builders).
pytest.register_assert_rewrite("builders")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


# ---- the sample images and the tiny image tokenizer -----------------------------------------------------
@pytest.fixture(scope="session")
def assets_dir() -> Path:
    from builders import ROOT

    return ROOT / "assets"


@pytest.fixture(scope="session")
def asset_images(assets_dir) -> list[Path]:
    images = sorted(p for p in assets_dir.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    assert len(images) >= 10, "assets/ should hold the sample images"
    return images


@pytest.fixture(scope="session")
def tiny_tok():
    """A seeded tiny tokenizer (random frozen CLIP, random decoder), eval mode."""
    from libra_tok import ImageTokenizer

    torch.manual_seed(0)
    return ImageTokenizer("tiny").eval()


@pytest.fixture(scope="session")
def tiny_pixels(tiny_tok, asset_images):
    return tiny_tok.preprocess(asset_images[:4])


# ---- CPU threads ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    the CI box has 2 shared cores, where one thread avoids oversubscription stalls, and loops of
    thousands of tiny ops run many times faster on one thread than on two that must synchronise
    after each (and than two on a busy machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- the LM's text tokenizer, captioned images and their id shards ---------------------------------------
@pytest.fixture(scope="module")
def sp(tmp_path_factory):
    """The tiny LLaMA-layout SentencePiece model (a tokenizer.model path)."""
    from builders import train_tiny_text_tokenizer

    return train_tiny_text_tokenizer(tmp_path_factory.mktemp("sp"))


@pytest.fixture(scope="module")
def text_tok(sp):
    from libra_lm import TextTokenizer

    return TextTokenizer.from_pretrained(sp)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, asset_images):
    """The sample images with captions.jsonl (builders.CAPTIONS: all but gravel.png)."""
    from builders import CAPTIONS

    root = tmp_path_factory.mktemp("captioned") / "imgs"
    root.mkdir()
    for p in asset_images:
        shutil.copy(p, root / p.name)
    lines = [json.dumps({"file": name, "caption": text}) for name, text in CAPTIONS.items()]
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def shard_dirs(image_folder, tmp_path_factory):
    """The same images encoded twice by the tiny tokenizer: with and without stored features."""
    from libra_tok.pipeline import encode_to_shards, load_tokenizer

    tok = load_tokenizer(preset="tiny", device="cpu")
    out = tmp_path_factory.mktemp("shards")
    for name, features in (("with", True), ("without", False)):
        encode_to_shards([image_folder], out / name, tok, batch_size=5, shard_size=6, num_workers=0, progress=False,
                         save_features=features)
    return out / "with", out / "without"
