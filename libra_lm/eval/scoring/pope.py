"""POPE: the official evaluate.py (RUCAIBox/POPE; llava/eval/eval_pope.py applies the same
rules per split).

Parsing: only the text before the first "." is kept, commas are removed, and the answer is
"no" when the space-separated words contain "No", "no" or "not", otherwise "yes". Metrics
take "yes" as the positive class. The official script divides by zero when the model never
says "yes" (or no question is positive); here such a precision or recall is 0 (and F1 with
it), as scikit-learn's zero_division=0.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from .common import check_complete

LABELS = ("yes", "no")


def parse_yes_no(text: str) -> str:
    """"yes" or "no", as evaluate.py reads an answer."""
    if text.find(".") != -1:
        text = text.split(".")[0]
    words = text.replace(",", "").split(" ")
    return "no" if ("No" in words or "not" in words or "no" in words) else "yes"


def pope_metrics(labels: Sequence[str], predictions: Sequence[str]) -> dict[str, Any]:
    """Metrics of parsed predictions ("yes"/"no") against labels ("yes"/"no"), in percent
    (counts as integers)."""
    if len(labels) != len(predictions):
        raise ValueError(f"{len(labels)} labels but {len(predictions)} predictions")
    if not labels:
        raise ValueError("no POPE questions to score")
    tp = fp = tn = fn = 0
    for label, pred in zip(labels, predictions, strict=True):
        pos_label, pos_pred = label != "no", pred != "no"  # evaluate.py: anything but "no" is yes
        tp += pos_pred and pos_label
        fp += pos_pred and not pos_label
        tn += (not pos_pred) and (not pos_label)
        fn += (not pos_pred) and pos_label
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    n = len(labels)
    return {"f1": 100 * f1, "accuracy": 100 * (tp + tn) / n, "precision": 100 * precision, "recall": 100 * recall,
            "yes_ratio": 100 * sum(p != "no" for p in predictions) / n, "tp": tp, "fp": fp, "tn": tn, "fn": fn,
            "count": n}


def score_pope(questions: Mapping[Any, Mapping[str, Any]], answers: Mapping[Any, str]) -> dict[str, Any]:
    """Per split and mean F1: `questions` maps an id to {"label", "split"}; `answers` maps
    the same ids to the raw answer text. The answers are matched by id (the official script
    pairs them by line order, which is the same for complete files)."""
    check_complete(questions, answers, "POPE")
    splits: dict[str, tuple[list[str], list[str]]] = {}
    for k, q in questions.items():
        labels, preds = splits.setdefault(str(q.get("split", "all")), ([], []))
        labels.append(q["label"])
        preds.append(parse_yes_no(answers[k]))
    per_split = {s: pope_metrics(*lp) for s, lp in splits.items()}
    out: dict[str, Any] = {"splits": per_split}
    for key in ("f1", "accuracy", "precision", "recall", "yes_ratio"):
        out[key] = sum(m[key] for m in per_split.values()) / len(per_split)
    out["count"] = sum(m["count"] for m in per_split.values())
    return out


__all__ = ["LABELS", "parse_yes_no", "pope_metrics", "score_pope"]
