"""Small benchmark folders in every official layout, made from the assets/ images, and a tiny
Libra model folder to run `libra-lm eval` on them (tests/test_lm_eval.py).

Each benchmark gets a few questions with public ground truth (and the test splits theirs
without), so the end-to-end test covers every reader, renderer, scorer and submission writer.
"""

import base64
import csv
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from builders import ROOT, TINY, randomize_, train_tiny_text_tokenizer

ASSETS = sorted(p for p in (ROOT / "assets").iterdir() if p.suffix in (".png", ".jpg"))
THUMB = 48  # the tiny tokenizer resizes to 112 anyway; small files keep reading fast


def thumbnail(i: int) -> Image.Image:
    with Image.open(ASSETS[i % len(ASSETS)]) as im:
        return im.convert("RGB").resize((THUMB + 8 * (i % 3), THUMB))


def save_image(path: Path, i: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    thumbnail(i).save(path, format="JPEG" if path.suffix.lower() in (".jpg", ".jpeg") else "PNG")


def image_b64(i: int) -> str:
    buf = io.BytesIO()
    thumbnail(i).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, ensure_ascii=False))


def _vqa(root: Path, name: str, qfile: str, afile: str | None, image_dir: str, prefix: str, n: int = 4) -> None:
    folder = root / name
    qs, anns = [], []
    answers = ["two", "yes", "red", "cat"]
    for k in range(n):
        image_id = 100 + k // 2  # two questions per image
        qid = 1000 * (k + 1) + 7
        qs.append({"question_id": qid, "image_id": image_id, "question": f"What is shown in picture {k}?"})
        anns.append({"question_id": qid, "image_id": image_id, "question_type": "what is", "answer_type": "other",
                     "answers": [{"answer": answers[k % 4], "answer_confidence": "yes", "answer_id": i + 1}
                                 for i in range(10)]})
        save_image(folder / image_dir / f"{prefix}{image_id:012d}.jpg", image_id)
    write_json(folder / qfile, {"questions": qs, "task_type": "Open-Ended", "data_type": "mscoco"})
    if afile is not None:
        write_json(folder / afile, {"annotations": anns})


def _vizwiz(root: Path) -> None:
    folder = root / "vizwiz"
    for split, with_answers in (("val", True), ("test", False)):
        rows = []
        for k in range(4):
            image = f"VizWiz_{split}_{k:08d}.jpg"
            save_image(folder / split / image, k + 3)
            row = {"image": image, "question": f"What is this {k}?"}
            if with_answers:
                row["answers"] = [{"answer": "unanswerable" if k == 0 else "soup", "answer_confidence": "yes"}] * 10
                row["answer_type"] = "unanswerable" if k == 0 else "other"
                row["answerable"] = int(k != 0)
            rows.append(row)
        write_json(folder / f"{split}.json", rows)


def _gqa(root: Path) -> None:
    folder = root / "gqa"
    qs = {}
    for k in range(4):
        qs[f"20{k}"] = {"imageId": f"n{k // 2}", "question": f"Is it left {k}?", "answer": "yes" if k % 2 else "no",
                        "types": {"structural": "verify", "semantic": "rel"}}
        save_image(folder / "images" / f"n{k // 2}.jpg", k // 2 + 1)
    write_json(folder / "testdev_balanced_questions.json", qs)


def _scienceqa(root: Path) -> None:
    folder = root / "scienceqa"
    problems, test = {}, []
    for k in range(5):
        pid = str(10 + k)
        image = None if k == 4 else "image.png"  # one text-only problem: not in the IMG subset
        problems[pid] = {"question": f"Which is warmer {k}?", "choices": ["ice", "fire", "snow"][: 2 + k % 2],
                         "answer": 1, "hint": "Look at the picture." if k % 2 else "", "image": image,
                         "split": "test"}
        test.append(pid)
        if image:
            save_image(folder / "images" / "test" / pid / image, k + 2)
    write_json(folder / "problems.json", problems)
    write_json(folder / "pid_splits.json", {"test": test, "train": []})


def _captions(root: Path, name: str, file: str) -> None:
    folder = root / name
    images, anns = [], []
    for k in range(3):
        images.append({"id": 500 + k, "file_name": f"img_{k}.jpg", "domain": "in-domain"})
        save_image(folder / "images" / f"img_{k}.jpg", k + 4)
        for j, caption in enumerate(["a photo of a cat on a sofa", "a cat sitting on a red sofa",
                                     f"an animal resting indoors {k}"]):
            anns.append({"image_id": 500 + k, "id": 10 * k + j, "caption": caption})
    write_json(folder / file, {"images": images, "annotations": anns})


def _pope(root: Path) -> None:
    folder = root / "pope"
    for s, split in enumerate(("random", "popular", "adversarial")):
        lines = []
        for k in range(4):
            image = f"COCO_val2014_{k // 2:012d}.jpg"
            save_image(folder / "val2014" / image, k // 2)
            lines.append(json.dumps({"question_id": k + 1, "image": image, "text": f"Is there a {split} {k}?",
                                     "label": "yes" if (k + s) % 2 else "no"}))
        (folder / f"coco_pope_{split}.json").write_text("\n".join(lines) + "\n")


MME_FOLDERS = {"artwork", "celebrity", "landmark", "posters", "scene"}  # images/ + questions_answers_YN/


def _mme(root: Path) -> None:
    from libra_lm.eval.scoring.mme import COGNITION, PERCEPTION

    base = root / "mme" / "MME_Benchmark_release_version"
    for t, subtask in enumerate(PERCEPTION + COGNITION):
        nested = subtask in MME_FOLDERS
        image_dir = base / subtask / ("images" if nested else "")
        qa_dir = base / subtask / ("questions_answers_YN" if nested else "")
        qa_dir.mkdir(parents=True, exist_ok=True)
        save_image(image_dir / f"{t:04d}.{'png' if t % 2 else 'jpg'}", t)
        (qa_dir / f"{t:04d}.txt").write_text(f"Is this a {subtask}? Please answer yes or no.\tYes\n"
                                             f"Is this not a {subtask}? Please answer yes or no.\tNo\n")


def _mmbench(root: Path, name: str, dev_file: str, test_file: str, chinese: bool) -> None:
    folder = root / name
    folder.mkdir(parents=True, exist_ok=True)
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "source",
              "l2-category", "comment", "split"]
    for file, split in ((dev_file, "dev"), (test_file, "test")):
        rows = []
        for g in range(2):
            options = ["cat", "dog", "bird"] if g == 0 else ["red", "blue", "green", "pink"]
            right = 1
            for c in range(len(options)):  # the original (c = 0) and its rotated circular copies
                rotated = options[c:] + options[:c]
                answer = "ABCD"[rotated.index(options[right])]
                question = f"{'哪个' if chinese else 'Which'} {g}?"
                image = image_b64(g) if c == 0 else str(g)  # copies refer to the original row's image
                row = [str(g + c * 1_000_000), question, "A hint." if g else "", *rotated, *[""] * (4 - len(rotated)),
                       answer if split == "dev" else "", f"cat{g}", image, "src", "l2", "", split]
                rows.append(row)
        with open(folder / file, "w", encoding="utf-8", newline="") as fh:
            writer = csv.writer(fh, delimiter="\t")
            writer.writerow(header)
            writer.writerows(rows)


def _seed(root: Path) -> None:
    folder = root / "seed_bench"
    qs = []
    for k in range(4):
        qs.append({"question_id": f"{k}", "data_id": f"img_{k // 2}.jpg", "data_type": "image",
                   "question": f"How many {k}?", "choice_a": "one", "choice_b": "two", "choice_c": "three",
                   "choice_d": "four", "answer": "ABCD"[k % 4], "question_type_id": 1 + k % 2})
        save_image(folder / "SEED-Bench-image" / f"img_{k // 2}.jpg", k // 2 + 6)
    qs.append({"question_id": "v1", "data_id": "video.mp4", "data_type": "video", "question": "What happens?",
               "choice_a": "a", "choice_b": "b", "choice_c": "c", "choice_d": "d", "answer": "A",
               "question_type_id": 10})
    write_json(folder / "SEED-Bench.json", {"questions": qs, "question_type": {"Scene Understanding": 1,
                                                                               "Instance Identity": 2,
                                                                               "Action Recognition": 10}})


def _mmvp(root: Path) -> None:
    folder = root / "mmvp"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [["Index", "Question", "Options", "Correct Answer"]]
    for index in range(1, 5):
        rows.append([str(index), "Is the door open?", "(a) Open (b) Closed", "(a)" if index % 2 else "(b)"])
        save_image(folder / "MMVP Images" / f"{index}.jpg", index)
    with open(folder / "Questions.csv", "w", newline="") as fh:
        csv.writer(fh).writerows(rows)


def _mmvet(root: Path) -> None:
    folder = root / "mm-vet"
    data = {}
    for k in range(2):
        data[f"v1_{k}"] = {"imagename": f"v1_{k}.png", "question": f"What is funny here {k}?", "answer": "x",
                           "capability": ["rec"]}
        save_image(folder / "images" / f"v1_{k}.png", k + 7)
    write_json(folder / "mm-vet.json", data)


def write_benchmarks(root: Path) -> Path:
    """Every benchmark folder of docs/eval.md under `root` (the --data-root)."""
    _vqa(root, "vqav2", "v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json",
         "val2014", "COCO_val2014_")
    _vqa(root, "vqav2", "v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015", "COCO_test2015_")
    # The whole test set: EvalAI's test-dev phase takes an answer (maybe empty) for each of its questions.
    dev = json.loads((root / "vqav2" / "v2_OpenEnded_mscoco_test-dev2015_questions.json").read_text())
    extra = [{"question_id": 9, "image_id": 999, "question": "Not in test-dev?"}]
    write_json(root / "vqav2" / "v2_OpenEnded_mscoco_test2015_questions.json",
               {**dev, "questions": dev["questions"] + extra})
    _vqa(root, "okvqa", "OpenEnded_mscoco_val2014_questions.json", "mscoco_val2014_annotations.json", "val2014",
         "COCO_val2014_")
    _vizwiz(root)
    _gqa(root)
    _scienceqa(root)
    _captions(root, "coco", "captions_karpathy_test.json")
    _captions(root, "flickr30k", "captions_karpathy_test.json")
    _captions(root, "nocaps", "nocaps_val_4500_captions.json")
    _pope(root)
    _mme(root)
    _mmbench(root, "mmbench", "mmbench_dev_20230712.tsv", "mmbench_test_en_20231003.tsv", False)
    _mmbench(root, "mmbench_cn", "mmbench_dev_cn_20231003.tsv", "mmbench_test_cn_20231003.tsv", True)
    _seed(root)
    _mmvp(root)
    _mmvet(root)
    return root


def write_tiny_model(folder: Path, seed: int = 0) -> Path:
    """A random tiny Libra LM folder with its text tokenizer and the tiny image tokenizer
    recorded (so `libra-lm eval --model` needs nothing else)."""
    from libra_lm import LibraForCausalLM
    from libra_tok.pipeline import load_tokenizer, tokenizer_identity

    identity = tokenizer_identity(load_tokenizer(preset="tiny", device="cpu"), None)
    torch.manual_seed(seed)
    model = randomize_(LibraForCausalLM(TINY), seed=seed, scale=0.3)
    model.save_pretrained(folder, image_tokenizer=identity)
    train_tiny_text_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory) -> Path:
    return write_benchmarks(tmp_path_factory.mktemp("benchmarks"))


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    return write_tiny_model(tmp_path_factory.mktemp("tiny") / "model")
