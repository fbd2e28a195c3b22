"""MME: the rules of the benchmark's eval tool (tools/eval_tool/calculation.py of
BradyFU/Awesome-Multimodal-Large-Language-Models, Evaluation branch).

Each subtask file holds lines "image \\t question \\t ground truth \\t prediction"; consecutive
lines are taken two by two (the two questions of one image). Ground truth and prediction
are lower-cased; a prediction is "yes"/"no" when it is exactly that, otherwise by the first
four characters ("yes" looked for first, then "no"), otherwise "other" (counted wrong).
acc = correct / questions, acc+ = images with both questions right / images, and the
subtask score is 100 * (acc + acc+). Perception is the sum over its ten subtasks, cognition
over its four.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

PERCEPTION = ("existence", "count", "position", "color", "posters", "celebrity", "scene", "landmark", "artwork", "OCR")
COGNITION = ("commonsense_reasoning", "numerical_calculation", "text_translation", "code_reasoning")
CATEGORIES = {"perception": PERCEPTION, "cognition": COGNITION}


def parse_mme(prediction: str) -> str:
    """"yes", "no" or "other" of a (lower-cased) prediction, as calculation.py reads it."""
    pred = prediction.lower()
    if pred in ("yes", "no"):
        return pred
    prefix = pred[:4]
    if "yes" in prefix:
        return "yes"
    if "no" in prefix:
        return "no"
    return "other"


def score_subtask(rows: Sequence[Sequence[str]], name: str = "subtask") -> dict[str, Any]:
    """acc, acc+ and score of one subtask's rows (image, question, ground truth, prediction),
    in file order; rows pair up two by two."""
    if not rows:
        raise ValueError(f"MME {name}: no questions")
    if len(rows) % 2:
        raise ValueError(f"MME {name}: {len(rows)} lines, but the questions come in pairs (two per image)")
    correct = both = other = 0
    for i in range(0, len(rows), 2):
        right = 0
        for _image, _question, gt, pred in rows[i:i + 2]:
            gt = gt.lower()
            if gt not in ("yes", "no"):
                raise ValueError(f"MME {name}: ground truth must be yes or no, got {gt!r}")
            parsed = parse_mme(pred)
            other += parsed == "other"
            right += parsed == gt
        correct += right
        both += right == 2
    acc, acc_plus = correct / len(rows), both / (len(rows) // 2)
    return {"acc": 100 * acc, "acc_plus": 100 * acc_plus, "score": 100 * acc + 100 * acc_plus,
            "other": other, "count": len(rows)}


def score_mme(subtasks: Mapping[str, Sequence[Sequence[str]]]) -> dict[str, Any]:
    """Scores of every subtask given and the perception / cognition totals of the categories
    whose subtasks are all present (a category with some subtasks missing is an error)."""
    unknown = sorted(set(subtasks) - set(PERCEPTION) - set(COGNITION))
    if unknown:
        raise ValueError(f"unknown MME subtask(s) {unknown}; the subtasks are {list(PERCEPTION + COGNITION)}")
    out: dict[str, Any] = {"subtasks": {n: score_subtask(subtasks[n], n) for n in PERCEPTION + COGNITION
                                         if n in subtasks}}
    for category, names in CATEGORIES.items():
        present = [n for n in names if n in subtasks]
        if not present:
            continue
        if len(present) != len(names):
            missing = [n for n in names if n not in subtasks]
            raise ValueError(f"MME {category} needs all of its subtasks; missing: {missing}")
        out[category] = sum(out["subtasks"][n]["score"] for n in names)
    if not any(c in out for c in CATEGORIES):
        raise ValueError("no MME subtask to score")
    return out


__all__ = ["PERCEPTION", "COGNITION", "CATEGORIES", "parse_mme", "score_subtask", "score_mme"]
