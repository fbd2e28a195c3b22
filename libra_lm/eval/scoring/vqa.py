"""VQA accuracy as the official evaluators compute it, three ways:

- ``official``: the VQA API's evaluator (GT-Vision-Lab/VQA,
  PythonEvaluationTools/vqaEvaluation/vqaEval.py, its last version). Newlines and tabs become
  spaces and both ends are stripped; then, only when the human answers are not all the same
  string, every human answer and the prediction go through the punctuation rule and the
  digit/article/contraction rule. A prediction scores min(#matching others / 3, 1) against
  each leave-one-out subset of the answers (an answer dict is left out with every dict equal
  to it, as the evaluator compares dicts), averaged over the subsets.
- ``always``: the EvalAI / LLaVA-1.5 variant. LLaVA writes the submission file through the
  EvalAI answer processor (llava/eval/m4c_evaluator.py `EvalAIAnswerProcessor`, used by
  scripts/convert_vqav2_for_submission.py): lower case, "," and "?" removed, "'s" split off,
  then the same two rules; the server then applies the official evaluator. So every
  prediction is normalised, whatever the human answers are.
- ``vizwiz``: the VizWiz evaluator (VizWiz VQA API vqaEval.py): the prediction is always
  normalised (with that file's older contraction table, whose apostrophes are mostly "’"),
  the human answers never, and the leave-one-out subsets are by position. "unanswerable" is
  an answer string like any other (its own answer type).

Scores are fractions in [0, 1] per question; the dataset functions report percentages.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from .common import check_complete

RULES = ("official", "always", "vizwiz")

CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}
# The VizWiz evaluator keeps the VQA API's older table: the same entries with "’" for "'",
# except these values and keys, which kept the straight apostrophe.
_STRAIGHT_VALUES = {"aint", "arent", "cant", "couldve", "couldnt", "weve", "wheres", "whove"}
_STRAIGHT_KEYS = {"couldn'tve", "hadn'tve"}
VIZWIZ_CONTRACTIONS = {
    (k if k in _STRAIGHT_KEYS else k.replace("'", "’")): (v if k in _STRAIGHT_VALUES else v.replace("'", "’"))
    for k, v in CONTRACTIONS.items()
}
NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
           "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = ("a", "an", "the")
PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?",
               "!")
# "(?!<=\d)" is a lookahead (the evaluator's typo for a lookbehind): every "." not followed by
# a digit is removed.
PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def process_punctuation(text: str) -> str:
    """The evaluator's punctuation rule: a mark next to a space (or any mark, once the text has
    a digit-comma-digit) is deleted, otherwise replaced by a space; then periods not followed
    by a digit are deleted - at most 32 of them, as the evaluator passes re.UNICODE (32) where
    `Pattern.sub` takes its count."""
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return PERIOD_STRIP.sub("", out, count=re.UNICODE)


def process_digit_article(text: str, contractions: Mapping[str, str] = CONTRACTIONS) -> str:
    """Lower case, number words to digits, articles dropped, contractions restored."""
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(contractions.get(w, w) for w in words)


def normalize_answer(text: str, contractions: Mapping[str, str] = CONTRACTIONS) -> str:
    return process_digit_article(process_punctuation(text), contractions)


def evalai_process(text: str) -> str:
    """The EvalAI answer processor LLaVA applies to every prediction before submission."""
    text = text.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    text = text.replace("\n", " ").replace("\t", " ").strip()
    return normalize_answer(text)


def _clean(text: str) -> str:
    return text.replace("\n", " ").replace("\t", " ").strip()


def _answer_dicts(answers: Sequence[Any]) -> list[dict]:
    """Human answers as dicts (plain strings get their position as answer_id, so that the
    leave-one-out removes exactly one of two equal strings)."""
    out = []
    for i, a in enumerate(answers):
        out.append(dict(a) if isinstance(a, Mapping) else {"answer": str(a), "answer_id": i + 1})
    return out


def vqa_accuracy(prediction: str, answers: Sequence[Any], rule: str = "official") -> float:
    """The score in [0, 1] of one prediction against the human answers (dicts with "answer",
    as in the annotation files, or strings) under `rule` (see the module docstring)."""
    if rule not in RULES:
        raise ValueError(f"VQA rule must be one of {RULES}, got {rule!r}")
    gts = _answer_dicts(answers)
    if not gts:
        raise ValueError("a VQA question needs at least one human answer")
    if rule == "vizwiz":
        res = normalize_answer(_clean(prediction), VIZWIZ_CONTRACTIONS)
        texts = [g["answer"] for g in gts]
        accs = [min(1.0, sum(t == res for j, t in enumerate(texts) if j != i) / 3) for i in range(len(texts))]
        return sum(accs) / len(accs)
    if rule == "always":
        prediction = evalai_process(prediction)
    for g in gts:
        g["answer"] = _clean(g["answer"])
    res = _clean(prediction)
    if len({g["answer"] for g in gts}) > 1:
        for g in gts:
            g["answer"] = normalize_answer(g["answer"])
        res = normalize_answer(res)
    accs = []
    for g in gts:
        others = [o for o in gts if o != g]
        accs.append(min(1.0, sum(o["answer"] == res for o in others) / 3))
    return sum(accs) / len(accs)


def _mean_percent(values: Sequence[float]) -> float:
    return 100.0 * sum(values) / len(values)


def score_vqa(annotations: Mapping[Any, Mapping[str, Any]], predictions: Mapping[Any, str],
              rule: str = "official") -> dict[str, Any]:
    """Dataset VQA score: `annotations` maps each question id to its annotation ("answers",
    and "answer_type" / "question_type" when the file has them); `predictions` maps the same
    ids to answer strings. Returns percentages: overall, per answer type, per question type."""
    check_complete(annotations, predictions, "VQA")
    per_q = {k: vqa_accuracy(predictions[k], ann["answers"], rule) for k, ann in annotations.items()}
    by_answer: dict[str, list[float]] = {}
    by_question: dict[str, list[float]] = {}
    for k, ann in annotations.items():
        if ann.get("answer_type") is not None:
            by_answer.setdefault(str(ann["answer_type"]), []).append(per_q[k])
        if ann.get("question_type") is not None:
            by_question.setdefault(str(ann["question_type"]), []).append(per_q[k])
    out: dict[str, Any] = {"overall": _mean_percent(list(per_q.values())), "count": len(per_q), "rule": rule}
    if by_answer:
        out["per_answer_type"] = {t: _mean_percent(v) for t, v in sorted(by_answer.items())}
    if by_question:
        out["per_question_type"] = {t: _mean_percent(v) for t, v in sorted(by_question.items())}
    return out


__all__ = [
    "RULES", "CONTRACTIONS", "VIZWIZ_CONTRACTIONS", "process_punctuation", "process_digit_article",
    "normalize_answer", "evalai_process", "vqa_accuracy", "score_vqa",
]
