"""Exact-match accuracy of GQA: LLaVA's scripts/convert_gqa_for_eval.py turns an answer into
a prediction (trailing periods stripped, lower case), and GQA's eval.py counts a prediction
right when it equals the answer; accuracies per structural and semantic type as eval.py
reports them."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .common import check_complete


def gqa_prediction(text: str) -> str:
    return text.rstrip(".").lower()


def score_gqa(questions: Mapping[Any, Mapping[str, Any]], answers: Mapping[Any, str]) -> dict[str, Any]:
    """`questions`: id -> {"answer", "types" (optional {"structural", "semantic"})}; answers:
    id -> the model's text. Accuracy in percent."""
    check_complete(questions, answers, "GQA")
    right, by_type = [], {"structural": {}, "semantic": {}}
    for k, q in questions.items():
        ok = gqa_prediction(answers[k]) == q["answer"]
        right.append(ok)
        for kind, table in by_type.items():
            name = (q.get("types") or {}).get(kind)
            if name:
                table.setdefault(str(name), []).append(ok)
    out: dict[str, Any] = {"accuracy": 100 * sum(right) / len(right), "count": len(right)}
    for kind, table in by_type.items():
        if table:
            out[f"per_{kind}"] = {t: 100 * sum(v) / len(v) for t, v in sorted(table.items())}
    return out


__all__ = ["gqa_prediction", "score_gqa"]
