"""Decoding with a KV cache: greedy or sampled, batched with left padding.

    prompt = build_prompt(text_tok, model.config, "What is in the image?", image=encode_images(image_tok, ["cat.jpg"], model.config)[0])
    out = generate(model, *collate([prompt], model.config), max_new_tokens=64, text_tokenizer=text_tok)
    out.texts[0]

Rules (official behaviour, reference 2.8 and 4, with its inconsistencies removed):
- a text position yields one text token, written into both codebook columns (the official
  sampler draws each column separately, so they can differ);
- a position inside an image (BOI or a patch) yields one code per codebook from the vision
  heads; BOI/EOI are not sampled there: after `num_image_tokens` patches EOI is forced;
- EOI is always followed by a forced newline (official: only once a cache exists);
- a row stops at EOS or when its text contains a stop string; finished rows get padding;
- prompt and answer share the model's context (config.max_position_embeddings): a longer
  prompt is refused, and generation stops with reason "length" when the context is full
  (max_new_tokens is clamped to the room left, with a logged warning).
The image path of generation is reached only by a prompt that ends inside an image (BOI as
its last token asks for a new image, as the official `<img_gen>`); generated patches get
zero CLIP features, as the official.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .config import LibraConfig
from .model import KVCache

if TYPE_CHECKING:
    from PIL import Image

    from .model import LibraForCausalLM
    from .text import TextTokenizer

log = logging.getLogger("libra_lm.generate")

TEMPLATES = ("vicuna_v1", "raw")
# conv_vicuna_v1 (official libra/data/datasets/conversation.py, reference 2.12).
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
IMAGE_TEXT = "<image>"  # what a generated image becomes in decoded text


@dataclass
class Segment:
    """A piece of a sequence: joint ids (n, num_codebooks) and CLIP features (n, C) or None."""

    ids: torch.Tensor
    features: torch.Tensor | None = None


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # (B, T, num_codebooks) generated joint ids, padding after a row stops
    lengths: list[int]  # generated tokens per row before EOS (stop strings: see texts)
    stop_reasons: list[str]  # "eos", "stop_string" or "length"
    texts: list[str] | None = None  # decoded text per row (with a text tokenizer), cut at a stop string
    images: list[list[torch.Tensor]] = field(default_factory=list)  # generated images per row: (P, 2) codes


# ---- prompts --------------------------------------------------------------------------------------
def text_segment(ids: Sequence[int], config: LibraConfig) -> Segment:
    t = torch.as_tensor(list(ids), dtype=torch.long)
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= config.text_vocab_size):
        raise ValueError(f"text ids must lie in [0, {config.text_vocab_size}), got {int(t.min())}..{int(t.max())}")
    return Segment(t[:, None].expand(-1, config.num_codebooks).clone())


def image_segment(codes: torch.Tensor, features: torch.Tensor | None, config: LibraConfig) -> Segment:
    """BOI + patches + EOI from tokenizer codes (P, num_codebooks) in [0, codebook_size) and
    CLIP features (P, C); BOI/EOI get zero features (reference 2.7)."""
    p, ncb = config.num_image_tokens, config.num_codebooks
    if tuple(codes.shape) != (p, ncb):
        raise ValueError(f"image codes must be (num_image_tokens, num_codebooks) = ({p}, {ncb}) for this model, "
                         f"got {tuple(codes.shape)}; the image tokenizer's grid must match the LM config")
    codes = codes.long().cpu()
    if int(codes.min()) < 0 or int(codes.max()) >= config.codebook_size:
        raise ValueError(f"image codes must lie in [0, {config.codebook_size})")
    boi = torch.full((1, ncb), config.boi_token_id)
    eoi = torch.full((1, ncb), config.eoi_token_id)
    ids = torch.cat([boi, codes + config.text_vocab_size, eoi])
    feats = None
    if features is not None:
        c = config.contiguous_signal_size
        if tuple(features.shape) != (p, c):
            raise ValueError(f"image features must be (num_image_tokens, contiguous_signal_size) = ({p}, {c}), got "
                             f"{tuple(features.shape)}; the image tokenizer's feature size must match the LM config")
        zero = torch.zeros(1, c, dtype=features.dtype)
        feats = torch.cat([zero, features.detach().cpu(), zero])
    return Segment(ids, feats)


def encode_images(
    image_tokenizer: Any, images: Sequence["Image.Image | str | Path"], config: LibraConfig, precision: str = "auto"
) -> list[Segment]:
    """Images -> BOI + patches + EOI segments through a libra_tok ImageTokenizer
    (`preprocess`, then `encode`: ids (B, grid^2, 2), features (B, grid^2, C))."""
    tcfg = image_tokenizer.config
    if tcfg.codebook_size != config.codebook_size or tcfg.num_codebooks != config.num_codebooks:
        raise ValueError(
            f"the image tokenizer has {tcfg.num_codebooks} codebooks of {tcfg.codebook_size} ids, the LM expects "
            f"{config.num_codebooks} of {config.codebook_size}"
        )
    pixels = image_tokenizer.preprocess(list(images))
    out = image_tokenizer.encode(pixels, precision=precision)
    return [image_segment(out.ids[i], out.features[i], config) for i in range(out.ids.shape[0])]


def build_prompt(
    text_tokenizer: "TextTokenizer",
    config: LibraConfig,
    question: str,
    image: Segment | None = None,
    template: str = "vicuna_v1",
) -> Segment:
    """One prompt in the official layouts (reference 2.12, 4).

    vicuna_v1 (chat models): <s>{system} USER: [image]\\n{question} ASSISTANT:
    raw (Libra-Base, pretraining layout): <s>[image]\\n{question}
    The image is BOI + patches + EOI; the newline after EOI is the byte token the model
    was trained to put there (the EOI -> newline rule of generation).
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    check_text_tokenizer(text_tokenizer, config)
    tok = text_tokenizer
    pieces: list[Segment] = []
    if template == "vicuna_v1":
        if image is None:
            pieces.append(text_segment(tok.encode(f"{VICUNA_V1_SYSTEM} USER: {question} ASSISTANT:", bos=True), config))
        else:
            pieces += [
                text_segment(tok.encode(f"{VICUNA_V1_SYSTEM} USER:", bos=True), config),
                image,
                text_segment(tok.encode(f"\n{question} ASSISTANT:", prefix_space=False), config),
            ]
    else:
        if image is None:
            pieces.append(text_segment(tok.encode(question, bos=True), config))
        else:
            pieces += [text_segment([tok.bos_token_id], config), image]
            if question:
                pieces.append(text_segment(tok.encode(f"\n{question}", prefix_space=False), config))
    return concat_segments(pieces, config)


def concat_segments(pieces: Sequence[Segment], config: LibraConfig) -> Segment:
    ids = torch.cat([p.ids for p in pieces])
    if all(p.features is None for p in pieces):
        return Segment(ids)
    feats = [
        p.features if p.features is not None else torch.zeros(p.ids.shape[0], config.contiguous_signal_size)
        for p in pieces
    ]
    return Segment(ids, torch.cat([f.float() for f in feats]))


def collate(prompts: Sequence[Segment], config: LibraConfig, device: str | torch.device | None = None):
    """Left-pad prompts into (input_ids (B, N, 2), clip_features (B, N, C) or None,
    attention_mask (B, N)); padding is the pad id with mask 0."""
    if not prompts:
        raise ValueError("no prompts to collate")
    width = max(p.ids.shape[0] for p in prompts)
    b, ncb = len(prompts), config.num_codebooks
    ids = torch.full((b, width, ncb), config.pad_token_id, dtype=torch.long)
    mask = torch.zeros(b, width, dtype=torch.long)
    with_features = any(p.features is not None for p in prompts)
    feats = torch.zeros(b, width, config.contiguous_signal_size) if with_features else None
    for i, p in enumerate(prompts):
        n = p.ids.shape[0]
        ids[i, width - n:] = p.ids
        mask[i, width - n:] = 1
        if p.features is not None:
            feats[i, width - n:] = p.features
    to = (lambda t: t.to(device)) if device is not None else (lambda t: t)
    return to(ids), (to(feats) if feats is not None else None), to(mask)


def check_text_tokenizer(text_tokenizer: "TextTokenizer", config: LibraConfig) -> None:
    if text_tokenizer.vocab_size > config.text_vocab_size:
        raise ValueError(
            f"the text tokenizer has {text_tokenizer.vocab_size} pieces but the LM's text vocabulary is "
            f"{config.text_vocab_size}; use the tokenizer the model was trained with"
        )
    if text_tokenizer.newline_token_id != config.newline_token_id:
        raise ValueError(
            f"the text tokenizer's newline is id {text_tokenizer.newline_token_id}, the LM config says "
            f"{config.newline_token_id} (newline_token_id); use the model's own tokenizer"
        )


# ---- sampling -------------------------------------------------------------------------------------
def check_sampling(temperature: float, top_p: float, top_k: int) -> None:
    """ValueError unless temperature is finite and >= 0, top_p in (0, 1] and top_k >= 0
    (NaN fails every comparison, so each bound is written to reject it)."""
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not top_k >= 0:
        raise ValueError(f"top_k must be >= 0 (0 = no limit), got {top_k}")


def sample_logits(
    logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One id per row of logits (..., V): argmax when temperature is 0, else a draw from
    softmax(logits / temperature) restricted to the top_k ids and the top_p nucleus
    (see check_sampling for the valid values)."""
    check_sampling(temperature, top_p, top_k)
    if temperature == 0:
        return logits.argmax(-1)
    shape = logits.shape[:-1]
    logits = logits.reshape(-1, logits.shape[-1]).float() / temperature
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop ids once the mass before them reaches top_p (the first id always stays).
        drop = probs.cumsum(-1) - probs >= top_p
        logits = logits.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    draws = torch.multinomial(logits.softmax(-1), 1, generator=generator)
    return draws.view(shape)


def _finite_rows(logits: torch.Tensor) -> torch.Tensor:
    return logits.masked_fill(~torch.isfinite(logits).any(-1, keepdim=True), 0.0)


def _image_position(ids: torch.Tensor, config: LibraConfig) -> torch.Tensor:
    """(B,) index inside the open image of each row's last token (0 = BOI), -1 if none is open."""
    n = ids.shape[1]
    pos = torch.arange(n, device=ids.device).expand(ids.shape[0], n)
    col = ids[..., 0]
    last_boi = torch.where(col == config.boi_token_id, pos, -1).max(1).values
    last_eoi = torch.where(col == config.eoi_token_id, pos, -1).max(1).values
    return torch.where(last_boi > last_eoi, n - 1 - last_boi, -1)


@torch.no_grad()
def generate(
    model: "LibraForCausalLM",
    input_ids: torch.Tensor,
    clip_features: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    eos_token_id: int | None = None,
    stop_strings: Sequence[str] = (),
    text_tokenizer: "TextTokenizer | None" = None,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Continue left-padded prompts (see `collate`) by up to `max_new_tokens` tokens.

    Prompt and answer must fit the model's context (config.max_position_embeddings): a prompt
    with more real tokens is a ValueError; otherwise max_new_tokens is clamped to the room the
    longest prompt leaves (a logged warning says so) and rows still running when the context is
    full stop with reason "length". temperature 0 is greedy (see check_sampling)."""
    cfg = model.config
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_sampling(temperature, top_p, top_k)
    if stop_strings and text_tokenizer is None:
        raise ValueError("stop_strings need a text_tokenizer to decode the generated text")
    device = model.device
    input_ids = model.check_input_ids(input_ids.to(device))
    b, n, ncb = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones(b, n, dtype=torch.long, device=device)
    attention_mask = attention_mask.to(device)
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("prompts must be left-padded: the last position of every row must be a real token")
    prompt_length = int(attention_mask.sum(1).max())  # positions count real tokens only
    context = cfg.max_position_embeddings
    if prompt_length > context:
        raise ValueError(f"the prompt has {prompt_length} tokens but the model's context is {context} "
                         f"(max_position_embeddings); shorten the prompt")
    if prompt_length + max_new_tokens > context:
        log.warning("max_new_tokens %d does not fit the model's context of %d tokens after a prompt of %d: "
                    "generating %d at most", max_new_tokens, context, prompt_length, context - prompt_length)
        max_new_tokens = context - prompt_length
    eos = cfg.eos_token_id if eos_token_id is None else eos_token_id
    feats = clip_features.to(device, model.dtype) if clip_features is not None else None

    was_training = model.training
    model.eval()
    cache = KVCache(cfg.num_hidden_layers, capacity=n + max_new_tokens)
    out = model(input_ids, feats, attention_mask, past_key_values=cache, logits_to_keep=1)

    last = input_ids[:, -1]
    image_pos = _image_position(input_ids, cfg)
    # Patches of an image the prompt leaves open belong to the image being generated.
    open_images = [
        None if k < 0 else (input_ids[i, n - k:, :] - cfg.text_vocab_size).tolist()
        for i, k in enumerate(image_pos.tolist())
    ]
    finished = torch.zeros(b, dtype=torch.bool, device=device)
    reasons = ["length"] * b
    lengths = [0] * b
    generated: list[torch.Tensor] = []
    pad = torch.full((b, ncb), cfg.pad_token_id, dtype=torch.long, device=device)
    newline = torch.full((b, ncb), cfg.newline_token_id, dtype=torch.long, device=device)
    eoi = torch.full((b, ncb), cfg.eoi_token_id, dtype=torch.long, device=device)

    for step in range(max_new_tokens):
        # Rows of the other modality hold only -inf; give them finite dummies (never used).
        text_next = sample_logits(_finite_rows(out.text_logits[:, -1]), temperature, top_p, top_k, generator)
        vision_logits = _finite_rows(out.vision_logits[:, -1])
        vision_logits[..., cfg.codebook_size:] = float("-inf")  # codes only; BOI/EOI come from the rules
        codes = sample_logits(vision_logits, temperature, top_p, top_k, generator) + cfg.text_vocab_size
        nxt = text_next[:, None].expand(b, ncb)
        in_image = image_pos >= 0
        nxt = torch.where(in_image[:, None], codes, nxt)
        nxt = torch.where((in_image & (image_pos >= cfg.num_image_tokens))[:, None], eoi, nxt)
        nxt = torch.where((last[:, 0] == cfg.eoi_token_id)[:, None], newline, nxt)
        nxt = torch.where(finished[:, None], pad, nxt)
        generated.append(nxt)

        is_eos = ~finished & (nxt[:, 0] == eos)
        for i in is_eos.nonzero().flatten().tolist():
            reasons[i] = "eos"
        if stop_strings:
            for i in (~finished & ~is_eos).nonzero().flatten().tolist():
                text = _decode_row(torch.stack(generated, 1)[i], cfg, text_tokenizer, open_images[i])[0]
                if any(s in text for s in stop_strings):
                    reasons[i] = "stop_string"
                    finished[i] = True
                    lengths[i] = step + 1
        for i in (~finished & ~is_eos).nonzero().flatten().tolist():
            lengths[i] = step + 1
        finished |= is_eos
        opened = in_image & (nxt[:, 0] != cfg.eoi_token_id)
        image_pos = torch.where(opened, image_pos + 1, -1)
        last = nxt
        if bool(finished.all()) or step == max_new_tokens - 1:
            break
        attention_mask = torch.cat([attention_mask, torch.ones_like(attention_mask[:, :1])], 1)
        out = model(nxt[:, None], None, attention_mask, past_key_values=cache)

    model.train(was_training)
    sequences = torch.stack(generated, 1) if generated else input_ids.new_zeros(b, 0, ncb)
    texts, images = None, []
    for i in range(b):
        text, row_images = _decode_row(sequences[i, : lengths[i]], cfg, text_tokenizer, open_images[i])
        images.append(row_images)
        if text_tokenizer is not None:
            texts = texts or []
            for s in stop_strings:
                if s in text:
                    text = text[: text.index(s)]
            texts.append(text)
    return GenerationOutput(sequences, lengths, reasons, texts, images)


def _decode_row(
    ids: torch.Tensor, config: LibraConfig, text_tokenizer, open_image: list | None = None
) -> tuple[str, list[torch.Tensor]]:
    """(text with each image as "<image>", list of image codes (P, num_codebooks)).
    open_image: codes of an image the prompt started (None if it ended outside one)."""
    text_parts, images, run = [], [], []
    image = list(open_image) if open_image is not None else None
    for token in ids.tolist():
        t = token[0]
        if t < config.text_vocab_size:
            if image is not None:  # an image cut short (length limit) is dropped
                image = None
            run.append(t)
        elif t == config.boi_token_id:
            image = []
        elif t == config.eoi_token_id:
            if image is not None:
                text_parts.append(text_tokenizer.decode(run) if text_tokenizer else "")
                text_parts.append(IMAGE_TEXT)
                run = []
                images.append(torch.tensor(image, dtype=torch.long).view(-1, config.num_codebooks))
            image = None
        elif image is not None:
            image.append([c - config.text_vocab_size for c in token])
    if image:  # an image in progress at the end: keep its codes so far
        images.append(torch.tensor(image, dtype=torch.long).view(-1, config.num_codebooks))
    text_parts.append(text_tokenizer.decode(run) if text_tokenizer else "")
    return "".join(text_parts), images


def chat(
    model: "LibraForCausalLM",
    text_tokenizer: "TextTokenizer",
    questions: Sequence[str],
    images: Sequence[Segment | None] | None = None,
    *,
    template: str = "vicuna_v1",
    stop_strings: Sequence[str] = (),
    **generate_kwargs: Any,
) -> GenerationOutput:
    """Answer `questions` (one per image segment, or text only) in a left-padded batch."""
    images = list(images) if images is not None else [None] * len(questions)
    if len(images) != len(questions):
        raise ValueError(f"{len(questions)} questions but {len(images)} images")
    prompts = [build_prompt(text_tokenizer, model.config, q, img, template) for q, img in zip(questions, images)]
    ids, feats, mask = collate(prompts, model.config, model.device)
    return generate(
        model, ids, feats, mask, text_tokenizer=text_tokenizer, stop_strings=stop_strings, **generate_kwargs
    )


__all__ = [
    "TEMPLATES",
    "VICUNA_V1_SYSTEM",
    "Segment",
    "GenerationOutput",
    "text_segment",
    "image_segment",
    "encode_images",
    "build_prompt",
    "concat_segments",
    "collate",
    "check_sampling",
    "sample_logits",
    "generate",
    "chat",
]
