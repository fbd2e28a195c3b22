"""Captioning (COCO and Flickr30K karpathy test, NoCaps val): COCO-format caption
annotations {"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]};
the answers are written as a COCO results file [{"image_id", "caption"}] and scored with
pycocoevalcap."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from libra_tok.fileio import atomic_write_json

from ..questions import BenchmarkFileError, Question, image_file, qid_key, read_json, require_keys
from ..scoring.captions import score_captions
from .base import ScoreOptions

COCO_CAPTIONS = ('COCO-format caption annotations {"images": [{"id", "file_name"}, ...], '
                 '"annotations": [{"image_id", "caption"}, ...]}')
COCO_RESULTS = 'a COCO caption results JSON [{"image_id", "caption"}, ...]'


def read_coco_captions(path: Path) -> tuple[dict[str, dict[str, Any]], dict[str, list[str]]]:
    """(images by qid_key(id), reference captions by qid_key(image_id))."""
    data = read_json(path, COCO_CAPTIONS)
    if not isinstance(data, dict) or not isinstance(data.get("annotations"), list):
        raise BenchmarkFileError(f"{path} has no \"annotations\" list; expected {COCO_CAPTIONS}")
    images = {}
    for i, img in enumerate(data.get("images") or []):
        require_keys(img, ("id",), path, f"image {i}", COCO_CAPTIONS)
        images[qid_key(img["id"])] = img
    refs: dict[str, list[str]] = {}
    for i, ann in enumerate(data["annotations"]):
        require_keys(ann, ("image_id", "caption"), path, f"annotation {i}", COCO_CAPTIONS)
        refs.setdefault(qid_key(ann["image_id"]), []).append(str(ann["caption"]))
    return images, refs


def read_coco_results(path: Path) -> dict[str, str]:
    data = read_json(path, COCO_RESULTS)
    if not isinstance(data, list):
        raise BenchmarkFileError(f"{path} is not a JSON list; expected {COCO_RESULTS}")
    out: dict[str, str] = {}
    for i, row in enumerate(data):
        require_keys(row, ("image_id", "caption"), path, f"entry {i}", COCO_RESULTS)
        key = qid_key(row["image_id"])
        if key in out:
            raise BenchmarkFileError(f"{path}: image {row['image_id']!r} has two captions; the COCO evaluation "
                                     "takes one per image")
        out[key] = str(row["caption"])
    return out


def caption_reader(file: str, image_dir: str = "images"):
    """One question per image of the annotations' "images" list (which needs "file_name")."""

    def read(folder: Path) -> list[Question]:
        path = folder / file
        images, refs = read_coco_captions(path)
        if not images:
            raise BenchmarkFileError(f"{path} has no \"images\" list; expected {COCO_CAPTIONS}")
        out = []
        for key, img in images.items():
            require_keys(img, ("file_name",), path, f"image {img['id']}", COCO_CAPTIONS)
            if key not in refs:
                raise BenchmarkFileError(f"{path}: image {img['id']} has no caption annotation")
            out.append(Question(qid=img["id"], image=image_file(folder, f"{image_dir}/{img['file_name']}"), text="",
                                answer=refs[key]))
        return out

    return read


def score_caption_task(questions: Sequence[Question], answers: Mapping[str, str], options: ScoreOptions) -> dict:
    return score_captions({qid_key(q.qid): q.answer for q in questions}, dict(answers), spice=options.spice)


def write_caption_results(name: str):
    def write(questions: Sequence[Question], answers: Mapping[str, str], folder: Path,
              options: ScoreOptions) -> list[Path]:
        path = folder / name
        atomic_write_json(path, [{"image_id": q.qid, "caption": answers[qid_key(q.qid)]} for q in questions])
        return [path]

    return write


__all__ = ["COCO_CAPTIONS", "COCO_RESULTS", "read_coco_captions", "read_coco_results", "caption_reader",
           "score_caption_task", "write_caption_results"]
