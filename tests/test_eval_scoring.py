"""The official scoring rules on hand-worked cases: VQA answer processing and the leave-one-out
average (and its EvalAI and VizWiz variants), POPE parsing and metrics, MME acc / acc+,
MMBench choice extraction and circular evaluation, ScienceQA / SEED / MMVP / GQA, and the
caption metrics through pycocoevalcap."""

import shutil

import pytest

from libra_lm.eval.scoring import captions as cap
from libra_lm.eval.scoring.choice import mmvp_choice, scienceqa_correct, scienceqa_letter, score_mmvp, score_seed
from libra_lm.eval.scoring.exact import score_gqa
from libra_lm.eval.scoring.mmbench import circular_accuracy, extract_choice
from libra_lm.eval.scoring.mme import PERCEPTION, parse_mme, score_mme, score_subtask
from libra_lm.eval.scoring.pope import parse_yes_no, pope_metrics, score_pope
from libra_lm.eval.scoring.vqa import (
    evalai_process,
    process_digit_article,
    process_punctuation,
    score_vqa,
    vqa_accuracy,
)


def human(*answers):
    """Ten human answers as the annotation files hold them (answer ids 1..10)."""
    return [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1} for i, a in enumerate(answers)]


# ---- VQA: answer processing --------------------------------------------------------------------------
@pytest.mark.parametrize("text, expected", [
    ("yes.", "yes"),                 # a period not followed by a digit is removed
    ("3.5", "3.5"),                  # ... one followed by a digit stays
    ("red-ish", "red ish"),          # a mark with no space beside it becomes a space
    ("rock - paper", "rock  paper"),  # a mark next to a space is deleted
    ("1,000 cats", "1000 cats"),     # digit,digit anywhere: every mark is deleted
    ("what?!", "what  "),
    ("it's", "it's"),                # apostrophes are not punctuation
])
def test_punctuation_rule(text, expected):
    assert process_punctuation(text) == expected


def test_period_strip_stops_after_32_periods():
    # vqaEval.py passes re.UNICODE (32) where re.sub takes its count
    assert process_punctuation("." * 40) == "." * 8


@pytest.mark.parametrize("text, expected", [
    ("The Two Dogs", "2 dogs"), ("a dont", "don't"), ("none", "0"), ("an apple and the ten", "apple and 10"),
    ("Im", "im"),  # the evaluator's capitalised keys never match after lower-casing
])
def test_digit_article_rule(text, expected):
    assert process_digit_article(text) == expected


def test_evalai_processor_lowercases_and_splits_possessives():
    assert evalai_process("The Dog's Ball, Right?") == "dog 's ball right"


# ---- VQA: the leave-one-out average ------------------------------------------------------------------
@pytest.mark.parametrize("matches, expected", [
    (0, 0.0),
    (1, 0.3),   # 1 subset of 10 lacks the match (0/3), 9 hold it (1/3): 9/30
    (2, 0.6),   # 2 subsets hold one match (1/3), 8 hold two (2/3): (2/3 + 16/3) / 10
    (3, 0.9),   # 3 subsets hold two (2/3), 7 hold three (1): (2 + 7) / 10
    (4, 1.0),
])
def test_leave_one_out_average(matches, expected):
    answers = human(*(["2"] * matches + ["3"] * (10 - matches)))
    assert vqa_accuracy("2", answers) == pytest.approx(expected)


def test_normalisation_only_when_the_humans_disagree():
    same = human(*["Two"] * 10)
    assert vqa_accuracy("Two", same) == 1.0
    assert vqa_accuracy("two", same) == 0.0  # ten equal answers: nothing is normalised
    differ = human(*["Two"] * 9, "three")
    assert vqa_accuracy("two", differ) == 1.0  # "two" and "Two" both become "2"
    # The EvalAI / LLaVA variant normalises the prediction whatever the answers are.
    assert vqa_accuracy("Two", same, "always") == 0.0
    assert vqa_accuracy("two.", differ, "always") == 1.0


def test_equal_answer_dicts_leave_together():
    # Without answer ids, equal dicts are equal: leaving one out removes all of them (vqaEval compares dicts).
    answers = [{"answer": "cat"}] * 3 + [{"answer": "dog"}] * 7
    assert vqa_accuracy("cat", answers) == pytest.approx(0.7)  # 7 subsets with 3 cats: 1; 3 subsets with none: 0
    assert vqa_accuracy("cat", answers, "vizwiz") == pytest.approx(0.9)  # by position: 3 subsets keep 2 cats


def test_vizwiz_rule():
    unanswerable = [{"answer": "unanswerable", "answer_confidence": "yes"}] * 10
    assert vqa_accuracy("Unanswerable", unanswerable, "vizwiz") == 1.0  # the prediction is always normalised
    assert vqa_accuracy("Unanswerable", unanswerable, "official") == 0.0  # equal humans: no normalisation
    # VizWiz keeps the older contraction table (curly apostrophes), and never touches the humans' answers.
    curly = [{"answer": "don’t"}] * 3 + [{"answer": "x"}] * 7
    assert vqa_accuracy("dont", curly, "vizwiz") == pytest.approx(0.9)  # by position: 7 subsets with 3, 3 with 2
    assert vqa_accuracy("dont", curly, "official") == 0.0


def test_score_vqa_reports_answer_types_and_refuses_missing_answers():
    anns = {1: {"answers": human(*["yes"] * 10), "answer_type": "yes/no", "question_type": "is"},
            2: {"answers": human(*["2"] * 10), "answer_type": "number", "question_type": "how many"}}
    out = score_vqa(anns, {1: "yes", 2: "3"})
    assert out["overall"] == 50.0 and out["per_answer_type"] == {"number": 0.0, "yes/no": 100.0}
    with pytest.raises(ValueError, match="1 VQA question"):
        score_vqa(anns, {1: "yes"})


# ---- POPE ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, parsed", [
    ("Yes, there is a dog.", "yes"), ("No.", "no"), ("There is not a dog", "no"), ("yes. no", "yes"),
    ("Not at all", "yes"),   # "Not" is not one of evaluate.py's words
    ("no,there", "yes"),     # commas are removed before splitting: "nothere"
    ("nope", "yes"),
])
def test_pope_parsing(text, parsed):
    assert parse_yes_no(text) == parsed


def test_pope_metrics_by_hand():
    m = pope_metrics(["yes", "yes", "yes", "no", "no"], ["yes", "yes", "no", "yes", "no"])
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (2, 1, 1, 1)
    assert m["precision"] == pytest.approx(200 / 3) and m["recall"] == pytest.approx(200 / 3)
    assert m["f1"] == pytest.approx(200 / 3) and m["accuracy"] == 60.0 and m["yes_ratio"] == 60.0
    never = pope_metrics(["yes", "no"], ["no", "no"])
    assert never["precision"] == 0.0 and never["f1"] == 0.0  # no "yes" at all: 0, not a division by zero


def test_pope_splits_and_their_mean():
    qs = {"r/1": {"label": "yes", "split": "random"}, "r/2": {"label": "no", "split": "random"},
          "a/1": {"label": "yes", "split": "adversarial"}, "a/2": {"label": "no", "split": "adversarial"}}
    out = score_pope(qs, {"r/1": "Yes", "r/2": "No", "a/1": "Yes", "a/2": "Yes, there is"})
    assert out["splits"]["random"]["f1"] == 100.0
    assert out["splits"]["adversarial"]["f1"] == pytest.approx(200 / 3)  # P 1/2, R 1
    assert out["f1"] == pytest.approx((100 + 200 / 3) / 2)


# ---- MME -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred, parsed", [
    ("Yes", "yes"), ("yes, there is", "yes"), ("No", "no"), ("not sure", "no"), ("nyes", "yes"),
    ("The answer is yes", "other"), ("", "other"),
])
def test_mme_parsing(pred, parsed):
    assert parse_mme(pred) == parsed


def test_mme_acc_plus_on_pairs():
    rows = [("1.jpg", "q", "Yes", "yes"), ("1.jpg", "q", "No", "no"),       # both right
            ("2.jpg", "q", "Yes", "yes"), ("2.jpg", "q", "No", "yes"),      # one right
            ("3.jpg", "q", "Yes", "maybe"), ("3.jpg", "q", "No", "No.")]    # one right, one "other"
    out = score_subtask(rows)
    assert out["acc"] == pytest.approx(400 / 6) and out["acc_plus"] == pytest.approx(100 / 3)
    assert out["score"] == pytest.approx(100.0) and out["other"] == 1
    with pytest.raises(ValueError, match="pairs"):
        score_subtask(rows[:3])


def test_mme_perception_sums_its_subtasks_and_needs_them_all():
    perfect = [("1.jpg", "q", "Yes", "Yes"), ("1.jpg", "q", "No", "No")]
    out = score_mme({name: perfect for name in PERCEPTION})
    assert out["perception"] == 2000.0 and "cognition" not in out
    with pytest.raises(ValueError, match="missing"):
        score_mme({name: perfect for name in PERCEPTION[:3]})


# ---- MMBench -------------------------------------------------------------------------------------------
CHOICES = {"A": "a black cat", "B": "a brown dog", "C": "a red bird"}


@pytest.mark.parametrize("answer, letter", [
    ("B", "B"), ("(C)", "C"), ("The answer is C.", "C"), ("B. a brown dog", "B"),
    ("It is a brown dog", "B"),                       # the one option text inside the answer
    ("A cat sits on the mat near the window today", None),  # "A" is the first of 9 words: not an answer
    ("Sorry, I can't help with images of people yet.", "Z"),
    ("no idea at all", None),
])
def test_choice_extraction(answer, letter):
    assert extract_choice(answer, CHOICES) == letter


def test_circular_evaluation():
    rows = []
    for c, pred in enumerate(["A", "B", "C"]):  # question 0: every rotated copy right
        rows.append({"index": c * 1_000_000, "answer": pred, "prediction": pred, "choices": CHOICES,
                     "category": "x"})
    for c, pred in enumerate(["A", "A", "nothing"]):  # question 1: one copy wrong, one unparsed
        rows.append({"index": 1 + c * 1_000_000, "answer": "ABC"[c], "prediction": pred, "choices": CHOICES,
                     "category": "y"})
    out = circular_accuracy(rows)
    assert out["circular_accuracy"] == 50.0 and out["vanilla_accuracy"] == pytest.approx(400 / 6)
    assert out["per_category"] == {"x": 100.0, "y": 0.0}
    assert [u["index"] for u in out["unparsed"]] == [2_000_001]


# ---- ScienceQA, SEED, MMVP, GQA -----------------------------------------------------------------------
@pytest.mark.parametrize("pred, letter", [
    ("B", "B"), ("B. fire", "B"), ("The answer is A.", "A"), ("The answer is A. The answer is B.", "FAILED"),
    ("b", "FAILED"),
])
def test_scienceqa_letters(pred, letter):
    assert scienceqa_letter(pred) == letter


def test_scienceqa_letter_beyond_the_choices_is_wrong():
    assert scienceqa_correct("B", 3, 1) and not scienceqa_correct("E", 3, 4)


def test_seed_is_exact_letter_match():
    out = score_seed({"1": {"answer": "A", "question_type": "t"}, "2": {"answer": "B", "question_type": "t"}},
                     {"1": "A", "2": "B."})
    assert out["accuracy"] == 50.0


@pytest.mark.parametrize("answer, choice", [
    ("(a) Open", "a"), ("b", "b"), ("Closed.", "b"), ("(a) or (b)", None), ("maybe", None),
])
def test_mmvp_choice(answer, choice):
    assert mmvp_choice(answer, ["Open", "Closed"]) == choice


def test_mmvp_pair_accuracy():
    qs = {k: {"options": ["Open", "Closed"], "answer": a, "pair": k // 2} for k, a in enumerate("abab")}
    out = score_mmvp(qs, {0: "(a)", 1: "Closed", 2: "(a)", 3: "(a)"})
    assert out["pair_accuracy"] == 50.0 and out["accuracy"] == 75.0


def test_gqa_exact_match_after_llava_conversion():
    out = score_gqa({"1": {"answer": "yes"}, "2": {"answer": "left"}}, {"1": "Yes.", "2": "on the left"})
    assert out["accuracy"] == 50.0


# ---- captions ------------------------------------------------------------------------------------------
needs_java = pytest.mark.skipif(shutil.which("java") is None, reason="pycocoevalcap needs java")


@pytest.mark.slow
@needs_java
def test_caption_metrics_by_hand():
    pytest.importorskip("pycocoevalcap")
    with cap.shared_meteor():
        same = cap.score_captions({1: ["a dog runs"], 2: ["a cat sleeps"]}, {1: "a dog runs", 2: "a cat sleeps"})
        one_word_off = cap.score_captions({1: ["a dog sits"], 2: ["a cat sleeps"]},
                                          {1: "a dog runs", 2: "a cat sleeps"})
    # Identical: BLEU-1, ROUGE-L, METEOR 100; CIDEr-D = 10 x mean over n = 1..4 of the cosine, and three
    # words have no 4-grams: 10 x 3/4.
    assert same["Bleu_1"] == pytest.approx(100) and same["ROUGE_L"] == pytest.approx(100)
    assert same["METEOR"] == pytest.approx(100) and same["CIDEr"] == pytest.approx(750)
    # Image 1: 2 of 3 words, 1 of 2 bigrams: corpus BLEU-1 = 5/6, BLEU-2 = sqrt(5/6 * 3/4); CIDEr of image 1 is
    # 10 x (1/2 + 1/2 + 0 + 0) / 4 (the shared "a" has idf 0), so the mean is (2.5 + 7.5) / 2.
    assert one_word_off["Bleu_1"] == pytest.approx(500 / 6)
    assert one_word_off["Bleu_2"] == pytest.approx(100 * (5 / 6 * 3 / 4) ** 0.5)
    assert one_word_off["CIDEr"] == pytest.approx(500)


def test_caption_metrics_name_the_missing_java(monkeypatch):
    pytest.importorskip("pycocoevalcap")
    monkeypatch.setattr(cap.shutil, "which", lambda name: None)
    with pytest.raises(cap.JavaNotFoundError, match=r"java not found.*apt-get install default-jre-headless"):
        cap.score_captions({1: ["a dog"]}, {1: "a dog"})
