"""What every scorer checks first: each question answered, no answer to an unknown question."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def check_complete(questions: Mapping[Any, Any], answers: Mapping[Any, str], name: str) -> None:
    if not questions:
        raise ValueError(f"no {name} questions to score")
    missing = [k for k in questions if k not in answers]
    if missing:
        raise ValueError(f"{len(missing)} {name} question(s) have no answer (e.g. {missing[0]!r})")
    extra = [k for k in answers if k not in questions]
    if extra:
        raise ValueError(f"{len(extra)} answer(s) to questions not in the {name} questions (e.g. {extra[0]!r})")


__all__ = ["check_complete"]
