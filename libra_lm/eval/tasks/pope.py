"""POPE: the question files of the official repository (output/coco/coco_pope_{split}.json,
JSON lines {"question_id", "image", "text", "label"}), one per split; question ids restart
in each file, so the harness names a question "{split}/{question_id}"."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from ..questions import BenchmarkFileError, Question, image_file, qid_key, read_jsonl, require_keys
from ..scoring.pope import LABELS, score_pope
from .base import ScoreOptions

SPLITS = ("random", "popular", "adversarial")
POPE_QUESTIONS = 'POPE question JSON lines {"question_id", "image", "text", "label": "yes"|"no"}'


def read_pope_questions(path: Path) -> list[dict]:
    rows = read_jsonl(path, POPE_QUESTIONS)
    for n, row in enumerate(rows):
        require_keys(row, ("question_id", "image", "text", "label"), path, f"line {n + 1}", POPE_QUESTIONS)
        if row["label"] not in LABELS:
            raise BenchmarkFileError(f"{path}: line {n + 1}: label {row['label']!r} is not yes/no; "
                                     f"expected {POPE_QUESTIONS}")
    return rows


def pope_reader(image_dir: str = "val2014", pattern: str = "coco_pope_{}.json"):
    def read(folder: Path) -> list[Question]:
        out = []
        for split in SPLITS:
            for row in read_pope_questions(folder / pattern.format(split)):
                out.append(Question(qid=f"{split}/{row['question_id']}", image=image_file(folder, f"{image_dir}/"
                                                                                          f"{row['image']}"),
                                    text=row["text"], answer=row["label"], split=split))
        return out

    return read


def score_pope_task(questions: Sequence[Question], answers: Mapping[str, str], options: ScoreOptions) -> dict:
    return score_pope({qid_key(q.qid): {"label": q.answer, "split": q.split} for q in questions}, dict(answers))


__all__ = ["SPLITS", "POPE_QUESTIONS", "read_pope_questions", "pope_reader",
           "score_pope_task"]
