"""Multiple-choice accuracies: ScienceQA, SEED-Bench and MMVP.

- ScienceQA (llava/eval/eval_science_qa.py): the answer is a letter when it is exactly one of
  A-E, or starts with "X. ", or contains exactly one "The answer is X."; a letter beyond the
  question's choices, or none, is wrong ("FAILED").
- SEED-Bench (scripts/convert_seed_for_submission.py of LLaVA): right when the answer is
  exactly the letter of the right option; accuracy per question type and overall.
- MMVP (tsb0601/MMVP: pairs of images with the same question; a pair counts when both are
  right). The official grader is GPT-4; here the option an answer names is found without
  it: "(a)"/"(b)" in the answer, or the answer being that letter, or the one option whose
  text it contains (unparsed answers are wrong and listed).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .common import check_complete

SQA_OPTIONS = ("A", "B", "C", "D", "E")
_SQA_ANSWER_IS = re.compile(r"The answer is ([A-Z]).")


def scienceqa_letter(prediction: str) -> str:
    """The letter eval_science_qa.py reads from an answer, or "FAILED"."""
    if prediction in SQA_OPTIONS:
        return prediction
    if len(prediction) >= 3 and prediction[0] in SQA_OPTIONS and prediction[1:3] == ". ":
        return prediction[0]
    found = _SQA_ANSWER_IS.findall(prediction)
    return found[0] if len(found) == 1 else "FAILED"


def scienceqa_correct(prediction: str, num_choices: int, answer: int) -> bool:
    letter = scienceqa_letter(prediction)
    index = SQA_OPTIONS.index(letter) if letter in SQA_OPTIONS[:num_choices] else -1
    return index == answer


def score_scienceqa(questions: Mapping[Any, Mapping[str, Any]], answers: Mapping[Any, str]) -> dict[str, Any]:
    """`questions`: id -> {"choices": [...], "answer": index}; accuracy in percent."""
    check_complete(questions, answers, "ScienceQA")
    right = [scienceqa_correct(answers[k], len(q["choices"]), int(q["answer"])) for k, q in questions.items()]
    failed = [k for k in questions if scienceqa_letter(answers[k]) == "FAILED"]
    return {"accuracy": 100 * sum(right) / len(right), "count": len(right), "unparsed": failed}


def score_seed(questions: Mapping[Any, Mapping[str, Any]], answers: Mapping[Any, str]) -> dict[str, Any]:
    """`questions`: id -> {"answer": letter, "question_type": name}; exact-letter accuracy."""
    check_complete(questions, answers, "SEED-Bench")
    by_type: dict[str, list[bool]] = {}
    right = []
    for k, q in questions.items():
        ok = answers[k] == q["answer"]
        right.append(ok)
        by_type.setdefault(str(q.get("question_type", "all")), []).append(ok)
    return {"accuracy": 100 * sum(right) / len(right), "count": len(right),
            "per_question_type": {t: 100 * sum(v) / len(v) for t, v in sorted(by_type.items())}}


def mmvp_choice(answer: str, options: Sequence[str]) -> str | None:
    """"a", "b", ... for the option an answer names, None when it names none or several."""
    labels = [chr(ord("a") + i) for i in range(len(options))]
    text = answer.strip().lower()
    named = [c for c in labels if f"({c})" in text]
    if len(named) == 1:
        return named[0]
    bare = text.rstrip(".").strip()
    if bare in labels:
        return bare
    hits = [c for c, o in zip(labels, options, strict=True) if o.strip().lower() and o.strip().lower() in text]
    return hits[0] if len(hits) == 1 else None


def score_mmvp(questions: Mapping[Any, Mapping[str, Any]], answers: Mapping[Any, str]) -> dict[str, Any]:
    """`questions`: id -> {"options": [...], "answer": "a"/"b", "pair": key}; the pair accuracy
    (both questions of a pair right) and the per-question accuracy, in percent."""
    check_complete(questions, answers, "MMVP")
    pairs: dict[Any, list[bool]] = {}
    unparsed = []
    for k, q in questions.items():
        got = mmvp_choice(answers[k], q["options"])
        if got is None:
            unparsed.append(k)
        pairs.setdefault(q["pair"], []).append(got == q["answer"])
    singles = [ok for v in pairs.values() for ok in v]
    return {"pair_accuracy": 100 * sum(all(v) for v in pairs.values()) / len(pairs),
            "accuracy": 100 * sum(singles) / len(singles), "pairs": len(pairs), "count": len(singles),
            "unparsed": unparsed}


__all__ = ["SQA_OPTIONS", "scienceqa_letter", "scienceqa_correct", "score_scienceqa", "score_seed", "mmvp_choice",
           "score_mmvp"]
