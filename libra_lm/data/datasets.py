"""The two training datasets, worker-safe: pretraining pairs (images of id shards with their
captions) and instruction conversations (LLaVA JSON, images looked up in id shards). Samples
left out are counted and named in `skipped`, never dropped silently."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch.utils.data import Dataset

from ..config import LibraConfig
from ..text import TextTokenizer, check_text_tokenizer
from .captions import preprocess_caption, pretrain_example
from .conversations import IMAGE_TAG, conversation_example, enumerate_records, parse_conversation, records_of
from .examples import Example
from .images import ShardImages, check_images_fit

MAX_LISTED = 1000  # left-out samples named in a dataset's `skipped`


class TextTokenizerMixin:
    """Loads the SentencePiece model lazily, once per process (workers included)."""

    text_tokenizer_path: str
    _text_tok: Any = None

    @property
    def text_tokenizer(self) -> TextTokenizer:
        if self._text_tok is None:
            self._text_tok = TextTokenizer.from_pretrained(self.text_tokenizer_path)
        return self._text_tok

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_text_tok"] = None
        return state


class CaptionedShards(TextTokenizerMixin, Dataset):
    """The image-caption pairs of shards, one example per captioned sample (captions lowercased,
    at most `max_words` words); samples without a caption are left out and listed in `skipped`.
    Items are addressed by position or by a (position, seed) key as the trainer's keyed batch
    sampler yields them. Subclasses turn a pair into an example (`example`) and name what the
    pairs are for (`purpose`, in the error when there are none)."""

    purpose = "training"

    def __init__(self, images: ShardImages, text_tokenizer_path: str | Path, config: LibraConfig, *,
                 max_length: int | None = 700, max_words: int = 64, indices: Sequence[int] | None = None):
        check_images_fit(images, config)
        self.images = images
        self.text_tokenizer_path = str(text_tokenizer_path)
        self.config = config
        self.max_length, self.max_words = max_length, max_words
        candidates = np.arange(len(images)) if indices is None else np.asarray(indices, dtype=np.int64)
        keep = images.captioned[candidates]
        self.indices = candidates[keep]
        # Samples left out, named (the first MAX_LISTED of them) for the run's report.
        self.num_skipped = int((~keep).sum())
        self.skipped = {images.name(int(i)): "no caption" for i in candidates[~keep][:MAX_LISTED]}
        if not len(self.indices):
            raise ValueError(
                f"none of the {len(candidates)} shard samples in {', '.join(images.folders)} has a caption; "
                f"{self.purpose} needs image-caption pairs: give `libra-tok encode` images with sidecar .txt files, "
                "a captions.jsonl/.csv in the folder, or tar shards with .txt/.json members"
            )
        check_text_tokenizer(self.text_tokenizer, config)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> Example:
        position = key[0] if isinstance(key, tuple) else key
        index = int(self.indices[position])
        return self.example(index, preprocess_caption(self.images.meta(index)["caption"], self.max_words))

    def example(self, index: int, caption: str) -> Example:
        raise NotImplementedError


class PretrainDataset(CaptionedShards):
    """Image-caption pairs of shards -> pretraining examples (image first, then the caption;
    libra_lm.data.captions). `eos`: end captions with EOS (the official pretraining does not)."""

    purpose = "pretraining"

    def __init__(self, images: ShardImages, text_tokenizer_path: str | Path, config: LibraConfig, *,
                 max_length: int | None = 700, max_words: int = 64, eos: bool = False,
                 indices: Sequence[int] | None = None):
        self.eos = eos
        super().__init__(images, text_tokenizer_path, config, max_length=max_length, max_words=max_words,
                         indices=indices)

    def example(self, index: int, caption: str) -> Example:
        return pretrain_example(self.images.ids(index), caption, self.text_tokenizer, self.config,
                                image=self.images.image(index), eos=self.eos, max_length=self.max_length)


class InstructionDataset(TextTokenizerMixin, Dataset):
    """LLaVA-format JSON (a list of {image?, conversations}) -> instruction examples; each
    sample's image is looked up in the shards by its path. Samples whose image is missing
    are left out and listed in `skipped` (the official loader skips them too)."""

    def __init__(self, json_files: Sequence[str | Path], images: ShardImages | None, text_tokenizer_path: str | Path,
                 config: LibraConfig, *, max_length: int | None = 2048, records: Sequence[dict] | None = None):
        if images is not None:
            check_images_fit(images, config)
        self.images = images
        self.text_tokenizer_path = str(text_tokenizer_path)
        self.config = config
        self.max_length = max_length
        self.samples: list[tuple[list[tuple[str, str | None]], int | None, int | None]] = []
        self.skipped: dict[str, str] = {}
        lookup = images.lookup() if images is not None else None
        for where, record in records_of(json_files) if records is None else enumerate_records(records):
            rounds, image_round = parse_conversation(record.get("conversations"), where)
            image = record.get("image")
            index = None
            if image is not None:
                if lookup is None:
                    raise ValueError(f"{where} names image {image!r} but no image shards were given "
                                     "(--image-shards: the folder written by `libra-tok encode` for these images)")
                index, reason = lookup.find(str(image))
                if index is None:
                    self.skipped[f"{where} ({image})"] = reason
                    continue
                if image_round is None:  # an image without a tag goes before the first question
                    image_round = 0
            elif image_round is not None:
                raise ValueError(f"{where} has an {IMAGE_TAG} tag but no 'image'")
            if not any(answer for _, answer in rounds):
                self.skipped[where] = "no answer to train on"
                continue
            self.samples.append((rounds, image_round, index))
        if not self.samples:
            detail = "; ".join(f"{k}: {v}" for k, v in list(self.skipped.items())[:3])
            raise ValueError(f"no usable instruction sample in {', '.join(map(str, json_files))}"
                             + (f" ({len(self.skipped)} left out, e.g. {detail})" if detail else ""))
        check_text_tokenizer(self.text_tokenizer, config)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, key: int | tuple[int, int]) -> Example:
        position = key[0] if isinstance(key, tuple) else key
        rounds, image_round, index = self.samples[position]
        if index is None:
            return conversation_example(rounds, self.text_tokenizer, self.config, max_length=self.max_length)
        return conversation_example(rounds, self.text_tokenizer, self.config, image_ids=self.images.ids(index),
                                    image_round=image_round, image=self.images.image(index),
                                    max_length=self.max_length)


__all__ = ["TextTokenizerMixin", "CaptionedShards", "PretrainDataset", "InstructionDataset", "MAX_LISTED"]
