"""State dicts of other layouts -> ours, as pure dict -> dict functions (no model class).

Official Libra folders and HF LLaMA folders use our parameter names already
(docs/official-formats.md#lm-folder), so converting is dropping what carries no weights of
ours, tying embeddings, and knowing which of our parameters a layout cannot provide:
  official   placeholder buffers and rotary `inv_freq` dropped; every other key is ours
  HF LLaMA   rotary `inv_freq` dropped; a tied `lm_head` copied from the embedding; every
             parameter with "vision" in its name is fresh (initialised as the official
             init, `LibraPreTrainedModel._init_weights` in libra/models/libra/modeling_libra.py)
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

KINDS = ("ours", "official", "llama")
# Official buffers that hold constants the model recomputes (official modeling_libra.py).
OFFICIAL_IGNORED_NAMES = frozenset({
    "naive_placeholder",
    "vision_logits_placeholder",
    "language_logits_placeholder",
    "eoi_to_newline_logits_placeholder",
    "vision_hidden_placeholder",  # a parameter, but unused in the released "1d" mode
})
_ROTARY = re.compile(r"(^|\.)rotary_emb\.inv_freq$")


def is_ignored_key(key: str) -> bool:
    """Keys of official / HF folders that carry no weights of ours."""
    return bool(_ROTARY.search(key)) or key.rsplit(".", 1)[-1] in OFFICIAL_IGNORED_NAMES


def to_ours(state: dict[str, Any], kind: str) -> dict[str, Any]:
    """One file's state dict of `kind` ("ours", "official", "llama") with our keys only."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; one of {KINDS}")
    if kind == "ours":
        return dict(state)
    return {k: v for k, v in state.items() if not is_ignored_key(k)}


def tie_embeddings(state: dict[str, Any]) -> dict[str, Any]:
    """An HF LLaMA with tie_word_embeddings stores no `lm_head.weight`: it is the embedding."""
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        return {**state, "lm_head.weight": state["model.embed_tokens.weight"].clone()}
    return state


def key_sources(keys: Iterable[str], kind: str, tied_embeddings: bool = False) -> dict[str, str]:
    """Our key -> the key of a checkpoint of `kind` that holds it, for readers that fetch
    tensors one at a time: `to_ours` and `tie_embeddings` on names instead of tensors."""
    if kind not in KINDS:
        raise ValueError(f"unknown checkpoint kind {kind!r}; one of {KINDS}")
    sources = {k: k for k in keys if kind == "ours" or not is_ignored_key(k)}
    if tied_embeddings and "lm_head.weight" not in sources and "model.embed_tokens.weight" in sources:
        sources["lm_head.weight"] = "model.embed_tokens.weight"
    return sources


def fresh_keys(keys: Iterable[str], kind: str) -> list[str]:
    """Our parameters that a checkpoint of `kind` does not hold and that are initialised
    instead (HF LLaMA: the visual expert, bridges, vision embeddings, norms and heads)."""
    return [k for k in keys if kind == "llama" and "vision" in k]


__all__ = ["KINDS", "OFFICIAL_IGNORED_NAMES", "is_ignored_key", "to_ours", "tie_embeddings", "key_sources",
           "fresh_keys"]
