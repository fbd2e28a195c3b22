"""HoVLE generation: prompts in the templates of libra_lm.templates with the image as BOI
[placeholders] EOI and its raw pixels beside them, decoding with the KV caches of both stacks
(the module's and the LLM's), greedy or sampled, batched with left padding.

    out = chat(model, text_tok, ["What is in the image?"], [Image.open("cat.jpg")], max_new_tokens=64)
    out.texts[0]

The same rules as Libra's decoding (libra_lm.generate: sampling, EOS, stop strings, the
context limit), for text: HoVLE generates no images.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..generate import (
    INVALID_PROBABILITIES,
    GenerationOutput,
    build_prompt,
    collate_prompts,
    cut_at_stop_strings,
    prepare_prompts,
    sample_checked,
)
from ..segments import Segment, image_segment
from .data import preprocess
from .model import HoVLECache, HoVLEForCausalLM


def image_placeholder(config) -> Segment:
    """BOI + num_image_tokens patch positions + EOI: where an image's patch embeddings go."""
    return image_segment(torch.zeros(config.num_image_tokens, config.num_codebooks, dtype=torch.long), None, config)


@torch.no_grad()
def generate(
    model: HoVLEForCausalLM,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | None = None,
    stop_strings: Sequence[str] = (),
    text_tokenizer: Any = None,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Continue left-padded prompts (libra_lm.generate.collate_prompts; one image of
    `pixel_values` per BOI [patches] EOI run, in row-major order) by up to `max_new_tokens`
    text tokens. The prompt is one forward pass that fills both caches; each step then runs
    one token through both stacks (`decode_step`)."""
    cfg = model.config
    device = model.device
    input_ids, attention_mask, max_new_tokens = prepare_prompts(
        model, input_ids, attention_mask, max_new_tokens, temperature, top_p, top_k, stop_strings, text_tokenizer)
    b, n, ncb = input_ids.shape
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    pixels = pixel_values.to(device) if pixel_values is not None else None

    was_training = model.training
    model.eval()
    cache = HoVLECache(cfg, capacity=n + max_new_tokens)
    out = model(input_ids, pixels, attention_mask, past_key_values=cache, logits_to_keep=1)
    finished, reasons, lengths = [False] * b, ["length"] * b, [0] * b
    rows: list[list[int]] = [[] for _ in range(b)]
    generated = []
    stopped = torch.zeros(b, dtype=torch.bool, device=device)
    for step in range(max_new_tokens):
        nxt, ok = sample_checked(out.logits[:, -1], temperature, top_p, top_k, generator)
        nxt = torch.where(stopped, cfg.pad_token_id, nxt)
        generated.append(nxt)
        chosen = nxt.tolist()  # the step's one read-back
        if ok is not None and not bool(ok):
            raise RuntimeError(INVALID_PROBABILITIES)
        for i in range(b):
            if finished[i]:
                continue
            rows[i].append(chosen[i])
            if chosen[i] == eos:
                reasons[i], finished[i] = "eos", True
            else:
                lengths[i] = step + 1
                if stop_strings and any(s in text_tokenizer.decode(rows[i]) for s in stop_strings):
                    reasons[i], finished[i] = "stop_string", True
            if finished[i]:
                stopped[i] = True
        if all(finished) or step == max_new_tokens - 1:
            break
        out = model.decode_step(nxt[:, None], cache)
    model.train(was_training)
    sequences = (torch.stack(generated, 1)[..., None].expand(-1, -1, ncb) if generated
                 else input_ids.new_zeros(b, 0, ncb))
    texts = None
    if text_tokenizer is not None:
        texts = []
        for i in range(b):
            texts.append(cut_at_stop_strings(text_tokenizer.decode(rows[i][: lengths[i]]), stop_strings))
    return GenerationOutput(sequences, lengths, reasons, texts, [[] for _ in range(b)])


def prompts_with_images(model: HoVLEForCausalLM, text_tokenizer, questions: Sequence[str],
                        images: Sequence[Any | None], template: str = "vicuna_v1"):
    """(input_ids, pixel_values or None, attention_mask) of left-padded prompts, one question per
    image (a PIL image, or None for a text-only question)."""
    if len(images) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(images)} images")
    cfg = model.config
    prompts = [build_prompt(text_tokenizer, cfg, q, image_placeholder(cfg) if img is not None else None, template)
               for q, img in zip(questions, images, strict=True)]
    ids, _, mask = collate_prompts(prompts, cfg, model.device)
    present = [img for img in images if img is not None]
    pixels = preprocess(present, cfg).to(model.device, model.dtype) if present else None
    return ids, pixels, mask


def chat(model: HoVLEForCausalLM, text_tokenizer, questions: Sequence[str], images: Sequence[Any | None] | None = None,
         *, template: str = "vicuna_v1", stop_strings: Sequence[str] = (), **generate_kwargs: Any) -> GenerationOutput:
    """Answer `questions` (one per PIL image, or text only) in a left-padded batch."""
    images = list(images) if images is not None else [None] * len(questions)
    ids, pixels, mask = prompts_with_images(model, text_tokenizer, questions, images, template)
    return generate(model, ids, pixels, mask, text_tokenizer=text_tokenizer, stop_strings=stop_strings,
                    **generate_kwargs)


__all__ = ["image_placeholder", "generate", "prompts_with_images", "chat"]
