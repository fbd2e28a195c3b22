"""Texts to train a SentencePiece text tokenizer on, gathered from the same sources the LM
trains on (`libra-lm train-text-tokenizer`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path

from libra_tok.jsonl import iter_json_lines
from libra_tok.shards import open_shards

from .conversations import IMAGE_TAG, records_of


def iter_texts(sources: Iterable[str | Path]) -> Iterator[str]:
    """Shard folders (their captions), LLaVA JSON (every turn, <image> tags removed), JSON
    lines (caption/text keys) and plain text files."""
    for source in sources:
        path = Path(source)
        if path.is_dir():
            for meta in open_shards(path).iter_meta():
                if meta.get("caption"):
                    yield str(meta["caption"])
        elif path.suffix == ".json":
            for _, record in records_of([path]):
                for turn in record.get("conversations") or []:
                    if isinstance(turn, dict) and isinstance(turn.get("value"), str):
                        yield turn["value"].replace(IMAGE_TAG, "").strip()
        elif path.suffix == ".jsonl":
            for _, row in iter_json_lines(path, "objects with caption|text|alt|prompt"):
                for key in ("caption", "text", "alt", "prompt"):
                    if isinstance(row.get(key), str):
                        yield row[key]
                        break
        elif path.is_file():
            yield path.read_text(encoding="utf-8", errors="replace")
        else:
            raise FileNotFoundError(f"{path} does not exist")


__all__ = ["iter_texts"]
