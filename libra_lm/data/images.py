"""The images of training sequences, from id shards: the LM's feature policy over the shared
shard reader (`libra_tok.shards.ShardSet`), and finding a sample by the image path LLaVA JSON
names.

Contiguous (CLIP) features per image: read from the shards when they store them, otherwise
the image is read again from its recorded source and preprocessed here (in the loader's
workers), and the trainer runs the frozen tokenizer encoder on it. `input_mode="discrete"`
gives no features (zeros in the model; paper Tab. 3 (f), discrete-only input).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from libra_tok.shards import open_shards

from ..config import LibraConfig

INPUT_MODES = ("hybrid", "discrete")


class ShardImages:
    """One or more shard folders as one indexable collection of images (one `ShardSet`), with
    the feature policy of `input_mode`: stored features, pixels to encode again, or none.

    Metadata stays on disk and is read per sample through the shards' metadata index, so
    LAION-scale sets fit in memory; the object can be sent to data-loader workers (the shard
    reader reopens its memory maps there)."""

    def __init__(self, folders: Sequence[str | Path], input_mode: str = "hybrid"):
        if input_mode not in INPUT_MODES:
            raise ValueError(f"input mode must be one of {INPUT_MODES}, got {input_mode!r}")
        if not folders:
            raise ValueError("no shard folder given")
        self.folders = [str(f) for f in folders]
        self.input_mode = input_mode
        self.shards = open_shards(self.folders)

    def __len__(self) -> int:
        return len(self.shards)

    @property
    def tokenizer(self) -> dict[str, Any]:
        """Identity of the image tokenizer that wrote the ids (config, architecture_hash, weights_sha256, source)."""
        return dict(self.shards.tokenizer)

    @property
    def num_tokens(self) -> int:
        return self.shards.num_tokens

    @property
    def num_codebooks(self) -> int:
        return self.shards.num_codebooks

    @property
    def codebook_size(self) -> int:
        return self.shards.codebook_size

    @property
    def feature_dim(self) -> int:
        return self.shards.feature_dim

    @property
    def has_features(self) -> bool:
        return self.shards.has_features

    @property
    def captioned(self) -> np.ndarray:
        """(len,) bool: which samples have a caption."""
        return self.shards.captioned

    @property
    def needs_encoder(self) -> bool:
        """True when features must be computed by the tokenizer encoder during training."""
        return self.input_mode == "hybrid" and not self.has_features

    def meta(self, index: int) -> dict[str, Any]:
        """Metadata of sample `index` (source, member, size, caption ...), read from its shard."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        return self.shards.meta(index)

    def iter_meta(self) -> Iterator[dict[str, Any]]:
        """Metadata of every sample in order, streamed."""
        return self.shards.iter_meta()

    def ids(self, index: int) -> np.ndarray:
        """(P, num_codebooks) int64 image tokenizer ids of sample `index`."""
        return self.shards.ids(index).astype(np.int64)

    def name(self, index: int, meta: dict[str, Any] | None = None) -> str:
        meta = meta if meta is not None else self.meta(index)
        return f"{meta['source']}::{meta['member']}" if meta.get("member") else str(meta["source"])

    def image(self, index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(stored features (P, C) float16, pixels (3, R, R)) of sample `index`; at most one is set."""
        if self.input_mode == "discrete":
            return None, None
        if self.has_features:
            return torch.from_numpy(np.array(self.shards.features(index))), None
        return None, self._pixels(index)

    def _pixels(self, index: int) -> torch.Tensor:
        from libra_tok.data import ImageReadError, ImageRecord, read_image
        from libra_tok.preprocess import preprocess_image

        cfg = self.shards.tokenizer_config
        meta = self.meta(index)
        try:
            image = read_image(ImageRecord.from_meta(meta))
        except ImageReadError as err:
            raise ValueError(
                f"the shards store no CLIP features, and the source image of sample {index} ({self.name(index, meta)}) "
                f"cannot be read to compute them ({err}). Encode with `libra-tok encode --save-features`, make the "
                "source images available at their recorded paths, or train with --input discrete"
            ) from None
        return preprocess_image(image, cfg["resolution"], cfg["pad_mode"], cfg["image_mean"], cfg["image_std"])

    def lookup(self) -> ImageLookup:
        return ImageLookup([self.name(i, m).replace("::", "/") for i, m in enumerate(self.iter_meta())])


class ImageLookup:
    """Find a shard sample by an image path as LLaVA JSON writes it ("coco/train2017/x.jpg"):
    the sample whose recorded source path (or tar member) ends with that path."""

    def __init__(self, paths: Sequence[str]):
        self.paths = [p.replace("\\", "/") for p in paths]
        self.by_name: dict[str, list[int]] = {}
        for i, p in enumerate(self.paths):
            self.by_name.setdefault(p.rsplit("/", 1)[-1], []).append(i)

    def find(self, name: str) -> tuple[int | None, str]:
        """(sample index, "") or (None, the reason)."""
        name = name.replace("\\", "/").removeprefix("./")
        candidates = self.by_name.get(name.rsplit("/", 1)[-1], [])
        hits = [i for i in candidates if self.paths[i] == name or self.paths[i].endswith("/" + name)]
        if not hits:
            return None, "image not in the shards"
        if len(hits) > 1:
            return None, f"image matches {len(hits)} shard samples ({self.paths[hits[0]]}, {self.paths[hits[1]]}, ...)"
        return hits[0], ""


def check_images_fit(images: ShardImages, config: LibraConfig) -> None:
    """The LM's image length, codebooks and feature width must be those of the shards."""
    problems = []
    if images.num_tokens != config.num_image_tokens:
        problems.append(f"{images.num_tokens} patches per image in the shards, num_image_tokens "
                        f"{config.num_image_tokens} in the LM")
    if (images.num_codebooks, images.codebook_size) != (config.num_codebooks, config.codebook_size):
        problems.append(f"{images.num_codebooks} codebooks of {images.codebook_size} ids in the shards, "
                        f"{config.num_codebooks} of {config.codebook_size} in the LM")
    if images.input_mode == "hybrid" and images.feature_dim != config.contiguous_signal_size:
        problems.append(f"{images.feature_dim} feature channels in the shards, contiguous_signal_size "
                        f"{config.contiguous_signal_size} in the LM")
    if problems:
        raise ValueError("the shards do not fit the LM: " + "; ".join(problems) + ". Use an LM config made for this "
                         "image tokenizer (e.g. --lm '{contiguous_signal_size: N, num_image_tokens: P}' for a fresh "
                         "model)")


__all__ = ["INPUT_MODES", "ShardImages", "ImageLookup", "check_images_fit"]
