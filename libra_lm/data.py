"""Training sequences from id shards (`libra-tok encode`): pretraining captions and LLaVA-style
instruction data, label masks as the official pipeline, padding or packing, worker-safe datasets.

    shards = ShardImages(["shards/"], input_mode="hybrid")
    data = PretrainDataset(shards, "tokenizer.model", LibraConfig.from_preset("tiny"))
    batch = collate([data[0], data[1]], data.config)      # Batch: input_ids (B, N, 2), labels, masks ...

Layouts (reference 2.12), joint ids (text ids in both columns, image codes + V_t, BOI, EOI):
  pretraining   <s> BOI [patches] EOI \\n caption          (no EOS, as the official Libra-Base)
                labels: BOS, BOI and the "\\n" masked; patches, EOI and the caption trained.
  instruction   <s>{system} USER: BOI [patches] EOI \\n{question} ASSISTANT: {answer}</s>USER: ...
                labels: everything but the answers and their EOS masked (image included).
The prompt side is built exactly as `libra_lm.generate.build_prompt` builds it at inference.

Contiguous (CLIP) features per image: read from the shard when it stores them, otherwise the
image is read again from its source and preprocessed here (in the loader's workers); the
trainer runs the frozen tokenizer encoder on it. `input_mode="discrete"` gives zero features
(paper Tab. 3 (f), discrete-only input).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from .config import LibraConfig
from .generate import VICUNA_V1_SYSTEM, check_text_tokenizer, image_segment
from .model import IGNORE_INDEX

INPUT_MODES = ("hybrid", "discrete")
IMAGE_TAG = "<image>"  # LLaVA's image placeholder in a human turn
ROLES = {"human": "USER", "gpt": "ASSISTANT"}
MAX_LISTED = 1000  # left-out samples named in a dataset's `skipped`


# ---- captions ---------------------------------------------------------------------------------------
def preprocess_caption(caption: str, max_words: int = 64, lowercase: bool = True, remove_html: bool = False) -> str:
    """The official pretraining caption processor (`LibraCaptionProcessor`, configured with
    max_words 64, lowercase, HTML kept): `*#~` become spaces, runs of 2+ whitespace one
    space, strip, lowercase, then the first `max_words` space-separated words."""
    if remove_html:
        caption = re.sub(r"<.*?>", "", caption)
    caption = re.sub(r"([*#~])", " ", caption)
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.strip()
    if lowercase:
        caption = caption.lower()
    words = caption.split(" ")
    if len(words) > max_words:
        caption = " ".join(words[:max_words])
    return caption


# ---- examples -----------------------------------------------------------------------------------------
@dataclass
class ImageSlot:
    """Where an image's patches sit in a sequence and how its CLIP features are obtained."""

    start: int  # index of the first patch (BOI is at start - 1)
    features: torch.Tensor | None = None  # (P, C) stored features
    pixels: torch.Tensor | None = None  # (3, R, R) preprocessed image: the trainer computes the features


@dataclass
class Example:
    """One training sequence: joint ids (n, num_codebooks), labels of the same shape
    (IGNORE_INDEX where not trained) and its images."""

    ids: torch.Tensor
    labels: torch.Tensor
    images: list[ImageSlot] = field(default_factory=list)

    def __len__(self) -> int:
        return self.ids.shape[0]

    @property
    def num_labels(self) -> int:
        """Trained positions (each predicted by the position before it)."""
        return int((self.labels[1:, 0] != IGNORE_INDEX).sum())


def _text(ids: Sequence[int], config: LibraConfig) -> torch.Tensor:
    t = torch.as_tensor(list(ids), dtype=torch.long)
    return t[:, None].expand(-1, config.num_codebooks).clone()


def _assemble(pieces: list[tuple[torch.Tensor, torch.Tensor]], images: list[tuple[int, Any]]) -> Example:
    """pieces: (ids, labels) in order; images: (piece index of the image, slot source)."""
    starts = np.cumsum([0] + [p[0].shape[0] for p in pieces])
    ids = torch.cat([p[0] for p in pieces])
    labels = torch.cat([p[1] for p in pieces])
    slots = [ImageSlot(int(starts[k]) + 1, *src) for k, src in images]
    return Example(ids, labels, slots)


def _masked(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ids, torch.full_like(ids, IGNORE_INDEX)


def _trained(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return ids, ids.clone()


def truncate(example: Example, max_length: int | None, config: LibraConfig) -> Example:
    """Cut to `max_length` tokens. An image is never cut in the middle (the official code can
    do that, reference 5.12): if the cut falls inside one, the sequence ends before its BOI."""
    n = len(example)
    if max_length is None or n <= max_length:
        return example
    cut = max_length
    for slot in example.images:
        boi, eoi = slot.start - 1, slot.start + config.num_image_tokens
        if boi < cut <= eoi:
            cut = boi
    images = [s for s in example.images if s.start + config.num_image_tokens < cut]
    return Example(example.ids[:cut].clone(), example.labels[:cut].clone(), images)


def pretrain_example(
    codes: torch.Tensor | np.ndarray,
    caption: str,
    text_tokenizer,
    config: LibraConfig,
    *,
    image: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    eos: bool = False,
    max_length: int | None = None,
) -> Example:
    """`<s> BOI [patches] EOI \\n caption` with the official labels (reference 2.12):
    BOS, BOI and the newline masked (EOI predicts nothing across modalities); patches, EOI
    and the caption trained; no EOS unless `eos` (the official Libra-Base has none).
    `image` = (stored features, pixels) of the image slot."""
    tok = text_tokenizer
    codes = torch.as_tensor(np.asarray(codes, dtype=np.int64))
    img = image_segment(codes, None, config).ids
    img_labels = img.clone()
    img_labels[0] = IGNORE_INDEX  # BOI: a text position cannot predict it (reference 2.8)
    text = tok.encode("\n" + caption, prefix_space=False, eos=eos)
    text_ids = _text(text, config)
    text_labels = text_ids.clone()
    text_labels[0] = IGNORE_INDEX  # the "\n" after EOI (official "mask nearest text token after image")
    pieces = [_masked(_text([tok.bos_token_id], config)), (img, img_labels), (text_ids, text_labels)]
    return truncate(_assemble(pieces, [(1, image)]), max_length, config)


def parse_conversation(conversations: Sequence[dict], where: str = "sample") -> tuple[list[tuple[str, str | None]], int | None]:
    """LLaVA turns -> ([(question, answer or None)], index of the round whose question held
    <image>, or None). A leading non-human turn is skipped, as the official preprocessing."""
    if not isinstance(conversations, list) or not conversations:
        raise ValueError(f"{where}: 'conversations' must be a non-empty list of {{from, value}} turns")
    turns = list(conversations)
    if turns and turns[0].get("from") != "human":
        turns = turns[1:]
    rounds: list[tuple[str, str | None]] = []
    image_round = None
    for j, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLES or not isinstance(turn.get("value"), str):
            raise ValueError(f"{where}: turn {j} must be {{'from': 'human'|'gpt', 'value': str}}, got {turn!r:.80}")
        expected = "human" if j % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise ValueError(f"{where}: turn {j} is from {turn['from']!r}, expected {expected!r} (turns alternate "
                             "human, gpt, ...)")
        value = turn["value"]
        if expected == "human":
            if IMAGE_TAG in value:
                if image_round is not None or value.count(IMAGE_TAG) > 1:
                    raise ValueError(f"{where}: more than one {IMAGE_TAG} tag (one image per sample)")
                image_round = len(rounds)
                value = value.replace(IMAGE_TAG, "")
            rounds.append((value.strip(), None))
        else:
            if IMAGE_TAG in value:
                raise ValueError(f"{where}: {IMAGE_TAG} in an answer; images go in human turns")
            rounds[-1] = (rounds[-1][0], value.strip())
    return rounds, image_round


def conversation_example(
    rounds: Sequence[tuple[str, str | None]],
    text_tokenizer,
    config: LibraConfig,
    *,
    codes: torch.Tensor | np.ndarray | None = None,
    image_round: int | None = None,
    image: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    system: str = VICUNA_V1_SYSTEM,
    max_length: int | None = None,
) -> Example:
    """The vicuna v1 template with answer-only labels (reference 2.12, `preprocess_v1`):
    BOS, the system prompt, every "USER: ... ASSISTANT:" and the image are masked; each
    answer and its EOS (the template's " </s>") are trained. The image goes first in the
    human turn of `image_round`, followed by "\\n" and the question, as the official
    `preprocess_multimodal`."""
    tok = text_tokenizer
    if (codes is None) != (image_round is None):
        raise ValueError("give both codes and image_round for a sample with an image, or neither")
    pieces: list[tuple[torch.Tensor, torch.Tensor]] = []
    images = []
    for k, (question, answer) in enumerate(rounds):
        head = f"{system} USER:" if k == 0 else "USER:"
        if k == image_round:
            pieces.append(_masked(_text(tok.encode(head, bos=k == 0), config)))
            images.append((len(pieces), image))
            pieces.append(_masked(image_segment(torch.as_tensor(np.asarray(codes, dtype=np.int64)), None, config).ids))
            tail = f"\n{question} ASSISTANT:" if question else " ASSISTANT:"
            pieces.append(_masked(_text(tok.encode(tail, prefix_space=False), config)))
        else:
            pieces.append(_masked(_text(tok.encode(f"{head} {question} ASSISTANT:", bos=k == 0), config)))
        if answer is not None:
            # " {answer}" after "ASSISTANT:": SentencePiece's dummy prefix is that space.
            pieces.append(_trained(_text(tok.encode(answer, eos=True), config)))
    return truncate(_assemble(pieces, images), max_length, config)


# ---- images from shards -------------------------------------------------------------------------------
class ShardImages:
    """One or more shard folders as one indexable collection of images, with the feature
    policy of `input_mode`: stored features, pixels to encode again, or none (discrete).

    Per-sample metadata stays on disk: only the byte offset of each metadata line and
    whether it has a caption are kept (9 bytes a sample), so LAION-scale shard sets fit in
    memory. Shard sets are opened lazily, so the object can be sent to data-loader workers."""

    def __init__(self, folders: Sequence[str | Path], input_mode: str = "hybrid"):
        from libra_tok.shards import open_shards

        if input_mode not in INPUT_MODES:
            raise ValueError(f"input mode must be one of {INPUT_MODES}, got {input_mode!r}")
        if not folders:
            raise ValueError("no shard folder given")
        self.folders = [str(f) for f in folders]
        self.input_mode = input_mode
        sets = [open_shards(f) for f in self.folders]
        first = sets[0].manifest["tokenizer"]
        for f, s in zip(self.folders[1:], sets[1:]):
            other = s.manifest["tokenizer"]
            if (other["architecture_hash"], other["weights_sha256"]) != (first["architecture_hash"], first["weights_sha256"]):
                raise ValueError(f"{f} was encoded by another image tokenizer than {self.folders[0]}; "
                                 "all shard folders of a run must come from one tokenizer")
        self.tokenizer = dict(first)
        manifest = sets[0].manifest
        self.num_tokens = int(manifest["ids"]["shape"][1])
        self.num_codebooks = int(manifest["num_codebooks"])
        self.codebook_size = int(manifest["codebook_size"])
        self.feature_dim = int(manifest["feature_dim"])
        self.has_features = all(s.has_features for s in sets)
        self.sizes = [len(s) for s in sets]
        self.offsets = np.cumsum([0] + self.sizes)
        # Metadata lines, shard by shard in sample order (as libra_tok.shards reads them).
        self.meta_files: list[str] = []
        line_offsets, captioned = [], []
        for s in sets:
            for shard in s.shards:
                path = shard.path / shard.manifest["meta"]["file"]
                starts, has_caption = _scan_meta(path)
                if len(starts) != shard.num_samples:
                    raise ValueError(f"{path} has {len(starts)} lines for {shard.num_samples} samples (damaged shard; "
                                     "`libra-tok verify` checks the files)")
                self.meta_files.append(str(path))
                line_offsets.append(starts)
                captioned.append(has_caption)
        self.meta_counts = np.cumsum([0] + [len(x) for x in line_offsets])
        self.line_offsets = np.concatenate(line_offsets) if line_offsets else np.zeros(0, np.int64)
        self.captioned = np.concatenate(captioned) if captioned else np.zeros(0, bool)
        self._sets: list | None = sets

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_sets"] = None  # memory maps are reopened in each process
        return state

    def _locate(self, index: int):
        from libra_tok.shards import open_shards

        if self._sets is None:
            self._sets = [open_shards(f) for f in self.folders]
        k = int(np.searchsorted(self.offsets, index, side="right")) - 1
        return self._sets[k], index - int(self.offsets[k])

    @property
    def needs_encoder(self) -> bool:
        """True when features must be computed by the tokenizer encoder during training."""
        return self.input_mode == "hybrid" and not self.has_features

    def meta(self, index: int) -> dict[str, Any]:
        """Metadata of sample `index` (source, member, size, caption ...), read from its shard."""
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        k = int(np.searchsorted(self.meta_counts, index, side="right")) - 1
        with open(self.meta_files[k], "rb") as fh:
            fh.seek(int(self.line_offsets[index]))
            return json.loads(fh.readline())

    def iter_meta(self) -> Iterator[dict[str, Any]]:
        """Metadata of every sample in order, streamed."""
        for path in self.meta_files:
            with open(path, encoding="utf-8") as fh:
                for line in fh:
                    if line.strip():
                        yield json.loads(line)

    def codes(self, index: int) -> np.ndarray:
        shards, i = self._locate(index)
        shard, j = shards.locate(i)
        return np.asarray(shard.ids[j], dtype=np.int64)

    def name(self, index: int, meta: dict[str, Any] | None = None) -> str:
        meta = meta if meta is not None else self.meta(index)
        return f"{meta['source']}::{meta['member']}" if meta.get("member") else str(meta["source"])

    def image(self, index: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(stored features (P, C) float16, pixels (3, R, R)) of sample `index`; at most one is set."""
        if self.input_mode == "discrete":
            return None, None
        if self.has_features:
            shards, i = self._locate(index)
            shard, j = shards.locate(i)
            return torch.from_numpy(np.array(shard.features[j])), None
        return None, self._pixels(index)

    def _pixels(self, index: int) -> torch.Tensor:
        from libra_tok.data import ImageReadError, ImageRecord, read_image
        from libra_tok.preprocess import preprocess_image

        cfg = self.tokenizer["config"]
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

    def lookup(self) -> "ImageLookup":
        return ImageLookup([self.name(i, m).replace("::", "/") for i, m in enumerate(self.iter_meta())])


def _scan_meta(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(byte offset of each non-empty line, whether it has a non-empty caption) of a
    meta.jsonl. The file is written by json.dumps with sorted keys, so the key appears
    unescaped as `"caption": "` exactly when a caption is there (quotes inside strings are
    escaped)."""
    starts, captioned = [], []
    position = 0
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                starts.append(position)
                captioned.append(b'"caption": "' in line and b'"caption": ""' not in line)
            position += len(line)
    return np.asarray(starts, dtype=np.int64), np.asarray(captioned, dtype=bool)


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


# ---- datasets -----------------------------------------------------------------------------------------
class _TextTokenizerMixin:
    """Loads the SentencePiece model lazily, once per process (workers included)."""

    text_tokenizer_path: str
    _text_tok: Any = None

    @property
    def text_tokenizer(self):
        if self._text_tok is None:
            from .text import TextTokenizer

            self._text_tok = TextTokenizer.from_pretrained(self.text_tokenizer_path)
        return self._text_tok

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_text_tok"] = None
        return state


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
                         "image tokenizer (e.g. --lm '{contiguous_signal_size: N, num_image_tokens: P}' for a fresh model)")


class PretrainDataset(_TextTokenizerMixin, Dataset):
    """Image-caption pairs of shards -> pretraining examples. Samples without a caption are
    left out (listed in `skipped`). Items are addressed by position or by a (position, seed)
    key as `libra_tok.train.KeyedBatches` yields them."""

    def __init__(self, images: ShardImages, text_tokenizer_path: str | Path, config: LibraConfig, *,
                 max_length: int | None = 700, max_words: int = 64, eos: bool = False,
                 indices: Sequence[int] | None = None):
        check_images_fit(images, config)
        self.images = images
        self.text_tokenizer_path = str(text_tokenizer_path)
        self.config = config
        self.max_length, self.max_words, self.eos = max_length, max_words, eos
        candidates = np.arange(len(images)) if indices is None else np.asarray(indices, dtype=np.int64)
        keep = images.captioned[candidates]
        self.indices = candidates[keep]
        # Samples left out, named (the first MAX_LISTED of them) for the run's report.
        self.num_skipped = int((~keep).sum())
        self.skipped = {images.name(int(i)): "no caption" for i in candidates[~keep][:MAX_LISTED]}
        if not len(self.indices):
            raise ValueError(
                f"none of the {len(candidates)} shard samples in {', '.join(images.folders)} has a caption; "
                "pretraining needs image-caption pairs: give `libra-tok encode` images with sidecar .txt files, a "
                "captions.jsonl/.csv in the folder, or tar shards with .txt/.json members"
            )
        check_text_tokenizer(self.text_tokenizer, config)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, key: int | tuple[int, int]) -> Example:
        position = key[0] if isinstance(key, tuple) else key
        index = int(self.indices[position])
        caption = preprocess_caption(self.images.meta(index)["caption"], self.max_words)
        return pretrain_example(self.images.codes(index), caption, self.text_tokenizer, self.config,
                                image=self.images.image(index), eos=self.eos, max_length=self.max_length)


class InstructionDataset(_TextTokenizerMixin, Dataset):
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
        return conversation_example(rounds, self.text_tokenizer, self.config, codes=self.images.codes(index),
                                    image_round=image_round, image=self.images.image(index),
                                    max_length=self.max_length)


def enumerate_records(records: Sequence[dict]) -> Iterator[tuple[str, dict]]:
    for n, record in enumerate(records):
        yield f"sample {record.get('id', n)!s}", record


def records_of(json_files: Sequence[str | Path]) -> Iterator[tuple[str, dict]]:
    """(where, record) of LLaVA JSON files (a list of objects) or JSON-lines files."""
    for path in json_files:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise FileNotFoundError(f"cannot read instruction data {path}: {exc.strerror or exc}") from None
        try:
            data = json.loads(text) if path.suffix != ".jsonl" else [json.loads(x) for x in text.splitlines() if x.strip()]
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of {{image, conversations}} samples (LLaVA format)")
        for n, record in enumerate(data):
            if not isinstance(record, dict):
                raise ValueError(f"{path}: item {n} is not an object")
            yield f"{path.name}[{n}] (id {record.get('id', n)})", record


# ---- batches ------------------------------------------------------------------------------------------
@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, N, num_codebooks)
    labels: torch.Tensor  # (B, N, num_codebooks), IGNORE_INDEX where not trained
    attention_mask: torch.Tensor  # (B, N) 1 = token
    segment_ids: torch.Tensor | None  # (B, N) packed rows: one id per example (padding its own)
    clip_features: torch.Tensor | None  # (B, N, C) float32 from stored features; zero elsewhere
    pixels: torch.Tensor | None  # (M, 3, R, R) images whose features the trainer computes
    pixel_slots: list[tuple[int, int]]  # (row, first patch) of each pixels entry
    samples: list[tuple[int, int, int]]  # (row, start, length) of every example, in input order

    @property
    def num_tokens(self) -> int:
        return int(self.attention_mask.sum())

    @property
    def num_labels(self) -> int:
        return int((self.labels[:, 1:, 0] != IGNORE_INDEX).sum())

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        move = lambda t: None if t is None else t.to(device, non_blocking=non_blocking)  # noqa: E731
        return Batch(move(self.input_ids), move(self.labels), move(self.attention_mask), move(self.segment_ids),
                     move(self.clip_features), move(self.pixels), self.pixel_slots, self.samples)

    def pin_memory(self) -> "Batch":
        pin = lambda t: None if t is None else t.pin_memory()  # noqa: E731
        return Batch(pin(self.input_ids), pin(self.labels), pin(self.attention_mask), pin(self.segment_ids),
                     pin(self.clip_features), pin(self.pixels), self.pixel_slots, self.samples)


def pack_rows(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """First-fit packing of items (in order) into rows of at most `capacity` tokens."""
    rows: list[list[int]] = []
    free: list[int] = []
    for i, n in enumerate(lengths):
        if n > capacity:
            raise ValueError(f"a sequence of {n} tokens does not fit a packed row of {capacity}")
        for r, space in enumerate(free):
            if n <= space:
                rows[r].append(i)
                free[r] -= n
                break
        else:
            rows.append([i])
            free.append(capacity - n)
    return rows


def collate(examples: Sequence[Example], config: LibraConfig, *, pack: bool = False,
            pack_length: int | None = None) -> Batch:
    """Right-padded batch (pad id, attention mask 0, labels ignored), or with `pack` several
    examples per row (first fit into `pack_length` tokens) told apart by `segment_ids`:
    attention stays inside an example and positions restart, so each example's loss is
    that of its padded row."""
    if not examples:
        raise ValueError("no examples to collate")
    lengths = [len(e) for e in examples]
    if pack:
        rows = pack_rows(lengths, pack_length or max(lengths))
    else:
        rows = [[i] for i in range(len(examples))]
    ncb = config.num_codebooks
    width = max(sum(lengths[i] for i in row) for row in rows)
    num_rows = len(rows)
    ids = torch.full((num_rows, width, ncb), config.pad_token_id, dtype=torch.long)
    labels = torch.full((num_rows, width, ncb), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(num_rows, width, dtype=torch.long)
    segments = torch.full((num_rows, width), -1, dtype=torch.long) if pack else None
    stored = any(s.features is not None for e in examples for s in e.images)
    feats = torch.zeros(num_rows, width, config.contiguous_signal_size) if stored else None
    pixels, pixel_slots = [], []
    samples: list[tuple[int, int, int] | None] = [None] * len(examples)
    for r, row in enumerate(rows):
        at = 0
        for seg, i in enumerate(row):
            e, n = examples[i], lengths[i]
            ids[r, at:at + n] = e.ids
            labels[r, at:at + n] = e.labels
            mask[r, at:at + n] = 1
            if segments is not None:
                segments[r, at:at + n] = seg
            for slot in e.images:
                if slot.features is not None:
                    feats[r, at + slot.start:at + slot.start + slot.features.shape[0]] = slot.features.float()
                elif slot.pixels is not None:
                    pixels.append(slot.pixels)
                    pixel_slots.append((r, at + slot.start))
            samples[i] = (r, at, n)
            at += n
    return Batch(ids, labels, mask, segments, feats, torch.stack(pixels) if pixels else None, pixel_slots,
                 samples)  # type: ignore[arg-type]


class Collator:
    """`collate` with fixed options, picklable for data-loader workers."""

    def __init__(self, config: LibraConfig, pack: bool = False, pack_length: int | None = None):
        self.config, self.pack, self.pack_length = config, pack, pack_length

    def __call__(self, examples: Sequence[Example]) -> Batch:
        return collate(examples, self.config, pack=self.pack, pack_length=self.pack_length)


# ---- text for a tokenizer -----------------------------------------------------------------------------
def iter_texts(sources: Iterable[str | Path]) -> Iterator[str]:
    """Texts to train a SentencePiece model on: shard folders (their captions), LLaVA JSON
    (every turn, <image> tags removed), JSON lines (caption/text keys) and plain text files."""
    from libra_tok.shards import open_shards

    for source in sources:
        path = Path(source)
        if path.is_dir():
            shards = open_shards(path)
            for shard in shards.shards:
                for meta in shard.meta:
                    if meta.get("caption"):
                        yield str(meta["caption"])
        elif path.suffix == ".json":
            for _, record in records_of([path]):
                for turn in record.get("conversations") or []:
                    if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                        yield turn["value"].replace(IMAGE_TAG, "").strip()
        elif path.suffix == ".jsonl":
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{n}: not a JSON object ({exc.msg})") from None
                for key in ("caption", "text", "alt", "prompt"):
                    if isinstance(row, dict) and isinstance(row.get(key), str):
                        yield row[key]
                        break
        elif path.is_file():
            yield path.read_text(encoding="utf-8", errors="replace")
        else:
            raise FileNotFoundError(f"{path} does not exist")


__all__ = [
    "INPUT_MODES",
    "preprocess_caption",
    "ImageSlot",
    "Example",
    "truncate",
    "pretrain_example",
    "parse_conversation",
    "conversation_example",
    "ShardImages",
    "ImageLookup",
    "check_images_fit",
    "PretrainDataset",
    "InstructionDataset",
    "records_of",
    "Batch",
    "pack_rows",
    "collate",
    "Collator",
    "iter_texts",
]
