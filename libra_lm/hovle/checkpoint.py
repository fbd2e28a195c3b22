"""HoVLE folders on disk, building HoVLE on an existing LLaMA, and the stage-1 teacher of a Libra folder.

    ours     config.json {"format": "libra-hovle", "config": {...}} + model.safetensors
    from_llm the LLaMA of an HF LLaMA folder or the text half of a Libra folder (ours or official),
             read through libra_lm.checkpoint / libra_lm.convert; a fresh module in front
    teacher  a Libra folder's hybrid-input projection (RMSNorm([E1(id1) | E2(id2) | CLIP]) -> Linear,
             libra_lm.model.LibraModel.embed), frozen: the stage-1 target at image positions
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from libra_tok.fileio import atomic_save_safetensors, atomic_write_json
from libra_tok.hub import LM, resolve
from libra_tok.weight_files import CheckpointError, key_problems, read_state_dict, sample_keys

from ..checkpoint import (
    CONFIG_FILE,
    WEIGHTS_FILE,
    folder_config,
    read_config_json,
    weight_files,
)
from ..convert import tie_embeddings, to_ours
from ..model import LibraModel
from ..routing import Router
from .config import HoVLEConfig, from_llama_fields
from .embedding import resize_positions

FORMAT_NAME = "libra-hovle"
FORMAT_VERSION = 1
POSITIONS_KEY = "embedding_model.patch_embed.position_embedding"


def is_hovle_folder(folder: str | Path) -> bool:
    """Whether a local folder's config.json is a HoVLE one (what `libra-lm generate` / `eval` dispatch on)."""
    path = Path(folder) / CONFIG_FILE
    try:
        return json.loads(path.read_text()).get("format") == FORMAT_NAME
    except (OSError, ValueError, AttributeError):
        return False


def save_pretrained(model: nn.Module, path: str | Path, *, image_tokenizer: dict[str, Any] | None = None) -> Path:
    """config.json + model.safetensors, each atomically (weights first). `image_tokenizer`: the
    identity of the tokenizer of the shards the model was trained on (its sequences' layout)."""
    from libra_tok import __version__

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(model.state_dict(), path / WEIGHTS_FILE, metadata={"format": "pt"})
    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "libra_version": __version__,
            "config": model.config.to_dict()}
    if image_tokenizer is not None:
        meta["image_tokenizer"] = image_tokenizer
    atomic_write_json(path / CONFIG_FILE, meta)
    return path


def read_hovle_config(folder: Path, **overrides: Any) -> HoVLEConfig:
    meta = read_config_json(folder)
    if meta.get("format") != FORMAT_NAME:
        raise CheckpointError(f"{folder / CONFIG_FILE} is not a HoVLE folder (format {meta.get('format')!r}, expected "
                              f"{FORMAT_NAME!r}); build one on an LLM with HoVLEForCausalLM.from_llm")
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{folder} was written by a newer libra (format {meta['format_version']}); upgrade")
    config = HoVLEConfig.from_dict(meta["config"])
    return config.replace(**overrides) if overrides else config


def load_pretrained(model_class: type[nn.Module], path: str | Path, *, device=None, dtype=None,
                    **overrides: Any) -> nn.Module:
    """The model of a HoVLE folder (or Hub id); an `image_size` override resizes the position
    embedding bicubically."""
    folder = resolve(path, LM)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    config = read_hovle_config(folder, **overrides)
    device, dtype = torch.device(device or "cpu"), dtype or torch.float32
    with torch.device("meta"):
        model = model_class(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    state = {}
    for file in weight_files(folder):
        state.update(read_state_dict(file))
    if POSITIONS_KEY in state and tuple(state[POSITIONS_KEY].shape) != expected[POSITIONS_KEY]:
        state[POSITIONS_KEY] = resize_positions(state[POSITIONS_KEY], config.patch_grid, config.patch_grid)
    mismatched = [f"{k}: expected {expected[k]}, found {tuple(v.shape)}" for k, v in state.items()
                  if k in expected and tuple(v.shape) != expected[k]]
    problems = key_problems([k for k in expected if k not in state], [k for k in state if k not in expected],
                            mismatched)
    if problems:
        raise CheckpointError(f"weights in {folder} do not fit its HoVLE config: " + " | ".join(problems))
    model.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in state.items()}, assign=True)
    return model.train(False)


def llm_config(path: str | Path) -> tuple[Path, str, Any]:
    """(folder, kind "ours" / "official" / "llama", its LibraConfig) of an LLM folder or Hub id."""
    folder, config, kind, _ = folder_config(path)
    return folder, kind, config


def llm_state(folder: Path, kind: str, *, tied: bool = False, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The plain LLaMA weights of a folder (every key without "vision"), HF LLaMA names."""
    state = {}
    for file in weight_files(folder):
        for key, tensor in to_ours(read_state_dict(file, trust_pickle=trust_pickle), kind).items():
            if "vision" not in key:
                state[key] = tensor
    return tie_embeddings(state) if tied else state


def load_llm(model_class: type[nn.Module], path: str | Path, config: HoVLEConfig | None = None, *,
             preset: str = "hovle-tiny", device=None, dtype=None, trust_pickle: bool = False,
             **overrides: Any) -> nn.Module:
    """A fresh module (seeded by the caller) in front of the LLaMA of `path`; the module's
    token table starts as a copy of the LLM's. Without `config`, the module is `preset`'s on
    the LLM's sizes (libra_lm.hovle.config.from_llama_fields)."""
    folder, kind, libra_config = llm_config(path)
    if config is None:
        config = from_llama_fields(libra_config, preset, **overrides)
    elif overrides:
        config = config.replace(**overrides)
    tied = kind == "llama" and bool(read_config_json(folder).get("tie_word_embeddings", False))
    state = llm_state(folder, kind, tied=tied, trust_pickle=trust_pickle)
    model = model_class(config)
    target = model.language_model
    expected = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    mismatched = [f"{k}: expected {expected[k]}, found {tuple(v.shape)}" for k, v in state.items()
                  if k in expected and tuple(v.shape) != expected[k]]
    problems = key_problems([k for k in expected if k not in state], [k for k in state if k not in expected],
                            mismatched)
    if problems:
        raise CheckpointError(f"the LLaMA in {folder} does not fit HoVLE with hidden_size {config.hidden_size}, "
                              f"{config.num_hidden_layers} layers, text vocab {config.text_vocab_size}: "
                              + " | ".join(problems))
    target.load_state_dict(state)
    with torch.no_grad():
        model.embedding_model.embed_tokens.weight.copy_(target.model.embed_tokens.weight)
    return model.to(device=torch.device(device or "cpu"), dtype=dtype or torch.float32).train(False)


class LibraInputTeacher(nn.Module):
    """The hybrid-input projection of a trained Libra model, frozen: image ids and CLIP features
    of a patch -> the Libra LLM's input embedding of that patch. It holds only the three modules
    that computation reads and runs Libra's own code on them (`LibraModel.embed`)."""

    NAMES = ("vision_embed_tokens", "vision_signal_norm", "vision_contiguous_signal_processor")

    def __init__(self, libra_model: LibraModel):
        super().__init__()
        self.config = libra_model.config
        for name in self.NAMES:
            setattr(self, name, getattr(libra_model, name))

    def forward(self, ids: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """ids (n, num_codebooks) joint image ids, features (n, C) -> (n, D)."""
        is_vision = torch.ones(1, ids.shape[0], dtype=torch.bool, device=ids.device)
        router = Router(is_vision, num_vision=ids.shape[0])  # image rows only: Libra's text table is never read
        return LibraModel.embed(self, ids[None], features[None], router)[0]  # type: ignore[arg-type]


def load_libra_teacher(path: str | Path, hidden_size: int, *, device=None, trust_pickle: bool = False) -> nn.Module:
    """The frozen LibraInputTeacher of a Libra folder (ours or official, or a Hub id)."""
    folder, kind, config = llm_config(path)
    if kind == "llama":
        raise ValueError(f"--teacher {path} is an HF LLaMA: it has no hybrid-input projection; give a trained Libra "
                         "folder, or --teacher linear")
    if config.hidden_size != hidden_size:
        raise ValueError(f"--teacher {path} has hidden_size {config.hidden_size}, the HoVLE LLM {hidden_size}: the "
                         "teacher must be a Libra model on the same LLaMA")
    with torch.device("meta"):
        teacher = LibraInputTeacher(LibraModel(config))
    state = {}
    for file in weight_files(folder):
        for key, tensor in to_ours(read_state_dict(file, trust_pickle=trust_pickle), kind).items():
            name = key.removeprefix("model.")
            if name.startswith(LibraInputTeacher.NAMES):
                state[name] = tensor.float()
    missing = [k for k in teacher.state_dict() if k not in state]
    if missing:
        raise CheckpointError(f"{folder} lacks the hybrid-input projection: {sample_keys(missing)}")
    teacher.load_state_dict(state, assign=True)
    return teacher.to(torch.device(device or "cpu")).requires_grad_(False).eval()


__all__ = ["FORMAT_NAME", "is_hovle_folder", "save_pretrained", "load_pretrained", "load_llm", "llm_config",
           "llm_state", "read_hovle_config", "LibraInputTeacher", "load_libra_teacher"]
