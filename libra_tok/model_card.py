"""Model cards: the README.md of a pushed tokenizer or LM folder (libra_tok.hub_push).

A card is YAML metadata (library name, tags, base models, datasets, licence, pipeline tag;
written by huggingface_hub's ModelCardData so the Hub reads it) and a body: what the model
is and its configuration, how to load it by id, how it was trained (the run's training
options), and the evaluation table when `libra-lm eval` results (or a `libra-tok eval` JSON
summary) are given. Everything here is a pure function of dicts; nothing is read or written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .hub import parse_hub_id

LIBRARY_NAME = "libra"
PAPER = ("[Libra: Building Decoupled Vision System on Large Language Models](https://github.com/YifanXu74/Libra) "
         "(ICML 2024)")
# The Hub repos of CLIP weights that open_clip tags name (the same weights).
OPEN_CLIP_ON_HUB = {("ViT-L-14-336", "openai"): "openai/clip-vit-large-patch14-336",
                    ("ViT-L-14", "openai"): "openai/clip-vit-large-patch14"}
# Keys of an eval results file that are bookkeeping, not scores.
_NOT_SCORES = {"protocol", "versions", "library_versions", "model", "tokenizer", "digests", "failed", "inputs",
               "unparseable", "answers", "config", "created", "date", "time", "seconds", "num_failed", "mode",
               "codebook_size", "id_usage", "unmatched_originals", "unmatched_reconstructions", "limit", "questions",
               "images", "files", "table", "benchmark", "split"}


@dataclass
class CardInfo:
    """What a card says. kind: "tokenizer" or "lm"; meta: the folder's config.json."""

    kind: str
    repo_id: str
    meta: dict[str, Any]
    base_models: list[str] = field(default_factory=list)
    datasets: list[str] = field(default_factory=list)
    license: str | None = None
    tags: list[str] = field(default_factory=list)
    train_config: dict[str, Any] | None = None
    train_summary: dict[str, Any] | None = None  # steps, last losses (the run's metrics.jsonl)
    eval_results: dict[str, Any] | None = None
    files: list[str] = field(default_factory=list)  # what the repo holds, README.md aside


# ---- what can be inferred ---------------------------------------------------------------------------
def _repo_of(ref: Any) -> str | None:
    """The repo id of a Hub id (without its revision), else None."""
    hub = parse_hub_id(ref) if isinstance(ref, str) else None
    return hub.repo_id if hub is not None else None


def infer_base_models(kind: str, meta: dict[str, Any], train_config: dict[str, Any] | None) -> list[str]:
    """Hub repos the model was built from: the run's --init-from, and for a tokenizer its CLIP
    weights (a Hub id, or an open_clip tag whose weights are on the Hub)."""
    found = []
    if train_config and _repo_of(train_config.get("init_from")):
        found.append(_repo_of(train_config["init_from"]))
    if kind == "tokenizer":
        config = meta.get("config", {})
        pretrained = (train_config or {}).get("tokenizer", {}).get("clip_pretrained", config.get("clip_pretrained"))
        clip = _repo_of(pretrained) or OPEN_CLIP_ON_HUB.get((config.get("clip_model"), pretrained))
        if clip:
            found.append(clip)
    return list(dict.fromkeys(found))


def infer_license(base_models: list[str]) -> str | None:
    """The licence a base model imposes, when it is one whose licence is known (LLaMA 2)."""
    if any(m.startswith("meta-llama/Llama-2-") for m in base_models):
        return "llama2"
    return None


# ---- the evaluation table ---------------------------------------------------------------------------
def eval_rows(results: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(benchmark, metric, value) rows of an eval results file: `libra-tok eval --json` (metrics
    per resolution) or `libra-lm eval`'s results.json (scores per task, split or subtask,
    under "tasks"/"results" or at the top level). Bookkeeping (protocol, digests, versions,
    failures) is left out."""
    if results.get("mode") in ("tokenizer", "folders") and isinstance(results.get("metrics"), dict):
        rows = [(f"reconstruction at {res} px", name, value) for res, metrics in results["metrics"].items()
                for name, value in metrics.items() if _is_number(value)]
        rows += [("codes", name, results[name]) for name in ("bits_per_pixel", "bits_per_pixel_entropy")
                 if _is_number(results.get(name))]
        return rows
    scores = next((results[k] for k in ("tasks", "results", "metrics") if isinstance(results.get(k), dict)), results)
    rows: list[tuple[str, str, float]] = []

    def walk(node: Any, path: list[str]) -> None:
        for key, value in node.items():
            if key in _NOT_SCORES:
                continue
            if isinstance(value, dict):
                walk(value, path if key in ("metrics", "scores") else [*path, str(key)])
            elif _is_number(value) and path:
                rows.append(("/".join(path), str(key), float(value)))

    walk(scores, [])
    return rows


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _eval_table(rows: list[tuple[str, str, float]]) -> str:
    lines = ["| benchmark | metric | value |", "|---|---|---:|"]
    lines += [f"| {bench} | {metric} | {value:.4g} |" for bench, metric, value in rows]
    return "\n".join(lines)


# ---- the card ---------------------------------------------------------------------------------------
def _describe(kind: str, meta: dict[str, Any]) -> list[str]:
    config = meta.get("config", {})
    if kind == "tokenizer":
        lines = [
            "A Libra image tokenizer: a frozen CLIP ViT gives the outputs of several blocks, a 1x1 conv and "
            "lookup-free quantization turn each patch into "
            f"{config.get('num_codebooks', 2)} ids of {config.get('codebook_bits', 9)} bits, and a convolutional "
            "decoder maps the ids back to an image.",
            "",
            f"- CLIP: `{config.get('clip_model')}`, feature layers {config.get('feature_layers')}",
            f"- resolution: {config.get('resolution')} px, decoder channels {config.get('ch')} x "
            f"{config.get('ch_mult')}",
        ]
    else:
        image = meta.get("image_tokenizer") or {}
        lines = [
            "A Libra LM: LLaMA with a routed visual expert and the cross-modal bridge, reading images as "
            "discrete ids (with CLIP features) and text as the LLaMA tokens.",
            "",
            f"- hidden size {config.get('hidden_size')}, {config.get('num_hidden_layers')} layers, "
            f"{config.get('num_attention_heads')} heads, text vocabulary {config.get('text_vocab_size')}",
            f"- image: {config.get('num_image_tokens')} tokens x {config.get('num_codebooks')} codebooks of "
            f"{config.get('codebook_size')} ids",
        ]
        if image:
            lines.append(f"- image tokenizer it was trained with: `{image.get('source') or 'source not recorded'}` "
                         f"(weights sha256 `{str(image.get('weights_sha256'))[:16]}`)")
    return lines


def _usage(kind: str, repo_id: str, files: list[str]) -> list[str]:
    if kind == "tokenizer":
        return ["```python", "from libra_tok import ImageTokenizer", "",
                f'tok = ImageTokenizer.from_pretrained("{repo_id}")',
                'ids = tok.encode(tok.preprocess(["cat.jpg"])).ids  # (1, tokens, 2)',
                "images = tok.decode(ids)", "```", "", "```bash",
                f"libra-tok encode images/ --out shards/ --checkpoint {repo_id}", "```"]
    lines = ["```bash", f'libra-lm generate --model {repo_id} --image cat.jpg --prompt "What is in the image?"', "```"]
    if "tokenizer.model" not in files:
        lines += ["", "The repo holds no `tokenizer.model`: pass the text tokenizer with `--text-tokenizer`."]
    return lines


def render_card(info: CardInfo) -> str:
    """README.md of a pushed folder: YAML metadata, then the body."""
    from huggingface_hub import ModelCardData

    tags = [LIBRARY_NAME, "image-tokenizer" if info.kind == "tokenizer" else "vision-language", *info.tags]
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        license=info.license or "other",
        tags=list(dict.fromkeys(tags)),
        base_model=info.base_models or None,
        datasets=info.datasets or None,
        pipeline_tag="image-text-to-text" if info.kind == "lm" else None,
    )
    name = info.repo_id.split("/")[-1]
    body = [f"# {name}", "", *_describe(info.kind, info.meta), "",
            f"Made with the `libra` toolkit, an implementation of {PAPER}.", "", "## Usage", "",
            *_usage(info.kind, info.repo_id, info.files), ""]
    if info.train_config is not None or info.train_summary:
        body += ["## Training", ""]
        if info.train_summary:
            body += [", ".join(f"{k}: {v:.4g}" if isinstance(v, float) else f"{k}: {v}"
                               for k, v in info.train_summary.items()), ""]
        if "loss.png" in info.files:
            body += ["![training loss](loss.png)", ""]
        if info.train_config is not None:
            body += ["The options of the run (`train_config.json`):", "", "```json",
                     json.dumps(info.train_config, indent=2, sort_keys=True), "```", ""]
    if info.eval_results is not None:
        rows = eval_rows(info.eval_results)
        body += ["## Evaluation", ""]
        body += [_eval_table(rows), ""] if rows else ["The results file holds no scores.", ""]
    if info.datasets:
        body += ["## Data", "", *[f"- {d}" for d in info.datasets], ""]
    body += ["## Licence", ""]
    if info.license:
        body += [f"`{info.license}`" + (f"; the weights also follow the licences of {', '.join(info.base_models)}."
                                        if info.base_models else "."), ""]
    else:
        body += ["Not stated (`other`): the weights follow the licences of the models they were built from"
                 + (f" ({', '.join(info.base_models)})" if info.base_models else "") + ".", ""]
    body += ["## Files", "", *[f"- `{f}`" for f in info.files], ""]
    return f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(body)


__all__ = ["CardInfo", "render_card", "eval_rows", "infer_base_models", "infer_license", "LIBRARY_NAME"]
