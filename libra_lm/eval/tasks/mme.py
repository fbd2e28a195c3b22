"""MME: the benchmark folders (MME_Benchmark_release_version/<subtask>/: either images/ and
questions_answers_YN/, or images beside their .txt files; each .txt holds the image's two
"question \\t answer" lines), and the eval tool's per-subtask result files
"image \\t question \\t ground truth \\t prediction" that calculation.py reads.

The question is asked as LLaVA-1.5 asks it (its llava_mme.jsonl, undone again by
convert_answer_to_mme.py): without the benchmark's " Please answer yes or no.", followed by
the prompt of Tab. 6."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from libra_tok.fileio import atomic_write_text

from ..questions import BenchmarkFileError, ImageRef, Question, qid_key, require_file
from ..scoring.mme import COGNITION, PERCEPTION, score_mme
from .base import ScoreOptions

ROOT = "MME_Benchmark_release_version"
MME_RESULTS = "per-subtask <subtask>.txt files of lines 'image \\t question \\t ground truth \\t prediction'"
IMAGE_SUFFIXES = (".jpg", ".png", ".jpeg", ".JPG", ".PNG")
_ASK = " Please answer yes or no."


def _subtask_questions(folder: Path, subtask: str, root: Path) -> list[Question]:
    if (folder / "images").is_dir():
        image_dir, qa_dir = folder / "images", folder / "questions_answers_YN"
    else:
        image_dir = qa_dir = folder
    if not qa_dir.is_dir():
        raise FileNotFoundError(f"MME {subtask}: {qa_dir} does not exist (a subtask folder holds images/ and "
                                "questions_answers_YN/, or the images beside their .txt files)")
    out = []
    for txt in sorted(qa_dir.glob("*.txt")):
        images = [image_dir / (txt.stem + s) for s in IMAGE_SUFFIXES if (image_dir / (txt.stem + s)).is_file()]
        if not images:
            raise FileNotFoundError(f"MME {subtask}: no image {txt.stem}.jpg/.png beside {txt} in {image_dir}")
        image = images[0]
        lines = [line for line in txt.read_text(encoding="utf-8").splitlines() if line.strip()]
        if len(lines) != 2:
            raise BenchmarkFileError(f"{txt}: {len(lines)} lines; an MME question file holds two lines "
                                     "'question \\t yes|no'")
        for k, line in enumerate(lines):
            parts = line.strip().split("\t")
            if len(parts) != 2 or parts[1].strip().lower() not in ("yes", "no"):
                raise BenchmarkFileError(f"{txt}: line {k + 1} is not 'question \\t yes|no'")
            question, answer = parts
            ref = ImageRef(key=str(image), path=image, name=str(image.relative_to(root)))
            out.append(Question(qid=f"{subtask}/{image.name}/{k}", image=ref,
                                text=question.replace(" " + _ASK, "").replace(_ASK, ""), answer=answer,
                                split=subtask, group=image.name, meta={"image": image.name, "question": question}))
    return out


def mme_reader(root: str = ROOT):
    def read(folder: Path) -> list[Question]:
        base = folder / root
        if not base.is_dir():
            raise FileNotFoundError(f"MME: {base} does not exist; unpack MME_Benchmark_release_version there")
        out = []
        for subtask in PERCEPTION + COGNITION:
            if not (base / subtask).is_dir():
                raise FileNotFoundError(f"MME: subtask folder {base / subtask} does not exist")
            out += _subtask_questions(base / subtask, subtask, folder)
        return out

    return read


def mme_rows(questions: Sequence[Question], answers: Mapping[str, str]) -> dict[str, list[tuple[str, ...]]]:
    """The eval tool's rows per subtask; newlines and tabs of an answer become spaces (the
    tool reads one line per question)."""
    rows: dict[str, list[tuple[str, ...]]] = {}
    for q in questions:
        pred = " ".join(answers[qid_key(q.qid)].replace("\t", " ").splitlines())
        rows.setdefault(q.split, []).append((q.meta["image"], q.meta["question"], q.answer, pred))
    return rows


def score_mme_task(questions: Sequence[Question], answers: Mapping[str, str], options: ScoreOptions) -> dict:
    return score_mme(mme_rows(questions, answers))


def write_mme_results(questions: Sequence[Question], answers: Mapping[str, str], folder: Path,
                      options: ScoreOptions) -> list[Path]:
    """<folder>/mme/<subtask>.txt, ready for calculation.py --results_dir."""
    paths = []
    for subtask, rows in mme_rows(questions, answers).items():
        path = folder / "mme" / f"{subtask}.txt"
        atomic_write_text(path, "".join("\t".join(r) + "\n" for r in rows))
        paths.append(path)
    return paths


def read_mme_results(folder: Path) -> dict[str, list[tuple[str, ...]]]:
    """The eval tool's result files of a folder (every subtask file present is read)."""
    if not folder.is_dir():
        raise FileNotFoundError(f"MME results folder {folder} does not exist")
    rows: dict[str, list[tuple[str, ...]]] = {}
    for subtask in PERCEPTION + COGNITION:
        path = folder / f"{subtask}.txt"
        if not path.is_file():
            continue
        lines = require_file(path, "MME results").read_text(encoding="utf-8").split("\n")
        if lines and lines[-1] == "":
            lines.pop()
        for n, line in enumerate(lines, 1):
            parts = line.split("\t")
            if len(parts) != 4:
                raise BenchmarkFileError(f"{path}: line {n} has {len(parts)} tab-separated fields, not 4; expected "
                                         f"{MME_RESULTS}")
            rows.setdefault(subtask, []).append(tuple(parts))
    if not rows:
        raise FileNotFoundError(f"{folder} holds no MME result file; expected {MME_RESULTS}")
    return rows


__all__ = ["ROOT", "MME_RESULTS", "mme_reader", "mme_rows", "score_mme_task", "write_mme_results", "read_mme_results"]
