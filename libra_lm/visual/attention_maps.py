"""Attention analysis (paper §4.4, Fig. 4; the computation of Fig. 7 / App. B.2): where the
answer of a VQA sample looks in the image, per layer and head, and how much those attention
patterns differ across layers and across the heads of a layer.

    rows = last_token_attention(model, input_ids, clip_features)      # (L, B, H, N)
    out = answer_attention(model, prompts, answers=[None, ...])       # .maps (L, B, H, P) on the patches
    cross, inner = attention_differences(out.maps)                    # (L,), (L,)

The answer token's attention row: the probabilities with which the answer token, fed as the
next input after the prompt, attends to every earlier position, per layer and head. It is
computed for that one query row only: the prompt runs through the model once, filling a KV
cache (with any attention backend), then the answer token alone; the model's attention probe
(`LibraForCausalLM.attention_probe`) hands over its query and the cached keys of both views
(after RoPE), from which the row is one matrix-vector product per layer: O(N) time and memory,
no N x N matrix. It equals the row of the eager backend's full attention probabilities
(tests/test_visual_attention.py).

The differences (Fig. 7), for maps A of shape (L, B, H, N) (layers, samples, heads, patches),
after A <- A / max(A) (the global maximum over everything):
  cross-layer  C_l = mean_{b,n} | Ā_lbn − mean_l' Ā_l'bn |,  Ā = mean_h A   (Fig. 4 b caption:
               "each layer's attention score (averaged across all heads)"); `cross_layer=
               "per-head"` keeps the heads as the pseudo code does: mean_{b,h,n} |A_lbhn − mean_l' A_l'bhn|
  inner-layer  I_l = mean_{b,h,n} | A_lbhn − mean_h' A_lbh'n |
The pseudo code of Fig. 7 slips in its shapes, and this follows its stated intent: its means
drop the reduced dimension (`attn_maps.mean(dim=0)` is commented "(1,B,H,N)" but is (B,H,N);
`attn.mean(dim=1)` is commented "(B,1,N)" but is (B,N), which then broadcasts against (B,H,N)
along the wrong axis), and its chains `.mean(dim=1).mean(dim=2).mean(dim=3)` index dimensions
the earlier means already removed (the third call fails); the intent is the mean over every
dimension but the layer. Over many samples the maxima and means are accumulated, so the result
is that of the whole set in one tensor (the normalisation by a global maximum is one division
at the end).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from tqdm.auto import tqdm

from libra_tok.fileio import atomic_write_json, check_output_folder
from libra_tok.jsonl import iter_json_lines
from libra_tok.preprocess import to_pil

from ..generate import build_prompt, collate_prompts
from ..model import KVCache
from ..segments import Segment, image_segment
from .pictures import check_tokenizer_fits
from .plots import plot_differences, save_heatmaps
from .sampling import grid_side

if TYPE_CHECKING:
    from ..model import LibraForCausalLM
    from ..text import TextTokenizer

CROSS_LAYER_MODES = ("heads-mean", "per-head")


# ---- the answer token's attention row -----------------------------------------------------------------
@contextlib.contextmanager
def probing(model: LibraForCausalLM, probe: Callable) -> Iterator[None]:
    """Install `probe` as the model's attention probe for the duration of the block."""
    previous = model.attention_probe
    model.attention_probe = probe
    try:
        yield
    finally:
        model.attention_probe = previous


def row_attention(q: torch.Tensor, k: torch.Tensor, k_x: torch.Tensor, is_vision: torch.Tensor,
                  key_padding_mask: torch.Tensor | None = None) -> torch.Tensor:
    """(B, H, Nk) fp32: the attention probabilities of the last query of `q` (B, H, Nq, d),
    which is the last key, over the keys k, k_x (B, H, Nk, d) as `bridged_attention` computes
    them: keys of the query's own modality plain, the others bridged, scale 1/sqrt(d), one
    softmax over the real keys (every key is at or before the last one: no causal mask)."""
    d = q.shape[-1]
    query = q[:, :, -1, :, None]  # (B, H, d, 1)
    same = (is_vision == is_vision[:, -1:])[:, None, :, None]  # (B, 1, Nk, 1)
    keys = torch.where(same, k, k_x)  # (B, H, Nk, d): O(N) per layer
    scores = (torch.matmul(keys, query)[..., 0] / math.sqrt(d)).float()
    if key_padding_mask is not None:
        scores = scores.masked_fill(~key_padding_mask[:, None, :], float("-inf"))
    return torch.softmax(scores, dim=-1)


def _probed_step(model: LibraForCausalLM, cache: KVCache, tokens: torch.Tensor, features: torch.Tensor | None,
                 attention_mask: torch.Tensor):
    """Feed `tokens` (B, 1, num_codebooks) after the cached positions and return the attention
    rows of that one position, (L, B, H, past + 1), with the model's output."""
    rows: list[torch.Tensor | None] = [None] * model.config.num_hidden_layers

    def probe(layer, q, k, k_x, is_vision, key_padding_mask):
        rows[layer] = row_attention(q, k, k_x, is_vision, key_padding_mask)

    with probing(model, probe):
        out = model(tokens, features, attention_mask, past_key_values=cache)
    return torch.stack(rows), out


@torch.no_grad()
def last_token_attention(
    model: LibraForCausalLM,
    input_ids: torch.Tensor,
    clip_features: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """(L, B, H, N) fp32: the attention probabilities of each row's last position over all N
    positions, per layer and head (0 at padding), computed for that one query row only: the
    first N - 1 positions fill a KV cache, then the last one runs alone with the probe on.
    input_ids (B, N, num_codebooks) joint ids, left-padded (see `collate_prompts`)."""
    input_ids = model.check_input_ids(input_ids.to(model.device))
    b, n, _ = input_ids.shape
    if n < 2:
        raise ValueError("the sequence needs at least two positions: a context and the query")
    if attention_mask is None:
        attention_mask = torch.ones(b, n, dtype=torch.long, device=model.device)
    attention_mask = attention_mask.to(model.device)
    if not bool(attention_mask[:, -1].all()):
        raise ValueError("the last position of every row must be a real token (pad on the left)")
    feats = clip_features.to(model.device, model.dtype) if clip_features is not None else None
    was_training = model.training
    model.eval()
    cache = KVCache(model.config.num_hidden_layers, capacity=n)
    model(input_ids[:, :-1], feats[:, :-1] if feats is not None else None, attention_mask[:, :-1],
          past_key_values=cache)
    rows, _ = _probed_step(model, cache, input_ids[:, -1:], feats[:, -1:] if feats is not None else None,
                           attention_mask)
    model.train(was_training)
    return rows


@dataclass
class AnswerAttention:
    maps: torch.Tensor  # (L, B, H, P) fp32: the answer token's attention on each image patch
    answer_ids: list[int]  # the answer token of each row (a text id)


@torch.no_grad()
def answer_attention(model: LibraForCausalLM, prompts: Sequence[Segment],
                     answers: Sequence[int | None] | None = None) -> AnswerAttention:
    """The attention of each prompt's answer token on the patches of its image (one image per
    prompt; the prompt ends where the answer starts, e.g. "... ASSISTANT:"). The answer token is
    `answers[i]` when given (a text id, e.g. the first token of a single-word answer), else the
    model's greedy first token. The rows run as one left-padded batch."""
    cfg = model.config
    answers = list(answers) if answers is not None else [None] * len(prompts)
    if len(answers) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(answers)} answers")
    for i, p in enumerate(prompts):
        col = p.ids[:, 0]
        if int((col == cfg.boi_token_id).sum()) != 1 or int((col == cfg.eoi_token_id).sum()) != 1:
            raise ValueError(f"prompt {i} must hold exactly one image (BOI ... EOI)")
        if int(col[-1]) >= cfg.text_vocab_size:
            raise ValueError(f"prompt {i} ends inside or at its image; the answer follows text (e.g. \"ASSISTANT:\")")
    for a in answers:
        if a is not None and not 0 <= a < cfg.text_vocab_size:
            raise ValueError(f"an answer token must be a text id in [0, {cfg.text_vocab_size}), got {a}")
    ids, feats, mask = collate_prompts(prompts, cfg, model.device)
    if feats is not None:
        feats = feats.to(model.dtype)
    b, n, ncb = ids.shape
    was_training = model.training
    model.eval()
    cache = KVCache(cfg.num_hidden_layers, capacity=n + 1)
    out = model(ids, feats, mask, past_key_values=cache, logits_to_keep=1)
    greedy = out.text_logits[:, -1].argmax(-1).tolist()
    chosen = [a if a is not None else g for a, g in zip(answers, greedy, strict=True)]
    tokens = torch.tensor(chosen, device=model.device)[:, None, None].expand(b, 1, ncb)
    step_mask = torch.cat([mask, mask.new_ones(b, 1)], 1)
    rows, _ = _probed_step(model, cache, tokens, None, step_mask)
    model.train(was_training)
    col = ids[..., 0]
    is_patch = (col >= cfg.text_vocab_size) & (col < cfg.boi_token_id)  # (B, n): P patches per row
    maps = torch.stack([rows[:, i, :, :n][:, :, is_patch[i]] for i in range(b)], 1)
    return AnswerAttention(maps, chosen)


# ---- the differences of Fig. 4 b, c -------------------------------------------------------------------
class DifferenceAccumulator:
    """The cross-layer and inner-layer differences (module docstring) over samples added in
    any number of batches: equal to `attention_differences` of all of them at once."""

    def __init__(self, cross_layer: str = "heads-mean"):
        if cross_layer not in CROSS_LAYER_MODES:
            raise ValueError(f"cross_layer must be one of {CROSS_LAYER_MODES}, got {cross_layer!r}")
        self.cross_layer = cross_layer
        self.cross_sum: torch.Tensor | None = None  # (L,) float64, sums over samples of unnormalised means
        self.inner_sum: torch.Tensor | None = None
        self.count = 0
        self.max = 0.0

    def add(self, maps: torch.Tensor) -> None:
        """maps (L, B, H, N): attention of B samples, not normalised."""
        if maps.ndim != 4:
            raise ValueError(f"attention maps must be (L, B, H, N), got shape {tuple(maps.shape)}")
        a = maps.detach().double().cpu()
        if self.cross_sum is not None and a.shape[0] != self.cross_sum.shape[0]:
            raise ValueError(f"maps of {a.shape[0]} layers added to maps of {self.cross_sum.shape[0]}")
        # Per sample and layer, the mean over heads and positions of the absolute differences; the
        # division by the global maximum comes at the end (|x/m - y/m| = |x - y| / m).
        if self.cross_layer == "heads-mean":
            layer = a.mean(2)  # (L, B, N): each layer's attention averaged over its heads
            cross = (layer - layer.mean(0, keepdim=True)).abs().mean(2).sum(1)
        else:
            cross = (a - a.mean(0, keepdim=True)).abs().mean((2, 3)).sum(1)
        inner = (a - a.mean(2, keepdim=True)).abs().mean((2, 3)).sum(1)
        self.cross_sum = cross if self.cross_sum is None else self.cross_sum + cross
        self.inner_sum = inner if self.inner_sum is None else self.inner_sum + inner
        self.count += a.shape[1]
        self.max = max(self.max, float(a.max()))

    def result(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-layer (L,), inner-layer (L,)) float64, averaged over the samples."""
        if self.cross_sum is None or self.count == 0:
            raise ValueError("no attention maps were added")
        if not self.max > 0:
            raise ValueError("the attention maps are all zero: nothing to normalise by")
        scale = self.count * self.max
        return self.cross_sum / scale, self.inner_sum / scale


def attention_differences(maps: torch.Tensor, cross_layer: str = "heads-mean") -> tuple[torch.Tensor, torch.Tensor]:
    """Fig. 7's (cross-layer (L,), inner-layer (L,)) differences of maps (L, B, H, N) (module docstring)."""
    acc = DifferenceAccumulator(cross_layer)
    acc.add(maps)
    return acc.result()


# ---- VQA samples, one model's analysis, the report ------------------------------------------------------
@dataclass
class Question:
    question_id: str
    image: str  # relative to the images folder
    text: str
    answer: str | None = None  # a given (single-word) answer; None = the model's first token


def read_questions(path: str | Path, limit: int | None = None) -> list[Question]:
    """VQA questions as JSON lines (LLaVA's evaluation files): "image" and "text" (or
    "question") required, "question_id" (or "id"; default: the line number) and "answer"
    optional. The first `limit` questions."""
    path = Path(path)
    questions = []
    if not path.is_file():
        raise FileNotFoundError(f"questions file {path} does not exist")
    for number, record in iter_json_lines(path, 'objects with "image" and "text" (LLaVA question lines)'):
        text = record.get("text", record.get("question"))
        if not isinstance(record.get("image"), str) or not isinstance(text, str):
            raise ValueError(f"{path}:{number}: a question needs \"image\" (a file name) and \"text\" or "
                             "\"question\" (strings)")
        answer = record.get("answer")
        if answer is not None and not (isinstance(answer, str) and answer.strip()):
            raise ValueError(f"{path}:{number}: \"answer\" must be a non-empty string")
        qid = record.get("question_id", record.get("id", number))
        questions.append(Question(str(qid), record["image"], text, answer))
        if limit is not None and len(questions) >= limit:
            break
    if not questions:
        raise ValueError(f"{path} holds no questions")
    return questions


def default_heatmap_layers(num_layers: int, count: int = 4) -> list[int]:
    """`count` layers (0-based) evenly spaced from the first to the last."""
    if num_layers <= count:
        return list(range(num_layers))
    return sorted({round(i * (num_layers - 1) / (count - 1)) for i in range(count)})


@dataclass
class ModelAttention:
    """One model's analysis: the difference curves and what was looked at."""

    label: str
    source: str
    num_layers: int
    num_heads: int
    samples: int
    global_max: float
    cross_layer: list[float]
    inner_layer: list[float]
    answers: list[dict[str, Any]] = field(default_factory=list)  # question_id, answer token, given or generated
    heatmaps: list[Path] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"label": self.label, "model": self.source, "layers": self.num_layers, "heads": self.num_heads,
                "samples": self.samples, "global_max": self.global_max, "cross_layer": self.cross_layer,
                "inner_layer": self.inner_layer, "answers": self.answers}


def analyse_model(
    model: LibraForCausalLM,
    text_tokenizer: TextTokenizer,
    image_tokenizer: Any,
    questions: Sequence[Question],
    images_dir: str | Path,
    *,
    label: str,
    source: str = "",
    template: str = "vicuna_v1",
    batch_size: int = 4,
    cross_layer: str = "heads-mean",
    heatmap_dir: str | Path | None = None,
    heatmap_samples: int = 4,
    heatmap_layers: Sequence[int] | None = None,
    progress: bool = True,
) -> ModelAttention:
    """The answer attention of every question (its image through the image tokenizer, ids and
    CLIP features, in the prompt `template`), the differences over all of them, and heatmaps
    of the first `heatmap_samples` questions at `heatmap_layers` (0-based; default 4 layers
    from the first to the last) in `heatmap_dir`."""
    cfg = model.config
    check_tokenizer_fits(image_tokenizer, cfg)
    images_dir = Path(images_dir)
    missing = [q.image for q in questions if not (images_dir / q.image).is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} image(s) of the questions are not in {images_dir}, e.g. "
                                f"{missing[0]!r}; --images must be the folder the questions' \"image\" names refer to")
    layers = list(heatmap_layers) if heatmap_layers is not None else default_heatmap_layers(cfg.num_hidden_layers)
    bad = [layer for layer in layers if not 0 <= layer < cfg.num_hidden_layers]
    if bad:
        raise ValueError(f"heatmap layer {bad[0] + 1} does not exist: {label} has {cfg.num_hidden_layers} layers")
    grid = grid_side(cfg)
    acc = DifferenceAccumulator(cross_layer)
    answers: list[dict[str, Any]] = []
    heatmaps: list[Path] = []
    bar = tqdm(total=len(questions), desc=f"attention {label}", disable=not progress)
    for start in range(0, len(questions), batch_size):
        batch = questions[start:start + batch_size]
        pixels = image_tokenizer.preprocess([images_dir / q.image for q in batch])
        encoded = image_tokenizer.encode(pixels)
        prompts = [build_prompt(text_tokenizer, cfg, q.text, image_segment(encoded.ids[i], encoded.features[i], cfg),
                                template) for i, q in enumerate(batch)]
        given = [_answer_token(text_tokenizer, q.answer) if q.answer else None for q in batch]
        result = answer_attention(model, prompts, given)
        acc.add(result.maps)
        for i, q in enumerate(batch):
            token = result.answer_ids[i]
            answers.append({"question_id": q.question_id, "answer_token": token,
                            "answer_piece": text_tokenizer.decode([token]), "given": given[i] is not None})
            if heatmap_dir is not None and start + i < heatmap_samples:
                maps = result.maps[layers, i].mean(1).view(len(layers), grid, grid)  # heads averaged
                picture = to_pil(image_tokenizer.target(pixels[i:i + 1])[0])
                title = f"{label}: {q.text.splitlines()[0][:80]} -> {text_tokenizer.decode([token]).strip()!r}"
                heatmaps.append(save_heatmaps(Path(heatmap_dir) / f"{_safe_name(q.question_id)}.png", picture,
                                              maps, [layer + 1 for layer in layers], title))
        bar.update(len(batch))
    bar.close()
    cross, inner = acc.result()
    return ModelAttention(label, source, cfg.num_hidden_layers, cfg.num_attention_heads, acc.count, acc.max,
                          cross.tolist(), inner.tolist(), answers, heatmaps)


def _answer_token(text_tokenizer: TextTokenizer, answer: str) -> int:
    """The first token of a given answer, tokenized as it follows "ASSISTANT:" (with its space)."""
    ids = text_tokenizer.encode(answer.strip())
    if not ids:
        raise ValueError(f"the answer {answer!r} has no tokens")
    return ids[0]


def _safe_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in name)[:100] or "sample"


def write_attention_report(out_dir: str | Path, results: Sequence[ModelAttention], cross_layer: str) -> dict[str, Path]:
    """`attention.json` (per-layer curves of every model, with the definitions) and
    `attention_differences.png` (Fig. 4 b, c: every model on each panel) in `out_dir`."""
    out = check_output_folder(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = {
        "cross_layer_definition": (
            "mean over samples and patches of |mean_h A_l - mean_l mean_h A| (Fig. 4 b caption)"
            if cross_layer == "heads-mean" else "mean over samples, heads and patches of |A_l - mean_l A|"),
        "inner_layer_definition": "mean over samples, heads and patches of |A_lh - mean_h A_l|",
        "normalisation": "A / max(A), the maximum over all samples, layers, heads and patches of a model",
        "attention": "the answer token's attention probabilities on the image patches (Fig. 7)",
        "cross_layer_mode": cross_layer,
        "models": [r.to_json() for r in results],
    }
    atomic_write_json(out / "attention.json", report)
    plot = plot_differences(results, out / "attention_differences.png")
    return {"json": out / "attention.json", "plot": plot}


__all__ = [
    "CROSS_LAYER_MODES",
    "probing",
    "row_attention",
    "last_token_attention",
    "AnswerAttention",
    "answer_attention",
    "DifferenceAccumulator",
    "attention_differences",
    "Question",
    "read_questions",
    "default_heatmap_layers",
    "ModelAttention",
    "analyse_model",
    "write_attention_report",
]
