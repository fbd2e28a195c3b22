"""`libra-lm eval`: the paper's benchmarks with one model, resumable.

    result = run_eval(EvalConfig(model="libra-11b-chat", tasks="pope,mme", data_root="bench/", out="eval/"))
    print(result.table)

Every task's questions are read (and their images checked) before the model is loaded.
Then, task by task, questions are ordered so that those sharing an image are neighbours,
cut into fixed batches, and each batch whose questions are not all answered yet is
generated (left padding, KV cache, greedy; libra_lm.generate) and appended to
answers/<task>.jsonl. A rerun finds the same batches, so an interrupted batch is generated
again exactly as it would have been. Then every task is scored (or its submission file
written) and results.json and the table are written.

Output folder:
  run.json              the model, tokenizers and template of the run (a rerun must match)
  answers/<task>.jsonl  one line per question: task, question_id, prompt, answer, tokens, stop
  submissions/          official files: EvalAI JSON, MMBench TSV, MM-Vet JSON, MME eval tool txt, COCO results
  results.json          metrics per task (and split/subtask), protocol, digests, versions, the table
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from libra_tok.fileio import atomic_write_json, check_output_folder
from libra_tok.shards import sha256_file

from .. import inference
from ..generate import build_prompt, collate_prompts, generate
from ..inference import DTYPES
from ..templates import TEMPLATES
from .answers import AnswerLog
from .images import ImageBank
from .questions import Question, qid_key
from .results import model_digest, paper_table, versions
from .scoring.vqa import RULES
from .tasks import ScoreOptions, Task, get_tasks, limit_questions

NORMALIZE = tuple(r for r in RULES if r != "vizwiz")


@dataclass
class EvalConfig:
    model: str | Path
    tasks: str | Sequence[str]
    data_root: str | Path
    out: str | Path
    limit: int | None = None  # at most this many questions per split / subtask (whole groups kept)
    batch_size: int = 8
    max_new_tokens: int | None = None  # overrides every task's protocol value (smoke runs)
    template: str = "vicuna_v1"  # "raw" for Libra-Base
    normalize: str = "official"  # VQA answer rule: official | always (EvalAI / LLaVA)
    spice: bool = False
    device: str = "auto"
    dtype: str = "auto"
    attn_backend: str = "auto"
    tokenizer: str | Path | None = None  # image tokenizer folder / vqgan.ckpt (default: the model folder's)
    tokenizer_preset: str | None = None
    text_tokenizer: str | Path | None = None
    image_shards: Sequence[str | Path] = ()
    image_batch_size: int = 16
    image_cache: int = 64
    trust_pickle: bool = False
    progress: bool = True

    def check(self) -> None:
        if self.batch_size < 1 or self.image_batch_size < 1 or self.image_cache < 1:
            raise ValueError("--batch-size, --image-batch-size and the image cache must be at least 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"--limit must be at least 1, got {self.limit}")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be at least 1, got {self.max_new_tokens}")
        if self.template not in TEMPLATES:
            raise ValueError(f"--template must be one of {TEMPLATES}, got {self.template!r}")
        if self.normalize not in NORMALIZE:
            raise ValueError(f"--normalize must be one of {NORMALIZE}, got {self.normalize!r}")
        if self.dtype not in ("auto", *DTYPES):
            raise ValueError(f"--dtype must be auto or one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.tokenizer is not None and self.tokenizer_preset is not None:
            raise ValueError("give --tokenizer or --tokenizer-preset, not both")


@dataclass
class EvalResult:
    out: Path
    results: dict[str, Any]
    table: str
    generated: int = 0  # questions answered by this call
    seconds: float = 0.0  # generation time of this call
    task_questions: dict[str, int] = field(default_factory=dict)


# ---- generation ----------------------------------------------------------------------------------------
def order_by_image(questions: Sequence[Question]) -> list[Question]:
    """Questions grouped by image (in order of each image's first question), file order
    within an image: neighbours share images, so each is tokenized once."""
    first: dict[str, int] = {}
    for i, q in enumerate(questions):
        first.setdefault(q.image.key if q.image is not None else f"#{i}", i)
    return sorted(questions, key=lambda q: first[q.image.key] if q.image is not None else -1)


def batches(questions: Sequence[Question], size: int) -> list[list[Question]]:
    """Fixed batches of the ordered questions: a rerun cuts the same ones."""
    ordered = order_by_image(questions)
    return [ordered[i:i + size] for i in range(0, len(ordered), size)]


def answer_batch(model, text_tokenizer, bank: ImageBank, task: Task, questions: Sequence[Question],
                 template: str, max_new_tokens: int) -> list[dict[str, Any]]:
    """Greedy answers of one batch as answer-file records."""
    cfg = model.config
    if getattr(model, "arch", "libra") == "hovle":  # the monolithic baseline reads raw pixels (docs/hovle.md)
        from ..hovle.generate import chat as hovle_chat

        images = [bank.read(q.image) if q.image is not None else None for q in questions]
        out = hovle_chat(model, text_tokenizer, [task.prompt(q) for q in questions], images, template=template,
                         max_new_tokens=max_new_tokens)
        return [{"task": task.name, "question_id": q.qid, "prompt": task.prompt(q), "answer": out.texts[i].strip(),
                 "tokens": out.lengths[i], "stop": out.stop_reasons[i]} for i, q in enumerate(questions)]
    segments = bank.segments([q.image for q in questions])
    prompts = [build_prompt(text_tokenizer, cfg, task.prompt(q), image=seg, template=template)
               for q, seg in zip(questions, segments, strict=True)]
    ids, feats, mask = collate_prompts(prompts, cfg, model.device)
    out = generate(model, ids, feats, mask, max_new_tokens=max_new_tokens, text_tokenizer=text_tokenizer)
    return [{"task": task.name, "question_id": q.qid, "prompt": task.prompt(q), "answer": out.texts[i].strip(),
             "tokens": out.lengths[i], "stop": out.stop_reasons[i]} for i, q in enumerate(questions)]


# ---- the run -------------------------------------------------------------------------------------------
def _run_record(cfg: EvalConfig, model: Path, digests: dict[str, Any]) -> dict[str, Any]:
    return {"model": str(model), "model_sha256": digests["model"]["sha256"],
            "image_tokenizer_sha256": digests["image_tokenizer"], "text_tokenizer_sha256": digests["text_tokenizer"],
            "template": cfg.template, "max_new_tokens": cfg.max_new_tokens, "model_files": digests["model"]["files"]}


def _check_run(out: Path, record: dict[str, Any]) -> None:
    """A folder with answers of another model, tokenizer, template or answer length is refused."""
    import json

    path = out / "run.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        raise ValueError(f"{path} is not readable JSON; choose another --out") from None
    for key, what in (("model_sha256", "model"), ("image_tokenizer_sha256", "image tokenizer"),
                      ("text_tokenizer_sha256", "text tokenizer"), ("template", "template"),
                      ("max_new_tokens", "--max-new-tokens")):
        if old.get(key) != record[key]:
            raise ValueError(f"--out {out} holds answers of another {what} ({old.get(key)} vs {record[key]}); "
                             "choose another --out, or move the old answers away")


def _cached_model_digest(out: Path) -> dict[str, Any] | None:
    import json

    try:
        old = json.loads((out / "run.json").read_text())
        return {"sha256": old["model_sha256"], "files": old["model_files"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def protocol(cfg: EvalConfig, tasks: Sequence[Task]) -> dict[str, Any]:
    return {
        "template": cfg.template, "decoding": "greedy", "rendering": "LLaVA-1.5 (libra_lm.eval.prompts)",
        "vqa_normalize": cfg.normalize, "limit_per_split": cfg.limit, "batch_size": cfg.batch_size,
        "tasks": {t.name: {"benchmark": t.title, "split": t.split, "prompt_suffix": t.suffix,
                           "max_new_tokens": cfg.max_new_tokens or t.max_new_tokens,
                           "scored": t.scored, **({"note": t.note} if t.note else {})} for t in tasks},
    }


def run_eval(cfg: EvalConfig) -> EvalResult:
    cfg.check()
    tasks = get_tasks(cfg.tasks)
    out = check_output_folder(cfg.out, "--out")
    data_root = Path(cfg.data_root).expanduser()
    if not data_root.is_dir():
        raise FileNotFoundError(f"--data-root {data_root} is not a folder")

    # Every benchmark file is read (and every image checked) before anything is loaded.
    all_questions = {t.name: t.read(data_root) for t in tasks}
    questions = {name: limit_questions(qs, cfg.limit) for name, qs in all_questions.items()}

    # The tokenizers, then the run's identity, then the model: a wrong tokenizer or an output
    # folder of another run fails before the large load.
    device = inference.resolve_device(cfg.device)
    model_path = inference.resolve_model(cfg.model, text_tokenizer=cfg.text_tokenizer is None,
                                         image_tokenizer=cfg.tokenizer is None and cfg.tokenizer_preset is None)
    text_tok = inference.load_text_tokenizer(model_path, cfg.text_tokenizer)
    from ..hovle.checkpoint import is_hovle_folder

    hovle = is_hovle_folder(model_path)  # HoVLE reads pixels: no image tokenizer (docs/hovle.md)
    image_tok = None if hovle else inference.load_image_tokenizer(
        model_path, cfg.tokenizer, cfg.tokenizer_preset, device=device, trust_pickle=cfg.trust_pickle)
    from libra_tok.pipeline import weights_digest

    digests = {"model": model_digest(model_path, _cached_model_digest(out)),
               "image_tokenizer": None if hovle else weights_digest(image_tok),
               "text_tokenizer": sha256_file(text_tok.path)}
    record = _run_record(cfg, model_path, digests)
    _check_run(out, record)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "run.json", record)
    model = inference.load_model(model_path, device=device, dtype=inference.resolve_dtype(cfg.dtype, device),
                                 attn_backend=cfg.attn_backend, trust_pickle=cfg.trust_pickle)

    bank = ImageBank(image_tok, model.config, shards=cfg.image_shards, tokenizer_digest=digests["image_tokenizer"],
                     capacity=max(cfg.image_cache, cfg.batch_size), batch_size=cfg.image_batch_size)

    logs = {t.name: AnswerLog(out / "answers" / f"{t.name}.jsonl", t.name,
                              {qid_key(q.qid): t.prompt(q) for q in all_questions[t.name]}) for t in tasks}
    todo = sum(not logs[t.name].answered(q.qid) for t in tasks for q in questions[t.name])
    generated, start = 0, time.perf_counter()
    with tqdm(total=todo, unit="q", desc="eval", disable=not cfg.progress or todo == 0, dynamic_ncols=True) as bar:
        for task in tasks:
            bar.set_description(task.name)
            max_new = cfg.max_new_tokens or task.max_new_tokens
            for batch in batches(questions[task.name], cfg.batch_size):
                pending = [q for q in batch if not logs[task.name].answered(q.qid)]
                if not pending:
                    continue
                logs[task.name].append(answer_batch(model, text_tok, bank, task, pending, cfg.template, max_new))
                generated += len(pending)
                bar.update(len(pending))
    seconds = time.perf_counter() - start

    results = score_run(tasks, questions, logs, out, cfg)
    table = paper_table(tasks, results, model_path.name)
    doc = {"model": {"path": str(model_path), "sha256": digests["model"]["sha256"]},
           "image_tokenizer": {"weights_sha256": digests["image_tokenizer"]},
           "text_tokenizer": {"path": str(text_tok.path), "sha256": digests["text_tokenizer"]},
           "protocol": protocol(cfg, tasks), "versions": versions(),
           "images": {"encoded": bank.encoded, "from_shards": bank.from_shards},
           "tasks": results, "table": table}
    atomic_write_json(out / "results.json", doc)
    return EvalResult(out, doc, table, generated, seconds, {n: len(q) for n, q in questions.items()})


def score_run(tasks: Sequence[Task], questions: dict[str, list[Question]], logs: dict[str, AnswerLog], out: Path,
              cfg: EvalConfig) -> dict[str, Any]:
    """Metrics and official files of every task, from the answers files."""
    from .scoring.captions import shared_meteor

    options = ScoreOptions(normalize=cfg.normalize, spice=cfg.spice)
    results: dict[str, Any] = {}
    with shared_meteor():
        for task in tasks:
            results[task.name] = _score_task(task, questions[task.name], logs[task.name], out, options)
    return results


def _score_task(task: Task, qs: list[Question], answer_log: AnswerLog, out: Path, options: ScoreOptions) -> dict:
    answers = answer_log.answers()
    entry: dict[str, Any] = {"benchmark": task.title, "split": task.split, "questions": len(qs),
                             "answers": str(answer_log.path.relative_to(out))}
    if task.writer is not None:
        entry["files"] = [str(p.relative_to(out)) for p in task.writer(qs, answers, out / "submissions", options)]
    if task.scorer is not None:
        entry["metrics"] = task.scorer(qs, answers, options)
    return entry


__all__ = ["EvalConfig", "EvalResult", "run_eval", "score_run", "answer_batch", "batches", "order_by_image",
           "protocol"]
