"""Questions rendered as LLaVA-1.5's evaluation scripts render them (llava/eval/
model_vqa_mmbench.py, model_vqa_loader.py; ScienceQA as lmms-eval's LLaVA protocol):
the hint first (MMBench: "{hint}\\n{question}"; ScienceQA: "Context: {hint}\\n{question}"),
the options as "A. ..." lines, and the dataset's prompt (paper Tab. 6) on a line of its own.
The template (vicuna v1 or raw) wraps the result later (libra_lm.templates)."""

from __future__ import annotations

from .questions import Question

LETTERS = "ABCDEFGHIJ"
HINT_STYLES = ("plain", "context")


def render(question: Question, suffix: str = "", hint_style: str = "plain") -> str:
    if hint_style not in HINT_STYLES:
        raise ValueError(f"hint_style must be one of {HINT_STYLES}, got {hint_style!r}")
    if len(question.options) > len(LETTERS):
        raise ValueError(f"question {question.qid!r} has {len(question.options)} options; at most {len(LETTERS)}")
    text = question.text
    if question.hint:
        text = f"Context: {question.hint}\n{text}" if hint_style == "context" else f"{question.hint}\n{text}"
    lines = [text] if text else []
    lines += [f"{letter}. {option}" for letter, option in zip(LETTERS, question.options, strict=False)]
    if suffix:
        lines.append(suffix)
    return "\n".join(lines)


__all__ = ["LETTERS", "HINT_STYLES", "render"]
