"""Image segments of the questions (BOI + patches + EOI with CLIP features), each image
tokenized once: from `libra-tok` shards that store features when the image is there, else
read and encoded here, several images per tokenizer call. A small LRU cache holds the
segments of recent images; the runner orders questions so that those sharing an image
come together (MME's pairs, POPE's three splits, MMBench's circular copies)."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import LibraConfig
from ..generate import image_segments
from ..segments import Segment, image_segment
from .questions import ImageRef


class ImageBank:
    def __init__(self, tokenizer: Any, config: LibraConfig, *, shards: Sequence[str | Path] = (),
                 tokenizer_digest: str | None = None, capacity: int = 64, batch_size: int = 16,
                 precision: str = "auto"):
        if capacity < 1 or batch_size < 1:
            raise ValueError("the image cache and the image batch size must be at least 1")
        self.tokenizer, self.config = tokenizer, config
        self.capacity, self.batch_size, self.precision = capacity, batch_size, precision
        self.cache: OrderedDict[str, Segment] = OrderedDict()
        self.encoded = self.from_shards = 0  # images encoded here / taken from shards
        self.shards = self.lookup = None
        if shards:
            self._open_shards(shards, tokenizer_digest)

    def _open_shards(self, folders: Sequence[str | Path], digest: str | None) -> None:
        from ..data.images import ShardImages, check_images_fit

        shards = ShardImages(list(folders))
        names = ", ".join(str(f) for f in folders)
        if not shards.has_features:
            raise ValueError(f"--image-shards {names} store no CLIP features, which the LM reads beside the ids: "
                             "every image would be encoded again. Encode them with `libra-tok encode "
                             "--save-features`, or leave out --image-shards")
        check_images_fit(shards, self.config)
        if digest is not None and shards.tokenizer.get("weights_sha256") != digest:
            raise ValueError(f"--image-shards {names} were written by another image tokenizer than the model's "
                             f"(weights digest {shards.tokenizer.get('weights_sha256')} vs {digest}): their ids "
                             "would not be the ones the LM reads; use shards of the model's tokenizer")
        self.shards, self.lookup = shards, shards.lookup()

    def _from_shards(self, ref: ImageRef) -> Segment | None:
        if self.lookup is None or not ref.name:
            return None
        index, _ = self.lookup.find(ref.name)
        if index is None:
            return None
        feats, _ = self.shards.image(index)
        ids = torch.from_numpy(self.shards.ids(index))
        return image_segment(ids, feats, self.config)

    def read(self, ref: ImageRef):
        """The PIL image of `ref` (a file, or bytes from a benchmark table); a ValueError names
        an image that cannot be read."""
        from libra_tok.data import ImageReadError, decode_image_bytes, load_image

        if ref.path is not None:
            return load_image(ref.path)
        try:
            return decode_image_bytes(ref.data or b"")
        except ImageReadError as err:
            raise ValueError(f"cannot read the image {ref.key}: {err}") from None

    def segments(self, refs: Sequence[ImageRef]) -> list[Segment]:
        """The segment of each image, in order."""
        wanted = {r.key for r in refs}
        missing: dict[str, ImageRef] = {}
        for r in refs:
            if r.key in self.cache:
                self.cache.move_to_end(r.key)
            elif r.key not in missing:
                missing[r.key] = r
        to_encode = []
        for key, ref in missing.items():
            seg = self._from_shards(ref)
            if seg is None:
                to_encode.append(ref)
            else:
                self.from_shards += 1
                self._put(key, seg, wanted)
        for i in range(0, len(to_encode), self.batch_size):
            chunk = to_encode[i:i + self.batch_size]
            with torch.no_grad():
                segs = image_segments(self.tokenizer, [self.read(r) for r in chunk], self.config, self.precision)
            self.encoded += len(chunk)
            for ref, seg in zip(chunk, segs, strict=True):
                self._put(ref.key, seg, wanted)
        return [self.cache[r.key] for r in refs]

    def _put(self, key: str, seg: Segment, keep: set[str]) -> None:
        self.cache[key] = seg
        for old in list(self.cache):
            if len(self.cache) <= max(self.capacity, len(keep)):
                break
            if old not in keep:
                del self.cache[old]


__all__ = ["ImageBank"]
