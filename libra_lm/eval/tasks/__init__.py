"""The benchmarks of the paper (Tab. 5 splits, Tab. 6 prompts) as `Task`s, by --tasks name.

Splits without public answers (VQAv2 test-dev, VizWiz test, MMBench test) write the
official submission files; their public splits (vqav2_val, vizwiz_val, mmbench_dev,
mmbench_cn_dev) are scored here. MM-Vet writes its answers file for its GPT-4 grader.
Max new tokens: LLaVA-1.5's loader default (128) for short answers and letters, 64 for
captions (lmms-eval), 1024 for MM-Vet's open answers (LLaVA's model_vqa.py).
"""

from __future__ import annotations

from .base import CAPTION, CONCISE, LETTER, LETTER_CN, SHORT, UNANSWERABLE, ScoreOptions, Task, limit_questions
from .captions import caption_reader, score_caption_task, write_caption_results
from .choice import (
    mmbench_reader,
    mmvet_reader,
    mmvp_reader,
    scienceqa_reader,
    score_mmbench_task,
    score_mmvp_task,
    score_scienceqa_task,
    score_seed_task,
    seed_reader,
    write_mmbench_submission,
    write_mmvet_answers,
)
from .mme import mme_reader, score_mme_task, write_mme_results
from .pope import pope_reader, score_pope_task
from .vqa import (
    gqa_reader,
    score_gqa_task,
    score_vizwiz_task,
    score_vqa_task,
    vizwiz_reader,
    vqa_reader,
    write_vizwiz_submission,
    write_vqa_submission,
)

# The paper's columns, in its order (Tab. 1, then Tab. 2).
PAPER_COLUMNS = {
    1: ("VQAv2", "OKVQA", "GQA", "VizWiz", "SQA", "NoCaps", "Flickr", "COCO"),
    2: ("POPE", "MME", "MME^C", "MMB", "MMB^CN", "SEED", "MM-Vet", "MMVP"),
}
VIZWIZ_SUFFIX = f"{UNANSWERABLE}\n{SHORT}"


def _tasks() -> dict[str, Task]:
    t = [
        Task("vqav2", "VQAv2", "test-dev", "vqav2", SHORT, 128,
             vqa_reader("v2_OpenEnded_mscoco_test-dev2015_questions.json", None, "test2015", "COCO_test2015_"),
             {"VQAv2": ""}, 1,
             writer=write_vqa_submission("vqav2_test-dev.json", "v2_OpenEnded_mscoco_test2015_questions.json"),
             note="EvalAI submission file"),
        Task("vqav2_val", "VQAv2", "val", "vqav2", SHORT, 128,
             vqa_reader("v2_OpenEnded_mscoco_val2014_questions.json", "v2_mscoco_val2014_annotations.json", "val2014",
                        "COCO_val2014_"),
             {"VQAv2 val": "overall"}, 1, scorer=score_vqa_task),
        Task("okvqa", "OK-VQA", "val", "okvqa", SHORT, 128,
             vqa_reader("OpenEnded_mscoco_val2014_questions.json", "mscoco_val2014_annotations.json", "val2014",
                        "COCO_val2014_"),
             {"OKVQA": "overall"}, 1, scorer=score_vqa_task),
        Task("gqa", "GQA", "test-balanced", "gqa", SHORT, 128,
             gqa_reader("testdev_balanced_questions.json", "images"), {"GQA": "accuracy"}, 1, scorer=score_gqa_task),
        Task("vizwiz", "VizWiz", "test", "vizwiz", VIZWIZ_SUFFIX, 128, vizwiz_reader("test.json", "test", False),
             {"VizWiz": ""}, 1, writer=write_vizwiz_submission, note="EvalAI submission file"),
        Task("vizwiz_val", "VizWiz", "val", "vizwiz", VIZWIZ_SUFFIX, 128, vizwiz_reader("val.json", "val", True),
             {"VizWiz val": "overall"}, 1, scorer=score_vizwiz_task),
        Task("scienceqa", "ScienceQA", "IMG test", "scienceqa", LETTER, 128, scienceqa_reader("test"),
             {"SQA": "accuracy"}, 1, scorer=score_scienceqa_task, hint_style="context"),
        Task("nocaps", "NoCaps", "val", "nocaps", CAPTION, 64, caption_reader("nocaps_val_4500_captions.json"),
             {"NoCaps": "CIDEr"}, 1, scorer=score_caption_task,
             writer=write_caption_results("nocaps_val_results.json")),
        Task("flickr30k", "Flickr30K", "karpathy test", "flickr30k", CAPTION, 64,
             caption_reader("captions_karpathy_test.json"), {"Flickr": "CIDEr"}, 1, scorer=score_caption_task,
             writer=write_caption_results("flickr30k_karpathy_test_results.json")),
        Task("coco", "COCO Caption", "karpathy test", "coco", CAPTION, 64,
             caption_reader("captions_karpathy_test.json"), {"COCO": "CIDEr"}, 1, scorer=score_caption_task,
             writer=write_caption_results("coco_karpathy_test_results.json")),
        Task("pope", "POPE", "random/popular/adversarial", "pope", SHORT, 128, pope_reader(), {"POPE": "f1"}, 2,
             scorer=score_pope_task),
        Task("mme", "MME", "perception/cognition", "mme", SHORT, 128, mme_reader(),
             {"MME": "perception", "MME^C": "cognition"}, 2, scorer=score_mme_task, writer=write_mme_results),
        Task("mmbench", "MMBench", "test", "mmbench", LETTER, 128, mmbench_reader("mmbench_test_en_20231003.tsv"),
             {"MMB": ""}, 2, writer=write_mmbench_submission("mmbench_test_en.tsv"),
             note="submission table for the MMBench server"),
        Task("mmbench_dev", "MMBench", "dev", "mmbench", LETTER, 128, mmbench_reader("mmbench_dev_20230712.tsv"),
             {"MMB dev": "circular_accuracy"}, 2, scorer=score_mmbench_task),
        Task("mmbench_cn", "MMBench-CN", "test", "mmbench_cn", LETTER_CN, 128,
             mmbench_reader("mmbench_test_cn_20231003.tsv"), {"MMB^CN": ""}, 2,
             writer=write_mmbench_submission("mmbench_test_cn.tsv"), note="submission table for the MMBench server"),
        Task("mmbench_cn_dev", "MMBench-CN", "dev", "mmbench_cn", LETTER_CN, 128,
             mmbench_reader("mmbench_dev_cn_20231003.tsv"), {"MMB^CN dev": "circular_accuracy"}, 2,
             scorer=score_mmbench_task),
        Task("seed", "SEED-Bench", "image", "seed_bench", LETTER, 128, seed_reader(), {"SEED": "accuracy"}, 2,
             scorer=score_seed_task),
        Task("mmvet", "MM-Vet", "test", "mm-vet", "", 1024, mmvet_reader(), {"MM-Vet": ""}, 2,
             writer=write_mmvet_answers, note="answers for the GPT-4 grader"),
        Task("mmvp", "MMVP", "test", "mmvp", CONCISE, 128, mmvp_reader(), {"MMVP": "pair_accuracy"}, 2,
             scorer=score_mmvp_task),
    ]
    return {task.name: task for task in t}


TASKS: dict[str, Task] = _tasks()
# The tasks of the paper's tables (test splits as submission files).
PAPER_TASKS = {
    1: ("vqav2", "okvqa", "gqa", "vizwiz", "scienceqa", "nocaps", "flickr30k", "coco"),
    2: ("pope", "mme", "mmbench", "mmbench_cn", "seed", "mmvet", "mmvp"),
}


def get_tasks(names: str | list[str]) -> list[Task]:
    """Tasks by name: a list, or a comma-separated string; "table1" / "table2" / "all" name
    groups (the paper's tables, every task)."""
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    out: list[Task] = []
    for name in names:
        if name in ("table1", "table2"):
            group = [TASKS[n] for n in PAPER_TASKS[int(name[-1])]]
        elif name == "all":
            group = list(TASKS.values())
        elif name in TASKS:
            group = [TASKS[name]]
        else:
            raise ValueError(f"unknown task {name!r}; tasks: {', '.join(TASKS)} (or table1, table2, all)")
        out += [t for t in group if t not in out]
    if not out:
        raise ValueError("no task given")
    return out


__all__ = ["TASKS", "PAPER_COLUMNS", "PAPER_TASKS", "Task", "ScoreOptions", "get_tasks", "limit_questions"]
