"""MMBench: choice extraction without a GPT judge, and circular evaluation.

Extraction follows VLMEvalKit's exact-matching path (vlmeval/utils/matching_util.py
`can_infer` = `can_infer_option`, then `can_infer_text`), without the GPT fallback:
- a refusal phrase gives "Z" (a refusal, counted wrong);
- after replacing ".()[],:;!*#{}" by spaces, exactly one option letter among the words, and
  among the last four words, is the answer; no letter but a lone "Z" gives "Z";
- "(correct) answer is X" (A-D) is the answer;
- otherwise the one option whose text (lower case) appears in the answer, when the answer is
  at most twice as long as all option texts together.
Nothing found: unparsed, counted wrong and listed.

Circular evaluation (vlmeval/dataset/utils/multiple_choice.py `mcq_circular_eval`): the
official TSVs hold each question and its copies with rotated options; copy k of question g
has index g + k * 1e6. A question counts as right only if every copy present is right.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")
_SEPARATORS = ".()[],:;!*#{}"
_ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")
COPY_STRIDE = 1_000_000


def _infer_option(answer: str, choices: Mapping[str, str]) -> str | None:
    if "Failed to obtain answer via API" in answer:
        return None
    if any(r in answer for r in REFUSALS):
        return "Z"
    text = answer
    for c in _SEPARATORS:
        text = text.replace(c, " ")
    words = text.split()
    count = sum(c in words for c in choices)
    if count == 1:
        for c in choices:
            if c in words and words.index(c) > len(words) - 5:
                return c
    elif count == 0 and "Z" in words:
        return "Z"
    match = _ANSWER_IS.search(answer)
    if match and match.group(1).upper() in choices:
        return match.group(1).upper()
    return None


def _infer_text(answer: str, choices: Mapping[str, str]) -> str | None:
    answer = answer.lower()
    if len(answer) > 2 * sum(len(str(v)) for v in choices.values()):
        return None
    hits = [k for k, v in choices.items() if str(v).lower() in answer]
    return hits[0] if len(hits) == 1 else None


def extract_choice(answer: str, choices: Mapping[str, str]) -> str | None:
    """The option letter an answer names, "Z" for a refusal, None when none can be found.
    `choices` maps letters ("A".."D") to option texts."""
    answer = str(answer)
    return _infer_option(answer, choices) or _infer_text(answer, choices)


def circular_accuracy(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Rows {"index", "answer" (the right letter), "prediction" (the model's text), "choices",
    and optionally "category", "l2-category"} of every copy answered. Returns the circular
    accuracy (percent of questions whose copies are all right), the plain accuracy over all
    copies, per category circular accuracies, and the unparsed answers."""
    if not rows:
        raise ValueError("no MMBench questions to score")
    groups: dict[int, list[bool]] = {}
    main: dict[int, Mapping[str, Any]] = {}
    unparsed, hits = [], 0
    for row in rows:
        index = int(row["index"])
        letter = extract_choice(row["prediction"], row["choices"])
        if letter is None or letter == "Z":
            unparsed.append({"index": index, "prediction": row["prediction"],
                             "reason": "refusal" if letter == "Z" else "no option found"})
        right = letter is not None and letter == row["answer"]
        hits += right
        g = index % COPY_STRIDE
        groups.setdefault(g, []).append(right)
        if index == g:
            main[g] = row
    orphans = sorted(set(groups) - set(main))
    if orphans:
        raise ValueError(f"{len(orphans)} circular copies have no original question (index % 1e6 = {orphans[0]}); "
                         "the TSV must hold each question with its copies")
    right_groups = {g: all(v) for g, v in groups.items()}
    out: dict[str, Any] = {
        "circular_accuracy": 100 * sum(right_groups.values()) / len(right_groups),
        "vanilla_accuracy": 100 * hits / len(rows),
        "questions": len(right_groups), "count": len(rows),
    }
    for key in ("category", "l2-category"):
        by: dict[str, list[bool]] = {}
        for g, ok in right_groups.items():
            if main[g].get(key) not in (None, ""):
                by.setdefault(str(main[g][key]), []).append(ok)
        if by:
            out[f"per_{key.replace('-', '_')}"] = {k: 100 * sum(v) / len(v) for k, v in sorted(by.items())}
    out["unparsed"] = unparsed
    return out


__all__ = ["REFUSALS", "COPY_STRIDE", "extract_choice", "circular_accuracy"]
