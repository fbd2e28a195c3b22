"""Multiple-choice benchmarks: ScienceQA (IMG test), SEED-Bench (image), MMBench / MMBench-CN
(the official TSVs with circular copies), MMVP (its CSV), and MM-Vet's answers file (open
questions graded by GPT-4 elsewhere)."""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from libra_tok.fileio import atomic_write_json, atomic_write_text

from ..questions import (
    BenchmarkFileError,
    ImageRef,
    Question,
    image_file,
    qid_key,
    read_json,
    read_table,
    require_keys,
)
from ..scoring.choice import score_mmvp, score_scienceqa, score_seed
from ..scoring.mmbench import COPY_STRIDE, circular_accuracy
from .base import ScoreOptions

SQA_FORMAT = ('ScienceQA problems.json {"<pid>": {"question", "choices", "answer", "hint", "image", ...}} and '
              'pid_splits.json {"test": [pids]}')
SEED_FORMAT = ('SEED-Bench.json {"questions": [{"question_id", "data_id", "data_type", "question", "choice_a", ..., '
               '"choice_d", "answer", "question_type_id"}], "question_type": {name: id}}')
MMBENCH_FORMAT = "an MMBench TSV with columns index, question, hint, A, B, C, D, answer (dev), image (base64), ..."
MMVP_FORMAT = 'MMVP Questions.csv with columns "Index", "Question", "Options" ("(a) ... (b) ..."), "Correct Answer"'
MMVET_FORMAT = 'MM-Vet mm-vet.json {"v1_0": {"imagename", "question", "answer", "capability"}, ...}'


# ---- ScienceQA -----------------------------------------------------------------------------------
def scienceqa_reader(split: str = "test"):
    """The IMG subset of a split: problems with an image, images/{split}/{pid}/{image}."""

    def read(folder: Path) -> list[Question]:
        problems = read_json(folder / "problems.json", SQA_FORMAT)
        splits = read_json(folder / "pid_splits.json", SQA_FORMAT)
        if not isinstance(problems, dict) or not isinstance(splits, dict) or split not in splits:
            raise BenchmarkFileError(f"{folder}: problems.json / pid_splits.json (with a {split!r} list) expected; "
                                     f"expected {SQA_FORMAT}")
        out = []
        for pid in splits[split]:
            prob = problems.get(pid)
            if prob is None:
                raise BenchmarkFileError(f"{folder / 'problems.json'} has no problem {pid} of pid_splits.json")
            require_keys(prob, ("question", "choices", "answer", "image"), folder / "problems.json", f"problem {pid}",
                         SQA_FORMAT)
            if not prob["image"]:
                continue  # Libra reports the IMG subset
            out.append(Question(qid=pid, image=image_file(folder, f"images/{split}/{pid}/{prob['image']}"),
                                text=prob["question"], options=[str(c) for c in prob["choices"]],
                                hint=prob.get("hint") or None,
                                answer={"choices": prob["choices"], "answer": int(prob["answer"])}))
        return out

    return read


def score_scienceqa_task(questions: Sequence[Question], answers: Mapping[str, str], options: ScoreOptions) -> dict:
    return score_scienceqa({qid_key(q.qid): q.answer for q in questions}, dict(answers))


# ---- SEED-Bench ----------------------------------------------------------------------------------
def read_seed(path: Path) -> tuple[list[dict[str, Any]], dict[Any, str]]:
    data = read_json(path, SEED_FORMAT)
    if not isinstance(data, dict) or not isinstance(data.get("questions"), list):
        raise BenchmarkFileError(f"{path} has no \"questions\" list; expected {SEED_FORMAT}")
    names = {v: k for k, v in (data.get("question_type") or {}).items()}
    keys = ("question_id", "data_id", "data_type", "question", "choice_a", "choice_b", "choice_c", "choice_d")
    for i, q in enumerate(data["questions"]):
        require_keys(q, keys, path, f"question {i}", SEED_FORMAT)
    return data["questions"], names


def seed_reader(file: str = "SEED-Bench.json", image_dir: str = "SEED-Bench-image"):
    def read(folder: Path) -> list[Question]:
        rows, names = read_seed(folder / file)
        return [Question(qid=r["question_id"], image=image_file(folder, f"{image_dir}/{r['data_id']}"),
                         text=r["question"], options=[r[f"choice_{c}"] for c in "abcd"],
                         answer={"answer": r.get("answer"),
                                 "question_type": names.get(r.get("question_type_id"), r.get("question_type_id"))})
                for r in rows if r["data_type"] == "image"]

    return read


def score_seed_task(questions: Sequence[Question], answers: Mapping[str, str], options: ScoreOptions) -> dict:
    return score_seed({qid_key(q.qid): q.answer for q in questions}, dict(answers))


# ---- MMBench -------------------------------------------------------------------------------------
def _missing(value: Any) -> bool:
    """LLaVA's model_vqa_mmbench.py `is_none`: empty cells, "nan" and "none" end the options."""
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and value.strip().lower() in ("", "nan", "none")


def read_mmbench(path: Path) -> list[dict[str, str]]:
    rows = read_table(path, MMBENCH_FORMAT, delimiter="\t")
    for i, row in enumerate(rows):
        require_keys(row, ("index", "question", "A", "B", "image"), path, f"row {i + 2}", MMBENCH_FORMAT)
    return rows


def _decode_base64(text: str, path: Path, where: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BenchmarkFileError(f"{path}: {where}: the image column is not base64; "
                                 f"expected {MMBENCH_FORMAT}") from None


def mmbench_reader(file: str):
    """Questions of an MMBench TSV: options up to the first empty one, the hint, the image
    decoded from base64 (a short number in the image column refers to another row's image,
    as VLMEvalKit writes repeated images)."""

    def read(folder: Path) -> list[Question]:
        path = folder / file
        rows = read_mmbench(path)
        by_index = {row["index"]: row for row in rows}
        images: dict[str, ImageRef] = {}
        out = []
        for n, row in enumerate(rows):
            where = f"row {n + 2} (index {row['index']})"
            try:
                index = int(row["index"])
            except ValueError:
                raise BenchmarkFileError(f"{path}: {where}: index is not an integer; "
                                         f"expected {MMBENCH_FORMAT}") from None
            b64 = row["image"]
            if len(b64) <= 64 and b64.isdigit() and b64 in by_index:
                b64 = by_index[b64]["image"]
            digest = hashlib.sha1(b64.encode()).hexdigest()
            if digest not in images:
                images[digest] = ImageRef(key=f"{path}#{digest}", data=_decode_base64(b64, path, where))
            options = []
            for letter in "ABCDEFGHI":
                if letter not in row or _missing(row[letter]):
                    break
                options.append(row[letter])
            answer = None if _missing(row.get("answer")) else row["answer"].strip()
            out.append(Question(
                qid=index, image=images[digest], text=row["question"], options=options,
                hint=None if _missing(row.get("hint")) else row["hint"], answer=answer,
                group=index % COPY_STRIDE,
                meta={"row": {k: v for k, v in row.items() if k != "image"},
                      "choices": dict(zip("ABCDEFGHI", options, strict=False))}))
        return out

    return read


def score_mmbench_task(questions: Sequence[Question], answers: Mapping[str, str], options: ScoreOptions) -> dict:
    unknown = [q.qid for q in questions if q.answer is None]
    if unknown:
        raise ValueError(f"MMBench questions without an answer column (e.g. index {unknown[0]}): a test split is "
                         "scored by the MMBench server; submit the TSV the harness writes")
    return circular_accuracy([
        {"index": q.qid, "answer": q.answer, "prediction": answers[qid_key(q.qid)], "choices": q.meta["choices"],
         "category": q.meta["row"].get("category"), "l2-category": q.meta["row"].get("l2-category")}
        for q in questions])


DROPPED_COLUMNS = ("hint", "category", "source", "image", "comment", "l2-category")


def write_mmbench_submission(name: str):
    """The submission table of LLaVA's scripts/convert_mmbench_for_submission.py: the TSV's
    columns without hint, category, source, image, comment, l2-category, and "prediction"
    inserted as the seventh column, as a TSV (the MMBench server takes the same table as xlsx:
    open it in a spreadsheet program and save it as xlsx)."""

    def write(questions: Sequence[Question], answers: Mapping[str, str], folder: Path,
              options: ScoreOptions) -> list[Path]:
        columns = [c for c in questions[0].meta["row"] if c not in DROPPED_COLUMNS]
        columns.insert(min(6, len(columns)), "prediction")
        lines = ["\t".join(columns)]
        for q in questions:
            row = dict(q.meta["row"], prediction=answers[qid_key(q.qid)])
            lines.append("\t".join(_tsv_cell(row.get(c, "")) for c in columns))
        path = folder / name
        atomic_write_text(path, "\n".join(lines) + "\n")
        return [path]

    return write


def _tsv_cell(value: Any) -> str:
    return str(value).replace("\t", " ").replace("\r", " ").replace("\n", " ")


# ---- MMVP ----------------------------------------------------------------------------------------
_MMVP_OPTION = re.compile(r"\(([a-z])\)\s*(.*?)\s*(?=\([a-z]\)|$)", re.IGNORECASE | re.DOTALL)


def parse_mmvp_options(text: str) -> list[str]:
    """"(a) Open (b) Closed" -> ["Open", "Closed"]."""
    return [m.group(2).strip() for m in _MMVP_OPTION.finditer(text)]


def mmvp_reader(file: str = "Questions.csv", image_dir: str = "MMVP Images"):
    """Rows of Questions.csv; image {Index}.jpg; the prompt is "{Question} {Options}" as the
    official scripts/evaluate_mllm.py writes it; rows 2k-1 and 2k form a pair."""

    def read(folder: Path) -> list[Question]:
        path = folder / file
        rows = read_table(path, MMVP_FORMAT)
        out = []
        for n, row in enumerate(rows):
            require_keys(row, ("Index", "Question", "Options", "Correct Answer"), path, f"row {n + 2}", MMVP_FORMAT)
            options = parse_mmvp_options(row["Options"])
            answer = re.sub(r"[^a-z]", "", row["Correct Answer"].lower())
            if len(options) < 2 or answer not in "abcdefghij"[:len(options)] or not answer:
                raise BenchmarkFileError(f"{path}: row {n + 2}: options {row['Options']!r} / answer "
                                         f"{row['Correct Answer']!r} are not '(a) ... (b) ...' / '(a)'; expected "
                                         f"{MMVP_FORMAT}")
            index = int(row["Index"])
            out.append(Question(qid=index, image=image_file(folder, f"{image_dir}/{index}.jpg"),
                                text=f"{row['Question']} {row['Options']}", group=(index - 1) // 2,
                                answer={"options": options, "answer": answer, "pair": (index - 1) // 2}))
        return out

    return read


def score_mmvp_task(questions: Sequence[Question], answers: Mapping[str, str], options: ScoreOptions) -> dict:
    return score_mmvp({qid_key(q.qid): q.answer for q in questions}, dict(answers))


# ---- MM-Vet --------------------------------------------------------------------------------------
def mmvet_reader(file: str = "mm-vet.json", image_dir: str = "images"):
    def read(folder: Path) -> list[Question]:
        path = folder / file
        data = read_json(path, MMVET_FORMAT)
        if not isinstance(data, dict):
            raise BenchmarkFileError(f"{path} is not a JSON object; expected {MMVET_FORMAT}")
        out = []
        for qid, q in data.items():
            require_keys(q, ("imagename", "question"), path, f"question {qid}", MMVET_FORMAT)
            out.append(Question(qid=qid, image=image_file(folder, f"{image_dir}/{q['imagename']}"), text=q["question"]))
        return out

    return read


def write_mmvet_answers(questions: Sequence[Question], answers: Mapping[str, str], folder: Path,
                        options: ScoreOptions) -> list[Path]:
    """MM-Vet's results format {"v1_0": answer, ...} for its GPT-4 grader (LLaVA's
    scripts/convert_mmvet_for_eval.py)."""
    path = folder / "mmvet_results.json"
    atomic_write_json(path, {q.qid: answers[qid_key(q.qid)] for q in questions})
    return [path]


__all__ = [
    "SQA_FORMAT", "SEED_FORMAT", "MMBENCH_FORMAT", "MMVP_FORMAT", "MMVET_FORMAT", "scienceqa_reader",
    "score_scienceqa_task", "read_seed", "seed_reader", "score_seed_task", "read_mmbench", "mmbench_reader",
    "score_mmbench_task", "write_mmbench_submission", "parse_mmvp_options", "mmvp_reader", "score_mmvp_task",
    "mmvet_reader", "write_mmvet_answers",
]
