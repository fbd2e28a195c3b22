"""Instruction tuning on LLaVA-format conversations: reading the JSON, the turns as rounds, and
the vicuna v1 sequence with answer-only labels (official instruction_dataset.py `preprocess_v1`,
`preprocess_multimodal`; docs/official-formats.md#lm-behaviour)."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from libra_tok.jsonl import iter_json_lines

from .. import templates
from ..config import LibraConfig
from ..segments import image_segment
from .examples import Example, as_ids, assemble, masked, truncate

IMAGE_TAG = "<image>"  # LLaVA's image placeholder in a human turn
ROLES = {"human": "USER", "gpt": "ASSISTANT"}


def parse_conversation(conversations: Sequence[dict],
                       where: str = "sample") -> tuple[list[tuple[str, str | None]], int | None]:
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
    image_ids: torch.Tensor | np.ndarray | None = None,
    image_round: int | None = None,
    image: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None),
    system: str = templates.VICUNA_V1_SYSTEM,
    max_length: int | None = None,
) -> Example:
    """The vicuna v1 template with answer-only labels: BOS, the system prompt, every
    "USER: ... ASSISTANT:" and the image are masked; each answer and its EOS (the template's
    " </s>") are trained. The image (`image_ids` (P, num_codebooks) of the image tokenizer)
    goes first in the human turn of `image_round`; `image` = (stored features, pixels)."""
    if (image_ids is None) != (image_round is None):
        raise ValueError("give both image_ids and image_round for a sample with an image, or neither")
    img = image_segment(as_ids(image_ids), None, config) if image_ids is not None else None
    parts = templates.encode_parts(templates.vicuna_v1(rounds, image_round, system), text_tokenizer, config, image=img)
    pieces = [(segment.ids, segment.ids.clone() if part.answer else masked(segment.ids)) for part, segment in parts]
    images = [(k, image) for k, (part, _) in enumerate(parts) if part.text is None]
    return truncate(assemble(pieces, images), max_length, config)


def enumerate_records(records: Sequence[dict]) -> Iterator[tuple[str, dict]]:
    for n, record in enumerate(records):
        yield f"sample {record.get('id', n)!s}", record


def records_of(json_files: Sequence[str | Path]) -> Iterator[tuple[str, dict]]:
    """(where, record) of LLaVA JSON files (a list of objects) or JSON-lines files."""
    for path in json_files:
        path = Path(path)
        try:
            if path.suffix == ".jsonl":  # errors name the line (libra_tok.jsonl)
                data = [row for _, row in iter_json_lines(path, "one {image, conversations} sample per line")]
            else:
                data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise FileNotFoundError(f"cannot read instruction data {path}: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}: not valid JSON ({exc.msg} at line {exc.lineno})") from None
        if not isinstance(data, list):
            raise ValueError(f"{path}: expected a JSON list of {{image, conversations}} samples (LLaVA format)")
        for n, record in enumerate(data):
            if not isinstance(record, dict):
                raise ValueError(f"{path}: item {n} is not an object")
            yield f"{path.name}[{n}] (id {record.get('id', n)})", record


__all__ = ["IMAGE_TAG", "ROLES", "parse_conversation", "conversation_example", "records_of", "enumerate_records"]
