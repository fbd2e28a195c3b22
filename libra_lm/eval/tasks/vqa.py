"""Open-ended VQA: VQAv2 and OK-VQA (the VQA API's JSON files), VizWiz (its JSON lists), GQA
(its balanced questions JSON): readers of the official files, the scorers' adapters and the
EvalAI submission files (LLaVA's scripts/convert_vqav2_for_submission.py and
convert_vizwiz_for_submission.py write the same JSON)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from libra_tok.fileio import atomic_write_json

from ..questions import (
    BenchmarkFileError,
    Question,
    image_file,
    qid_key,
    read_json,
    require_file,
    require_keys,
)
from ..scoring.exact import score_gqa
from ..scoring.vqa import evalai_process, score_vqa
from .base import ScoreOptions

VQA_QUESTIONS = 'the VQA API questions JSON {"questions": [{"question_id", "image_id", "question"}, ...]}'
VQA_ANNOTATIONS = ('the VQA API annotations JSON {"annotations": [{"question_id", "answers": [{"answer"}, ...], '
                   '"answer_type", "question_type"}, ...]}')
VQA_RESULTS = 'a VQA results JSON [{"question_id", "answer"}, ...]'
VIZWIZ_FILE = 'a VizWiz JSON list [{"image", "question", "answers" (val/train), "answer_type"}, ...]'
VIZWIZ_RESULTS = 'a VizWiz results JSON [{"image", "answer"}, ...]'
GQA_QUESTIONS = 'a GQA questions JSON {"<question id>": {"imageId", "question", "answer", "types"}, ...}'
GQA_PREDICTIONS = 'GQA predictions JSON [{"questionId", "prediction"}, ...]'


# ---- VQAv2 / OK-VQA ------------------------------------------------------------------------------
def read_vqa_questions(path: Path) -> list[dict[str, Any]]:
    data = read_json(path, VQA_QUESTIONS)
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise BenchmarkFileError(f"{path} has no \"questions\" list; expected {VQA_QUESTIONS}")
    for i, q in enumerate(data["questions"]):
        require_keys(q, ("question_id", "image_id", "question"), path, f"question {i}", VQA_QUESTIONS)
    return data["questions"]


def read_vqa_annotations(path: Path) -> dict[str, dict[str, Any]]:
    """Annotations by qid_key(question_id)."""
    data = read_json(path, VQA_ANNOTATIONS)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise BenchmarkFileError(f"{path} has no \"annotations\" list; expected {VQA_ANNOTATIONS}")
    out = {}
    for i, ann in enumerate(data["annotations"]):
        require_keys(ann, ("question_id", "answers"), path, f"annotation {i}", VQA_ANNOTATIONS)
        if not isinstance(ann["answers"], list) or not all(isinstance(a, dict) and "answer" in a
                                                           for a in ann["answers"]):
            raise BenchmarkFileError(f"{path}: annotation {i} has answers that are not [{{\"answer\"}}, ...]; "
                                     f"expected {VQA_ANNOTATIONS}")
        out[qid_key(ann["question_id"])] = ann
    return out


def read_vqa_results(path: Path) -> dict[str, str]:
    """[{"question_id", "answer"}] -> answers by qid_key; duplicates are an error."""
    return _read_results(path, "question_id", "answer", VQA_RESULTS)


def _read_results(path: Path, id_field: str, answer_field: str, expected: str) -> dict[str, str]:
    data = read_json(path, expected)
    if not isinstance(data, list):
        raise BenchmarkFileError(f"{path} is not a JSON list; expected {expected}")
    out: dict[str, str] = {}
    for i, row in enumerate(data):
        require_keys(row, (id_field, answer_field), path, f"entry {i}", expected)
        key = qid_key(row[id_field])
        if key in out:
            raise BenchmarkFileError(f"{path}: {id_field} {row[id_field]!r} is answered twice")
        out[key] = str(row[answer_field])
    return out


def vqa_reader(questions_file: str, annotations_file: str | None, image_dir: str, image_prefix: str):
    """Reader of a VQA-API split: questions (and annotations when public) under the task
    folder, images `{image_dir}/{image_prefix}{image_id:012d}.jpg` (the COCO names)."""

    def read(folder: Path) -> list[Question]:
        questions = read_vqa_questions(folder / questions_file)
        annotations = None
        if annotations_file is not None:
            annotations = read_vqa_annotations(require_file(folder / annotations_file, "VQA annotations"))
        out = []
        for q in questions:
            ann = None
            if annotations is not None:
                ann = annotations.get(qid_key(q["question_id"]))
                if ann is None:
                    raise BenchmarkFileError(f"{folder / annotations_file} has no annotation for question "
                                             f"{q['question_id']} of {folder / questions_file}")
            name = f"{image_dir}/{image_prefix}{int(q['image_id']):012d}.jpg"
            out.append(Question(qid=q["question_id"], image=image_file(folder, name), text=q["question"],
                                answer=ann, meta={"folder": folder}))
        return out

    return read


def score_vqa_task(questions: Sequence[Question], answers: Mapping[str, str], options: ScoreOptions) -> dict:
    annotations = {qid_key(q.qid): q.answer for q in questions}
    return score_vqa(annotations, dict(answers), options.normalize)


def write_vqa_submission(name: str, all_questions: str | None = None):
    """EvalAI's VQA results JSON [{"question_id", "answer"}] (LLaVA passes every answer through
    the EvalAI processor first: --normalize always). The test-dev phase takes results for the
    whole test set: when `all_questions` (the test2015 questions file) is in the task folder,
    its other questions get an empty answer, as LLaVA's convert_vqav2_for_submission.py writes."""

    def write(questions: Sequence[Question], answers: Mapping[str, str], folder: Path,
              options: ScoreOptions) -> list[Path]:
        fix = evalai_process if options.normalize == "always" else (lambda s: s)
        rows = [{"question_id": q.qid, "answer": fix(answers[qid_key(q.qid)])} for q in questions]
        full = questions[0].meta["folder"] / all_questions if all_questions and questions else None
        if full is not None and full.is_file():
            answered = {r["question_id"] for r in rows}
            rows += [{"question_id": q["question_id"], "answer": ""} for q in read_vqa_questions(full)
                     if q["question_id"] not in answered]
        path = folder / name
        atomic_write_json(path, rows)
        return [path]

    return write


# ---- VizWiz --------------------------------------------------------------------------------------
def read_vizwiz(path: Path, with_answers: bool) -> list[dict[str, Any]]:
    data = read_json(path, VIZWIZ_FILE)
    if not isinstance(data, list):
        raise BenchmarkFileError(f"{path} is not a JSON list; expected {VIZWIZ_FILE}")
    keys = ("image", "question", "answers") if with_answers else ("image", "question")
    for i, row in enumerate(data):
        require_keys(row, keys, path, f"entry {i}", VIZWIZ_FILE)
    return data


def vizwiz_reader(file: str, image_dir: str, with_answers: bool):
    def read(folder: Path) -> list[Question]:
        rows = read_vizwiz(folder / file, with_answers)
        return [Question(qid=r["image"], image=image_file(folder, f"{image_dir}/{r['image']}"), text=r["question"],
                         answer={"answers": r["answers"], "answer_type": r.get("answer_type")} if with_answers
                         else None) for r in rows]

    return read


def score_vizwiz_task(questions: Sequence[Question], answers: Mapping[str, str], options: ScoreOptions) -> dict:
    return score_vqa({qid_key(q.qid): q.answer for q in questions}, dict(answers), "vizwiz")


def read_vizwiz_results(path: Path) -> dict[str, str]:
    return _read_results(path, "image", "answer", VIZWIZ_RESULTS)


def write_vizwiz_submission(questions: Sequence[Question], answers: Mapping[str, str], folder: Path,
                            options: ScoreOptions) -> list[Path]:
    """The VizWiz EvalAI JSON [{"image", "answer"}], answers through the EvalAI processor as
    LLaVA's convert_vizwiz_for_submission.py writes them."""
    path = folder / "vizwiz_test.json"
    atomic_write_json(path, [{"image": q.qid, "answer": evalai_process(answers[qid_key(q.qid)])} for q in questions])
    return [path]


# ---- GQA -----------------------------------------------------------------------------------------
def read_gqa_questions(path: Path) -> dict[str, dict[str, Any]]:
    data = read_json(path, GQA_QUESTIONS)
    if not isinstance(data, dict):
        raise BenchmarkFileError(f"{path} is not a JSON object; expected {GQA_QUESTIONS}")
    for qid, q in data.items():
        require_keys(q, ("imageId", "question", "answer"), path, f"question {qid}", GQA_QUESTIONS)
    return data


def gqa_reader(file: str, image_dir: str):
    def read(folder: Path) -> list[Question]:
        data = read_gqa_questions(folder / file)
        return [Question(qid=str(qid), image=image_file(folder, f"{image_dir}/{q['imageId']}.jpg"), text=q["question"],
                         answer={"answer": q["answer"], "types": q.get("types") or {}}) for qid, q in data.items()]

    return read


def score_gqa_task(questions: Sequence[Question], answers: Mapping[str, str], options: ScoreOptions) -> dict:
    return score_gqa({qid_key(q.qid): q.answer for q in questions}, dict(answers))


def read_gqa_predictions(path: Path) -> dict[str, str]:
    """GQA's predictions file [{"questionId", "prediction"}] by qid_key of the string id."""
    raw = _read_results(path, "questionId", "prediction", GQA_PREDICTIONS)
    return {qid_key(str(json.loads(k))): v for k, v in raw.items()}


__all__ = [
    "VQA_QUESTIONS", "VQA_ANNOTATIONS", "VQA_RESULTS", "VIZWIZ_FILE", "VIZWIZ_RESULTS", "GQA_QUESTIONS",
    "GQA_PREDICTIONS", "read_vqa_questions", "read_vqa_annotations", "read_vqa_results", "vqa_reader",
    "score_vqa_task", "write_vqa_submission", "read_vizwiz", "vizwiz_reader", "score_vizwiz_task",
    "read_vizwiz_results", "write_vizwiz_submission", "read_gqa_questions", "gqa_reader", "score_gqa_task",
    "read_gqa_predictions",
]
