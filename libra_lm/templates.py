"""The sequence templates: which text goes around the image and the answers, written once for
training data (libra_lm.data) and generation (libra_lm.generate), so that a prompt is, token
for token, the start of the training sequence of the same conversation.

    vicuna_v1  chat models (official `conv_vicuna_v1`, libra/data/datasets/conversation.py):
               <s>{system} USER: [image]\\n{question} ASSISTANT: {answer}</s>USER: {question} ASSISTANT: ...
    raw        Libra-Base, the pretraining layout (libra/data/datasets/laion_dataset.py):
               <s>[image]\\n{text}

The image, when there is one, goes first in its human turn and is followed by a newline, as
the official `preprocess_multimodal`; a turn that is only the image ends " ASSISTANT:" (the
official strips the newline that would follow it). See docs/official-formats.md#lm-behaviour.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from .config import LibraConfig
from .segments import Segment, text_segment

TEMPLATES = ("vicuna_v1", "raw")
# conv_vicuna_v1's system prompt (official libra/data/datasets/conversation.py).
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


@dataclass(frozen=True)
class Part:
    """One piece of a templated sequence: text to tokenize, or (text None) the image."""

    text: str | None
    bos: bool = False
    eos: bool = False
    continues: bool = False  # tokenized as the continuation of earlier text (no SentencePiece dummy prefix)
    answer: bool = False  # what the model is trained to produce (the rest is context)


IMAGE = Part(None)


def vicuna_v1(rounds: Sequence[tuple[str, str | None]], image_round: int | None = None,
              system: str = VICUNA_V1_SYSTEM) -> list[Part]:
    """The parts of a conversation: rounds of (question, answer or None); the image goes in the
    human turn of `image_round`. Each answer ends with EOS (the template's " </s>"); an
    unanswered last round ends "ASSISTANT:", the prompt of generation."""
    parts = []
    for k, (question, answer) in enumerate(rounds):
        head = f"{system} USER:" if k == 0 else "USER:"
        if k == image_round:
            tail = f"\n{question} ASSISTANT:" if question else " ASSISTANT:"
            parts += [Part(head, bos=k == 0), IMAGE, Part(tail, continues=True)]
        else:
            parts.append(Part(f"{head} {question} ASSISTANT:", bos=k == 0))
        if answer is not None:
            # " {answer}" after "ASSISTANT:": SentencePiece's dummy prefix is that space.
            parts.append(Part(answer, eos=True, answer=True))
    return parts


def raw(text: str, with_image: bool, *, eos: bool = False, answer: bool = False) -> list[Part]:
    """<s>[image]\\n{text}, or <s>{text} without an image. `answer`: the text is trained (the
    pretraining caption); a prompt of no text after an image gets no newline."""
    if not with_image:
        return [Part(text, bos=True, eos=eos, answer=answer)]
    parts = [Part("", bos=True), IMAGE]
    if text or answer:
        parts.append(Part("\n" + text, continues=True, eos=eos, answer=answer))
    return parts


def encode_parts(parts: Sequence[Part], text_tokenizer, config: LibraConfig,
                 image: Segment | None = None) -> list[tuple[Part, Segment]]:
    """Each part with its segment: text through the SentencePiece tokenizer, the image part
    as `image` (BOI + patches + EOI)."""
    out = []
    for part in parts:
        if part.text is None:
            if image is None:
                raise ValueError("the template places an image, but no image was given")
            out.append((part, image))
        else:
            ids = text_tokenizer.encode(part.text, bos=part.bos, eos=part.eos, prefix_space=not part.continues)
            out.append((part, text_segment(ids, config)))
    return out


__all__ = ["TEMPLATES", "VICUNA_V1_SYSTEM", "Part", "IMAGE", "vicuna_v1", "raw", "encode_parts"]
