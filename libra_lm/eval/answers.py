"""answers/<task>.jsonl: the answers of a run, one JSON line per question
({"task", "question_id", "prompt", "answer", "tokens", "stop"}), appended and flushed (and
fsynced) one batch at a time, so a killed run loses at most the batch in flight. Reopening
the file resumes: a line cut short by a kill is dropped, every other line must belong to
this task, be asked with the prompt the task renders now, and answer a question once."""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .questions import BenchmarkFileError, qid_key

log = logging.getLogger("libra_lm.eval")

ANSWER_LINE = '{"task", "question_id", "prompt", "answer", "tokens", "stop"}'


class AnswerLog:
    def __init__(self, path: str | Path, task: str, prompts: Mapping[str, str]):
        """`prompts`: the rendered prompt of every question of the task, by qid_key."""
        self.path = Path(path)
        self.task = task
        self.records: dict[str, dict[str, Any]] = {}
        if self.path.exists():
            self._load(prompts)

    def _load(self, prompts: Mapping[str, str]) -> None:
        if not self.path.is_file():
            raise IsADirectoryError(f"{self.path} is not a file; the answers of {self.task} are written there")
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # the tail of a write cut short by a kill
            log.warning("%s: dropping an incomplete last line (%d bytes) left by an interrupted run", self.path,
                        len(data) - end)
            os.truncate(self.path, end)
        for n, line in enumerate(data[:end].decode("utf-8", errors="replace").split("\n"), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                raise BenchmarkFileError(f"{self.path} line {n} is not JSON; expected answer lines {ANSWER_LINE}"
                                         ) from None
            if not isinstance(rec, dict) or not {"task", "question_id", "prompt", "answer"} <= set(rec):
                raise BenchmarkFileError(f"{self.path} line {n} is not an answer line {ANSWER_LINE}")
            if rec["task"] != self.task:
                raise ValueError(f"{self.path} holds answers of task {rec['task']!r}, not {self.task!r}; "
                                 "move it away or choose another --out")
            key = qid_key(rec["question_id"])
            if key not in prompts:
                raise ValueError(f"{self.path} line {n} answers question {rec['question_id']!r}, which {self.task} "
                                 "does not have: the answers were made for other data; choose another --out")
            if key in self.records:
                raise ValueError(f"{self.path} answers question {rec['question_id']!r} twice (line {n})")
            if rec["prompt"] != prompts[key]:
                raise ValueError(f"{self.path} line {n} was asked with another prompt than {self.task} renders now "
                                 f"({rec['prompt']!r}); choose another --out for a changed protocol")
            self.records[key] = rec

    def answered(self, qid: Any) -> bool:
        return qid_key(qid) in self.records

    def append(self, records: Sequence[dict[str, Any]]) -> None:
        """Write the records in one go, flushed and synced, and remember them."""
        keys = [qid_key(r["question_id"]) for r in records]
        dup = [k for k in keys if k in self.records]
        if dup or len(set(keys)) != len(keys):
            raise RuntimeError(f"{self.path}: question {dup[0] if dup else keys} would be answered twice")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
        with open(self.path, "a", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        for k, r in zip(keys, records, strict=True):
            self.records[k] = r

    def answers(self) -> dict[str, str]:
        return {k: r["answer"] for k, r in self.records.items()}


__all__ = ["ANSWER_LINE", "AnswerLog"]
