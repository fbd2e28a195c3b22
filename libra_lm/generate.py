"""Generation: prompts in the official templates, and decoding with a KV cache, greedy or
sampled, batched with left padding.

    image = image_segments(image_tok, ["cat.jpg"], model.config)[0]
    prompt = build_prompt(text_tok, model.config, "What is in the image?", image=image)
    out = generate(model, *collate_prompts([prompt], model.config), max_new_tokens=64, text_tokenizer=text_tok)
    out.texts[0]

Rules (the official decoding of modeling_libra_utils.py and demo/libra_demo.ipynb,
docs/official-formats.md#lm-behaviour, without the quirks of docs/official-formats.md#quirks):
- a text position yields one text token, written into both codebook columns (the official
  sampler draws each column separately, so they can differ);
- a position inside an image (BOI or a patch) yields one id per codebook from the vision
  heads; BOI/EOI are not sampled there: after `num_image_tokens` patches EOI is forced;
- EOI is always followed by a forced newline (official: only once a cache exists);
- a row stops at EOS or when its text contains a stop string; finished rows get padding;
- prompt and answer share the model's context (config.max_position_embeddings): a longer
  prompt is refused, and generation stops with reason "length" when the context is full
  (max_new_tokens is clamped to the room left, with a logged warning).
The image path of generation is reached only by a prompt that ends inside an image (BOI as
its last token asks for a new image, as the official `<img_gen>`); generated patches get
zero CLIP features, as the official.

Host synchronisation: the prompt's ids are checked once, by the first forward. Each decoding
step then reads back only the tokens it chose, in one transfer (EOS, stop strings and the
modalities of the next step all come from it); the model's step (`decode_step`) and the
sampling read nothing back.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from . import templates
from .config import LibraConfig
from .model import KVCache
from .segments import Segment, as_joint_ids, concat_segments, image_segment
from .templates import TEMPLATES
from .text import check_text_tokenizer

if TYPE_CHECKING:
    from PIL import Image

    from .model import LibraForCausalLM
    from .text import TextTokenizer

log = logging.getLogger("libra_lm.generate")

IMAGE_TEXT = "<image>"  # what a generated image becomes in decoded text
# torch.multinomial's message for the same condition (sampling here draws as it does).
INVALID_PROBABILITIES = "probability tensor contains either `inf`, `nan` or element < 0"


@dataclass
class GenerationOutput:
    sequences: torch.Tensor  # (B, T, num_codebooks) generated joint ids, padding after a row stops
    lengths: list[int]  # generated tokens per row before EOS (stop strings: see texts)
    stop_reasons: list[str]  # "eos", "stop_string" or "length"
    texts: list[str] | None = None  # decoded text per row (with a text tokenizer), cut at a stop string
    images: list[list[torch.Tensor]] = field(default_factory=list)  # generated images per row: (P, 2) image ids


# ---- prompts --------------------------------------------------------------------------------------
def image_segments(
    image_tokenizer: Any, images: Sequence[Image.Image | str | Path], config: LibraConfig, precision: str = "auto"
) -> list[Segment]:
    """Images (PIL images or paths) -> BOI + patches + EOI prompt segments through a libra_tok
    ImageTokenizer (`preprocess`, then `encode`: ids (B, grid^2, 2), features (B, grid^2, C))."""
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
    text_tokenizer: TextTokenizer,
    config: LibraConfig,
    question: str,
    image: Segment | None = None,
    template: str = "vicuna_v1",
) -> Segment:
    """One prompt in a template of libra_lm.templates, the same parts training uses.

    vicuna_v1 (chat models): <s>{system} USER: [image]\\n{question} ASSISTANT:
    raw (Libra-Base, pretraining layout): <s>[image]\\n{question}
    The image is BOI + patches + EOI; the newline after EOI is the byte token the model
    was trained to put there (the EOI -> newline rule of generation).
    """
    if template not in TEMPLATES:
        raise ValueError(f"template must be one of {TEMPLATES}, got {template!r}")
    check_text_tokenizer(text_tokenizer, config)
    if template == "vicuna_v1":
        parts = templates.vicuna_v1([(question, None)], image_round=0 if image is not None else None)
    else:
        parts = templates.raw(question, with_image=image is not None)
    return concat_segments([s for _, s in templates.encode_parts(parts, text_tokenizer, config, image)], config)


def collate_prompts(prompts: Sequence[Segment], config: LibraConfig, device: str | torch.device | None = None):
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


def sample_checked(
    logits: torch.Tensor, temperature: float, top_p: float, top_k: int, generator: torch.Generator | None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(ids, whether the probabilities were valid (a 0-dim bool tensor; None when greedy)),
    without reading anything back to the host."""
    if temperature == 0:
        return logits.argmax(-1), None
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
    probs = logits.softmax(-1)
    # The draw of torch.multinomial(probs, 1) (an exponential race, the same random numbers),
    # without its validity check, which reads the probabilities back to the host.
    race = torch.empty_like(probs).exponential_(1, generator=generator)
    draws = (probs / race).argmax(-1, keepdim=True)
    valid = (torch.isfinite(probs) & (probs >= 0)).all()
    return draws.view(shape), valid


def sample_logits(
    logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """One id per row of logits (..., V): argmax when temperature is 0, else a draw from
    softmax(logits / temperature) restricted to the top_k ids and the top_p nucleus
    (see check_sampling for the valid values), as torch.multinomial draws it."""
    check_sampling(temperature, top_p, top_k)
    ids, valid = sample_checked(logits, temperature, top_p, top_k, generator)
    if valid is not None and not bool(valid):
        raise RuntimeError(INVALID_PROBABILITIES)
    return ids


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


# ---- decoding ---------------------------------------------------------------------------------------
def prepare_prompts(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, max_new_tokens: int,
                    temperature: float, top_p: float, top_k: int, stop_strings: Sequence[str],
                    text_tokenizer) -> tuple[torch.Tensor, torch.Tensor, int]:
    """The checks every decoder makes before its first forward: (joint ids (B, N, ncb) and the
    attention mask on the model's device, max_new_tokens clamped to the context). Prompts must
    be left-padded and fit the context (config.max_position_embeddings); a longer answer than
    the room left is clamped with a logged warning."""
    cfg = model.config
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    check_sampling(temperature, top_p, top_k)
    if stop_strings and text_tokenizer is None:
        raise ValueError("stop_strings need a text_tokenizer to decode the generated text")
    device = model.device
    input_ids = as_joint_ids(input_ids.to(device), cfg)  # the values are checked by the first forward
    b, n, _ = input_ids.shape
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
    return input_ids, attention_mask, max_new_tokens


def cut_at_stop_strings(text: str, stop_strings: Sequence[str]) -> str:
    """`text` up to the first of `stop_strings` it contains (each tried in turn)."""
    for s in stop_strings:
        if s in text:
            text = text[: text.index(s)]
    return text


@torch.no_grad()
def generate(
    model: LibraForCausalLM,
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
    text_tokenizer: TextTokenizer | None = None,
    generator: torch.Generator | None = None,
) -> GenerationOutput:
    """Continue left-padded prompts (see `collate_prompts`) by up to `max_new_tokens` tokens.

    Prompt and answer must fit the model's context (config.max_position_embeddings): a prompt
    with more real tokens is a ValueError; otherwise max_new_tokens is clamped to the room the
    longest prompt leaves (a logged warning says so) and rows still running when the context is
    full stop with reason "length". temperature 0 is greedy (see check_sampling)."""
    cfg = model.config
    device = model.device
    input_ids, attention_mask, max_new_tokens = prepare_prompts(
        model, input_ids, attention_mask, max_new_tokens, temperature, top_p, top_k, stop_strings, text_tokenizer)
    b, n, ncb = input_ids.shape
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
    finished = [False] * b  # on the host; `stopped` mirrors it on the device
    stopped = torch.zeros(b, dtype=torch.bool, device=device)
    reasons = ["length"] * b
    lengths = [0] * b
    rows: list[list[list[int]]] = [[] for _ in range(b)]  # generated tokens per row, on the host
    generated: list[torch.Tensor] = []
    pad = torch.full((b, ncb), cfg.pad_token_id, dtype=torch.long, device=device)
    newline = torch.full((b, ncb), cfg.newline_token_id, dtype=torch.long, device=device)
    eoi = torch.full((b, ncb), cfg.eoi_token_id, dtype=torch.long, device=device)

    for step in range(max_new_tokens):
        # Rows of the other modality hold only -inf; give them finite dummies (never used).
        text_next, text_ok = sample_checked(_finite_rows(out.text_logits[:, -1]), temperature, top_p, top_k, generator)
        vision_logits = _finite_rows(out.vision_logits[:, -1])
        vision_logits[..., cfg.codebook_size:] = float("-inf")  # image ids only; BOI/EOI come from the rules
        patch_ids, vision_ok = sample_checked(vision_logits, temperature, top_p, top_k, generator)
        nxt = text_next[:, None].expand(b, ncb)
        in_image = image_pos >= 0
        nxt = torch.where(in_image[:, None], patch_ids + cfg.text_vocab_size, nxt)
        nxt = torch.where((in_image & (image_pos >= cfg.num_image_tokens))[:, None], eoi, nxt)
        nxt = torch.where((last[:, 0] == cfg.eoi_token_id)[:, None], newline, nxt)
        nxt = torch.where(stopped[:, None], pad, nxt)
        generated.append(nxt)
        opened = in_image & (nxt[:, 0] != cfg.eoi_token_id)
        image_pos = torch.where(opened, image_pos + 1, -1)
        last = nxt

        # The step's one read-back: the chosen tokens (and whether the sampled distributions were valid).
        if text_ok is None:
            chosen = nxt.tolist()
        else:
            flat = torch.cat([nxt.flatten(), (text_ok & vision_ok).long()[None]]).tolist()
            if not flat[-1]:
                raise RuntimeError(INVALID_PROBABILITIES)
            chosen = [flat[i * ncb:(i + 1) * ncb] for i in range(b)]
        for i in range(b):
            if finished[i]:
                continue
            rows[i].append(chosen[i])
            if chosen[i][0] == eos:
                reasons[i], finished[i] = "eos", True
            else:
                lengths[i] = step + 1
                if stop_strings:
                    text = _decode_row(rows[i], cfg, text_tokenizer, open_images[i])[0]
                    if any(s in text for s in stop_strings):
                        reasons[i], finished[i] = "stop_string", True
            if finished[i]:
                stopped[i] = True  # a fill on the device, no read-back
        if all(finished) or step == max_new_tokens - 1:
            break
        num_vision = sum(row[0] >= cfg.text_vocab_size for row in chosen)
        out = model.decode_step(nxt[:, None], cache, num_vision=num_vision)

    model.train(was_training)
    sequences = torch.stack(generated, 1) if generated else input_ids.new_zeros(b, 0, ncb)
    texts, images = None, []
    for i in range(b):
        text, row_images = _decode_row(rows[i][: lengths[i]], cfg, text_tokenizer, open_images[i])
        images.append(row_images)
        if text_tokenizer is not None:
            texts = texts or []
            texts.append(cut_at_stop_strings(text, stop_strings))
    return GenerationOutput(sequences, lengths, reasons, texts, images)


def _decode_row(
    tokens: Sequence[Sequence[int]], config: LibraConfig, text_tokenizer, open_image: list | None = None
) -> tuple[str, list[torch.Tensor]]:
    """(text with each image as "<image>", list of image ids (P, num_codebooks)) of a row's
    generated tokens (joint ids per position). open_image: the ids of an image the prompt
    started (None if it ended outside one)."""
    text_parts, images, run = [], [], []
    image = list(open_image) if open_image is not None else None
    for token in tokens:
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
    if image:  # an image in progress at the end: keep its ids so far
        images.append(torch.tensor(image, dtype=torch.long).view(-1, config.num_codebooks))
    text_parts.append(text_tokenizer.decode(run) if text_tokenizer else "")
    return "".join(text_parts), images


def chat(
    model: LibraForCausalLM,
    text_tokenizer: TextTokenizer,
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
    prompts = [build_prompt(text_tokenizer, model.config, q, img, template)
               for q, img in zip(questions, images, strict=True)]
    ids, feats, mask = collate_prompts(prompts, model.config, model.device)
    return generate(
        model, ids, feats, mask, text_tokenizer=text_tokenizer, stop_strings=stop_strings, **generate_kwargs
    )


__all__ = [
    "GenerationOutput",
    "image_segments",
    "build_prompt",
    "collate_prompts",
    "check_sampling",
    "sample_logits",
    "sample_checked",
    "INVALID_PROBABILITIES",
    "prepare_prompts",
    "cut_at_stop_strings",
    "generate",
    "chat",
]
