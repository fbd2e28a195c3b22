"""JSON-lines files read strictly: one object per line (blank lines skipped), and an error that
names the file, the line and the expected format (captions.jsonl, benchmark questions and
answers, training text files, attention questions)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def iter_json_lines(path: str | Path, expected: str = "one JSON object per line",
                    error: type[ValueError] = ValueError) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line of `path`, read as it goes (a large file
    is never held whole). A line that is not a JSON object raises `error` naming the file, the
    line and `expected`."""
    path = Path(path)
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise error(f"{path}:{number}: not a JSON object ({exc.msg}); expected {expected}") from None
            if not isinstance(row, dict):
                raise error(f"{path}:{number}: not a JSON object; expected {expected}")
            yield number, row


__all__ = ["iter_json_lines"]
