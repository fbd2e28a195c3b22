"""The one shape every benchmark's questions take, and reading the official files with errors
that name the file and the format it should have.

A `Question` is what the harness asks and what a scorer needs back: a unique id within its
task, the image (a file, or bytes embedded in the benchmark file), the text and options to
render, and the ground truth when it is public.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libra_tok.jsonl import iter_json_lines


class BenchmarkFileError(ValueError):
    """A benchmark or answers file that is missing pieces or has another format."""


@dataclass(frozen=True)
class ImageRef:
    """An image of a question: a file (`path`), or encoded bytes held in a benchmark file
    (`data`, MMBench's base64 column). `key` identifies it across questions (questions that
    share an image share it); `name` is its path relative to the benchmark folder, by which
    `libra-tok` shards are searched."""

    key: str
    path: Path | None = None
    data: bytes | None = field(default=None, repr=False, compare=False)
    name: str = ""


@dataclass
class Question:
    qid: Any  # unique within the task (int or str, as JSON writes it)
    image: ImageRef | None
    text: str  # the question text to render (before options and the prompt suffix)
    options: list[str] = field(default_factory=list)  # rendered as "A. ..." lines
    hint: str | None = None  # MMBench hint / ScienceQA context, rendered before the question
    answer: Any = None  # the ground truth, None where it is not public
    split: str = ""  # POPE split, MME subtask ...
    group: Any = None  # questions scored together (MME image pair, MMBench circular copies, MMVP pair)
    meta: dict[str, Any] = field(default_factory=dict)  # what a scorer or a submission writer needs besides


def qid_key(qid: Any) -> str:
    """One spelling of a question id for lookups: 5 and "5" differ, as in JSON."""
    return json.dumps(qid)


def require_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path} does not exist")
    return path


def read_json(path: Path, expected: str) -> Any:
    """A JSON file; `expected` describes its format for the error message."""
    require_file(path, "benchmark file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise BenchmarkFileError(f"{path} is not JSON ({exc}); expected {expected}") from None


def read_jsonl(path: Path, expected: str) -> list[dict[str, Any]]:
    """A JSON-lines file of objects (blank lines skipped)."""
    require_file(path, "benchmark file")
    return [row for _, row in iter_json_lines(path, expected, BenchmarkFileError)]


def read_table(path: Path, expected: str, delimiter: str = ",") -> list[dict[str, str]]:
    """A CSV/TSV file with a header row, as dicts of strings."""
    require_file(path, "benchmark file")
    csv.field_size_limit(1 << 30)  # MMBench's TSV holds base64 images in one column
    with open(path, encoding="utf-8-sig", newline="") as fh:
        rows = list(csv.DictReader(fh, delimiter=delimiter))
    if not rows:
        raise BenchmarkFileError(f"{path} has no rows; expected {expected}")
    return rows


def require_keys(obj: Any, keys: Iterable[str], path: Path, where: str, expected: str) -> None:
    """`obj` must be a dict with `keys`, else a BenchmarkFileError naming the file, the place
    (e.g. "question 3") and the expected format."""
    if not isinstance(obj, dict):
        raise BenchmarkFileError(f"{path}: {where} is not an object; expected {expected}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise BenchmarkFileError(f"{path}: {where} has no {', '.join(repr(k) for k in missing)}; expected {expected}")


ANSWER_LINES = 'answer JSON lines {"question_id", "text"} (or "answer"), as LLaVA\'s eval scripts write them'


def read_answer_lines(path: Path) -> dict[str, str]:
    """Answers by qid_key from JSON lines {"question_id", "text" or "answer"}; a question
    answered twice is an error."""
    out: dict[str, str] = {}
    for n, row in enumerate(read_jsonl(path, ANSWER_LINES), 1):
        field_name = "text" if "text" in row else "answer"
        require_keys(row, ("question_id", field_name), path, f"line {n}", ANSWER_LINES)
        key = qid_key(row["question_id"])
        if key in out:
            raise BenchmarkFileError(f"{path}: question {row['question_id']!r} is answered twice")
        out[key] = str(row[field_name])
    return out


def image_file(folder: Path, relative: str) -> ImageRef:
    path = folder / relative
    return ImageRef(key=str(path), path=path, name=relative)


def check_images(questions: Sequence[Question], task: str) -> None:
    """Every image file must exist: a FileNotFoundError names the first missing one."""
    missing = [q.image.path for q in questions if q.image is not None and q.image.path is not None
               and not q.image.path.is_file()]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise FileNotFoundError(f"{task}: image {missing[0]} does not exist{more}; see docs/eval.md for the layout "
                                "of each benchmark's folder")


__all__ = ["BenchmarkFileError", "ImageRef", "Question", "qid_key", "require_file", "read_json", "read_jsonl",
           "read_table", "require_keys", "ANSWER_LINES", "read_answer_lines", "image_file", "check_images"]
