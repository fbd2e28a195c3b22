"""What a benchmark task is to the harness: where its files are, how its questions are read
and rendered (paper Tab. 5 split, Tab. 6 prompt), how many tokens an answer may take, how its
answers are scored or written for submission, and which paper column it fills."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..prompts import render
from ..questions import Question, check_images

SHORT = "Answer the question using a single word or phrase."
LETTER = "Answer with the option's letter from the given choices directly."
LETTER_CN = "请直接回答选项字母。"
UNANSWERABLE = "When the provided information is insufficient, respond with 'Unanswerable'."
CAPTION = "Provide a one-sentence caption for the provided image."
CONCISE = "Answer this question concisely."


@dataclass(frozen=True)
class ScoreOptions:
    normalize: str = "official"  # VQA rule: official | always
    spice: bool = False  # caption SPICE


# scorer(questions, answers by qid_key, options) -> metrics; writer(questions, answers by qid_key, folder) -> files
Scorer = Callable[[Sequence[Question], Mapping[str, str], ScoreOptions], dict[str, Any]]
Writer = Callable[[Sequence[Question], Mapping[str, str], Path, ScoreOptions], list[Path]]


@dataclass(frozen=True)
class Task:
    name: str  # as --tasks names it
    title: str  # the benchmark
    split: str
    folder: str  # sub-folder of --data-root
    suffix: str  # the prompt after the question (paper Tab. 6)
    max_new_tokens: int
    reader: Callable[[Path], list[Question]]
    columns: Mapping[str, str]  # paper column -> metric key of the results ("" for submission-only tasks)
    table: int  # paper table of those columns
    scorer: Scorer | None = None
    writer: Writer | None = None  # official-format files (submission, eval tool inputs)
    hint_style: str = "plain"
    note: str = ""

    def read(self, data_root: str | Path, check: bool = True) -> list[Question]:
        """The questions of the task's folder under `data_root`, images checked to exist."""
        folder = Path(data_root).expanduser() / self.folder
        if not folder.is_dir():
            raise FileNotFoundError(f"{self.name}: folder {folder} does not exist; see docs/eval.md for the layout")
        questions = self.reader(folder)
        if not questions:
            raise ValueError(f"{self.name}: no questions found in {folder}")
        seen: set[str] = set()
        for q in questions:
            key = repr(q.qid)
            if key in seen:
                raise ValueError(f"{self.name}: question id {q.qid!r} appears twice in {folder}")
            seen.add(key)
        if check:
            check_images(questions, self.name)
        return questions

    def prompt(self, question: Question) -> str:
        return render(question, self.suffix, self.hint_style)

    @property
    def scored(self) -> bool:
        return self.scorer is not None


def limit_questions(questions: Sequence[Question], limit: int | None) -> list[Question]:
    """At most `limit` questions of each split (subtask), in file order, whole groups kept
    (MME image pairs, MMBench circular copies, MMVP pairs), so that every metric can still
    be computed on a smoke run."""
    if limit is None:
        return list(questions)
    taken: dict[str, int] = {}
    open_groups: set[tuple[str, Any]] = set()
    out = []
    for q in questions:
        group = (q.split, q.group) if q.group is not None else None
        if group is not None and group in open_groups:
            out.append(q)
            continue
        if taken.get(q.split, 0) >= limit:
            continue
        taken[q.split] = taken.get(q.split, 0) + 1
        out.append(q)
        if group is not None:
            open_groups.add(group)
    return out


__all__ = ["SHORT", "LETTER", "LETTER_CN", "UNANSWERABLE", "CAPTION", "CONCISE", "ScoreOptions", "Task",
           "limit_questions"]
