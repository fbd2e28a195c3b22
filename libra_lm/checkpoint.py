"""LM folders on disk: our format, official Libra folders, HF LLaMA folders - their configs,
weight files, loading into a model class and saving; and the image tokenizer an LM folder names.

All three use the same parameter names (the official ones, docs/official-formats.md#lm-folder),
so loading is a check of names and shapes after the pure conversions of libra_lm.convert:
  ours        config.json {"format": "libra-lm", "config": {...}} + model.safetensors
  official    config.json (model_type "libra") + model*.safetensors / pytorch_model*.bin,
              sharded through an index or not; placeholder buffers and rotary inv_freq ignored
  HF LLaMA    config.json (model_type "llama") + weights as above; every parameter without
              "vision" in its name is loaded, the vision expert, bridges and heads are
              initialised as the official init
`transformers` is never imported, and neither is the model module: the model class is passed
in (`LibraForCausalLM.from_pretrained` passes itself). Unknown, missing or mis-shaped keys
raise a CheckpointError that lists them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from tqdm import tqdm

from libra_tok.fileio import atomic_save_safetensors, atomic_write_json
from libra_tok.hub import CONFIG, LM, LM_IMAGE_TOKENIZER, resolve
from libra_tok.weight_files import CheckpointError, key_problems, read_state_dict, sample_keys

from .config import LibraConfig
from .convert import fresh_keys, key_sources, tie_embeddings, to_ours

if TYPE_CHECKING:
    from libra_tok import ImageTokenizer

FORMAT_NAME = "libra-lm"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
IMAGE_TOKENIZER_DIR = "image_tokenizer"  # optional: the image tokenizer (a libra-tok folder) inside an LM folder
OFFICIAL_TOKENIZER_FILE = "vqgan.ckpt"

# Weight files of an HF-style folder, in order of preference.
_INDEX_FILES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")

_KIND_NAMES = {"ours": "a libra-lm", "official": "an official Libra", "llama": "an HF LLaMA"}


# ---- formats and configs --------------------------------------------------------------------------
def read_config_json(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} is not a model folder: no {CONFIG_FILE}. Expected a folder written by "
            f"save_pretrained, an official Libra folder or an HF LLaMA folder"
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path} is not valid JSON: {exc}") from exc


def detect_format(meta: dict[str, Any], folder: Path) -> str:
    """"ours", "official" or "llama" from a config.json."""
    if meta.get("format") == FORMAT_NAME:
        return "ours"
    model_type = meta.get("model_type")
    architectures = meta.get("architectures") or []
    if model_type == "libra" or "LibraForCausalLM" in architectures:
        return "official"
    if model_type == "llama" or "LlamaForCausalLM" in architectures:
        return "llama"
    raise CheckpointError(
        f"{folder / CONFIG_FILE} describes neither a libra-lm folder (format {FORMAT_NAME!r}), an official "
        f"Libra model (model_type 'libra') nor an HF LLaMA (model_type 'llama'); found format "
        f"{meta.get('format')!r}, model_type {model_type!r}"
    )


def _llama_fields(meta: dict[str, Any], source: str) -> dict[str, Any]:
    """LibraConfig fields of the LLaMA part of an HF-style config.json, with checks for the
    LLaMA variants this model does not implement."""
    hidden, heads = int(meta["hidden_size"]), int(meta["num_attention_heads"])
    problems = []
    kv_heads = meta.get("num_key_value_heads")
    if kv_heads not in (None, heads):
        problems.append(f"grouped-query attention (num_key_value_heads {kv_heads} != num_attention_heads {heads})")
    head_dim = meta.get("head_dim")
    if head_dim not in (None, hidden // heads):
        problems.append(f"head_dim {head_dim} != hidden_size / num_attention_heads = {hidden // heads}")
    if meta.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {meta['hidden_act']!r} (only 'silu')")
    if meta.get("attention_bias") or meta.get("mlp_bias"):
        problems.append("attention/MLP biases")
    rope = meta.get("rope_scaling") or {}
    rope_params = meta.get("rope_parameters") or {}
    for spec in (rope, rope_params):
        kind = spec.get("rope_type", spec.get("type", "default"))
        if kind != "default":
            problems.append(f"RoPE scaling {kind!r} (only plain RoPE)")
    if problems:
        raise CheckpointError(f"{source}: unsupported LLaMA variant: " + "; ".join(problems))
    theta = meta.get("rope_theta", rope_params.get("rope_theta", 10000.0))

    def first(value: Any, default: int) -> int:
        if value is None:
            return default
        return int(value[0] if isinstance(value, (list, tuple)) else value)

    return {
        "hidden_size": hidden,
        "num_hidden_layers": int(meta["num_hidden_layers"]),
        "num_attention_heads": heads,
        "intermediate_size": int(meta["intermediate_size"]),
        "text_vocab_size": int(meta["vocab_size"]),
        "rms_norm_eps": float(meta.get("rms_norm_eps", 1e-6)),
        "rope_theta": float(theta),
        "max_position_embeddings": int(meta.get("max_position_embeddings", 2048)),
        "initializer_range": float(meta.get("initializer_range", 0.02)),
        "pad_token_id": first(meta.get("pad_token_id"), 0),
        "bos_token_id": first(meta.get("bos_token_id"), 1),
        "eos_token_id": first(meta.get("eos_token_id"), 2),
    }


def config_from_llama(meta: dict[str, Any], source: str = "config.json", **overrides: Any) -> LibraConfig:
    """LibraConfig for an HF LLaMA config; vision fields from the libra-7b preset unless overridden."""
    try:
        fields = _llama_fields(meta, source)
    except KeyError as exc:
        raise CheckpointError(f"{source} lacks the LLaMA field {exc.args[0]!r}") from exc
    return LibraConfig.from_preset("libra-7b", **{**fields, **overrides})


# Official LibraConfig switches whose non-release values this model does not implement.
_OFFICIAL_RELEASE_SWITCHES = {
    "use_bridge": True,
    "concat_signals": True,
    "norm_signals": True,
    "addition_mode": False,
    "use_vision_position_embedding": False,
    "unified_head": False,
    "use_2d_rope": False,
    "vision_prediction_mode": "1d",
}


def config_from_official(meta: dict[str, Any], source: str = "config.json", **overrides: Any) -> LibraConfig:
    """LibraConfig for an official Libra config.json (libra/models/libra/configuration_libra.py;
    the released values are those of libra-11b-chat/config.json)."""
    try:
        fields = _llama_fields(meta, source)
    except KeyError as exc:
        raise CheckpointError(f"{source} lacks the LLaMA field {exc.args[0]!r}") from exc
    unsupported = [
        f"{k}={meta[k]!r} (released: {v!r})"
        for k, v in _OFFICIAL_RELEASE_SWITCHES.items() if k in meta and meta[k] != v
    ]
    if unsupported:
        raise CheckpointError(f"{source}: options outside the released Libra model are not implemented: "
                              + ", ".join(unsupported))
    resolution = int(meta.get("image_feature_resolution", 24))
    vision_vocab = int(meta.get("vision_vocab_size", 514))
    max_vision = meta.get("max_vision_token_length")
    if max_vision is not None and int(max_vision) != resolution**2 + 2:
        raise CheckpointError(f"{source}: max_vision_token_length {max_vision} != image_feature_resolution^2 + 2 "
                              f"= {resolution**2 + 2}")
    fields.update(
        vision_down_ratio=int(meta.get("vision_down_ratio", 4)),
        bridge_rank=int(meta.get("bridge_rank", 8)),
        codebook_size=vision_vocab - 2,
        num_codebooks=int(meta.get("vision_codebook_num", 2)),
        contiguous_signal_size=int(meta.get("contiguous_signal_size", 4096)),
        num_image_tokens=resolution**2,
        newline_token_id=int(meta.get("newline_token_id", 13)),
    )
    return LibraConfig(**{**fields, **overrides})


def config_from_ours(meta: dict[str, Any], source: str, **overrides: Any) -> LibraConfig:
    if int(meta.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(f"{source} was written by a newer libra (format {meta['format_version']} > "
                              f"{FORMAT_VERSION}); upgrade the package")
    if "config" not in meta:
        raise CheckpointError(f"{source} has no 'config' section")
    config = LibraConfig.from_dict(meta["config"])
    return config.replace(**overrides) if overrides else config


# ---- weight files ---------------------------------------------------------------------------------
def weight_files(folder: Path) -> list[Path]:
    """The weight files of a folder: the shards of an index, or a single file."""
    for name in _INDEX_FILES:
        index = folder / name
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index} is not a weight index (no 'weight_map'): {exc}") from exc
            files = [folder / f for f in dict.fromkeys(weight_map.values())]
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise FileNotFoundError(f"{index} names shard(s) that do not exist: {sample_keys(missing)}")
            return files
    for name in _SINGLE_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise FileNotFoundError(
        f"{folder} has no weights: expected {' or '.join(_INDEX_FILES)} with its shards, "
        f"or {' or '.join(_SINGLE_FILES)}"
    )


def folder_config(path: str | Path, **config_overrides: Any) -> tuple[Path, LibraConfig, str, bool]:
    """(folder, config, kind, tied embeddings) of a model folder or Hub id: ours, official or HF LLaMA."""
    folder = resolve(path, LM)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    meta = read_config_json(folder)
    kind = detect_format(meta, folder)
    source = str(folder / CONFIG_FILE)
    if kind == "ours":
        config = config_from_ours(meta, source, **config_overrides)
    elif kind == "official":
        config = config_from_official(meta, source, **config_overrides)
    else:
        config = config_from_llama(meta, source, **config_overrides)
    tied = kind == "llama" and bool(meta.get("tie_word_embeddings", False))
    return folder, config, kind, tied


# ---- loading --------------------------------------------------------------------------------------
def load_pretrained(
    model_class: type[nn.Module],
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    trust_pickle: bool = False,
    **config_overrides: Any,
) -> nn.Module:
    """Build the model of a folder (ours, official Libra or HF LLaMA; or its Hugging Face Hub
    id, libra_tok.hub) as `model_class(config)` and load its weights
    (`LibraForCausalLM.from_pretrained` is the way in)."""
    folder, config, kind, tied = folder_config(path, **config_overrides)
    return load_weights(
        model_class, config, weight_files(folder), kind=kind, device=device, dtype=dtype, tied_embeddings=tied,
        trust_pickle=trust_pickle,
    )


def load_weights(
    model_class: type[nn.Module],
    config: LibraConfig,
    files: list[Path],
    *,
    kind: str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
    tied_embeddings: bool = False,
    trust_pickle: bool = False,
) -> nn.Module:
    """`model_class(config)` with the weights of `files` ("ours" / "official" / "llama" rules of
    libra_lm.convert); the class must offer `init_weights(modules)` for the fresh parts."""
    device = torch.device(device or "cpu")
    dtype = dtype or torch.float32
    with torch.device("meta"):
        model = model_class(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}

    state: dict[str, torch.Tensor] = {}
    unexpected, mismatched, mis_shaped = [], [], set()
    for file in tqdm(files, desc="loading weights", unit="file", disable=len(files) < 2):
        for key, tensor in to_ours(read_state_dict(file, trust_pickle=trust_pickle), kind).items():
            if key not in expected:
                unexpected.append(key)
            elif tuple(tensor.shape) != expected[key]:
                mismatched.append(f"{key}: expected {expected[key]}, found {tuple(tensor.shape)}")
                mis_shaped.add(key)
            else:
                state[key] = tensor.to(device=device, dtype=dtype)
    if tied_embeddings:
        state = tie_embeddings(state)

    check_weight_keys(config, kind, files[0].parent, missing=[k for k in expected if k not in state and
                                                                 k not in mis_shaped],
                      unexpected=unexpected, mismatched=mismatched)

    model.load_state_dict(state, strict=False, assign=True)
    # Fresh (vision) modules: real memory, then the official init.
    fresh_modules = [m for m in model.modules() if any(p.is_meta for p in m.parameters(recurse=False))]
    for module in fresh_modules:
        module.to_empty(device=device, recurse=False)
        module.to(dtype)
    model.init_weights(fresh_modules)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise CheckpointError(f"parameters left without data after loading: {sample_keys(left)}")
    return model.train(False)


def check_weight_keys(config: LibraConfig, kind: str, where: Path, *, missing: list[str], unexpected: list[str],
                      mismatched: list[str]) -> list[str]:
    """The fresh keys among `missing` (initialised, not loaded); a CheckpointError listing the
    missing, unexpected and mis-shaped keys when the weights do not fit the model."""
    fresh = fresh_keys(missing, kind)
    problems = key_problems([k for k in missing if k not in fresh], unexpected, mismatched)
    if problems:
        raise CheckpointError(
            f"weights in {where} do not fit {_KIND_NAMES[kind]} model with hidden_size {config.hidden_size}, "
            f"{config.num_hidden_layers} layers, text vocab {config.text_vocab_size}, vision_down_ratio "
            f"{config.vision_down_ratio}: " + " | ".join(problems)
        )
    return fresh


class WeightSlices:
    """The tensors of a model folder, read one at a time or a range of rows of one, so that a
    process holding a shard of a model reads that shard only (`libra_lm.sharding`).

    safetensors files are opened with `safe_open`: `get_slice` reads the bytes of the rows
    asked for and nothing else. torch files (`pytorch_model*.bin`) in the zip format are
    memory-mapped (`torch.load(mmap=True)`, weights only unless trust_pickle): copying rows
    reads their pages only, and the mapping is file-backed page cache shared by the processes
    of a machine, not memory of each. The legacy (pre-zip) torch format cannot be mapped and is
    read whole when one of its tensors is first needed, one file at a time.

    Keys are ours (`libra_lm.convert.key_sources`); `check(model_state)` tells which of the
    model's keys are fresh (initialised, HF LLaMA's vision parts) and raises CheckpointError
    on missing, unexpected or mis-shaped ones.
    """

    def __init__(self, folder: str | Path, kind: str, *, tied_embeddings: bool = False, trust_pickle: bool = False):
        from safetensors import safe_open

        self.folder, self.kind, self.trust_pickle = Path(folder), kind, trust_pickle
        self._open: dict[Path, Any] = {}  # file -> safe_open handle or a dict of (mapped) tensors
        where: dict[str, Path] = {}
        shapes: dict[str, tuple[int, ...]] = {}
        for file in weight_files(self.folder):
            handle = self._handle(file, safe_open)
            for key in handle.keys():
                where[key] = file
                shapes[key] = tuple(handle.get_slice(key).get_shape()) if hasattr(handle, "get_slice") \
                    else tuple(handle[key].shape)
        self._sources = key_sources(where, kind, tied_embeddings)
        self._where = where
        self.shapes = {ours: shapes[src] for ours, src in self._sources.items()}

    def _handle(self, file: Path, safe_open=None):
        if file not in self._open:
            try:
                self._open[file] = safe_open(str(file), framework="pt", device="cpu")
            except Exception:  # not safetensors: a torch file (mapped when it can be), or an error naming it
                if file.suffix == ".safetensors":
                    read_state_dict(file, trust_pickle=self.trust_pickle)  # raises the CheckpointError that says why
                self._open[file] = read_state_dict(file, trust_pickle=self.trust_pickle)
        return self._open[file]

    def keys(self) -> list[str]:
        return list(self._sources)

    def read(self, key: str, start: int | None = None, stop: int | None = None) -> torch.Tensor:
        """Our tensor `key`, or its rows start:stop (dim 0), as a tensor of its own."""
        source = self._sources[key]
        handle = self._open[self._where[source]]
        if isinstance(handle, dict):
            tensor = handle[source]
            return (tensor if start is None else tensor[start:stop]).clone()
        if start is None:
            return handle.get_tensor(source)
        return handle.get_slice(source)[start:stop]

    def check(self, expected: dict[str, tuple[int, ...]], config: LibraConfig) -> list[str]:
        """Fresh keys of `expected` (key -> shape); CheckpointError when the files do not fit."""
        unexpected = [k for k in self.shapes if k not in expected]
        mismatched = [f"{k}: expected {expected[k]}, found {s}" for k, s in self.shapes.items()
                      if k in expected and tuple(s) != tuple(expected[k])]
        missing = [k for k in expected if k not in self.shapes]
        return check_weight_keys(config, self.kind, self.folder, missing=missing, unexpected=unexpected,
                                 mismatched=mismatched)

    def close(self) -> None:
        self._open.clear()

    def __enter__(self) -> "WeightSlices":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def open_folder(path: str | Path, *, trust_pickle: bool = False,
                **config_overrides: Any) -> tuple[LibraConfig, WeightSlices]:
    """(config, tensors to read one at a time) of a model folder or Hub id (ours, official Libra
    or HF LLaMA), as `load_pretrained` reads them."""
    folder, config, kind, tied = folder_config(path, **config_overrides)
    return config, WeightSlices(folder, kind, tied_embeddings=tied, trust_pickle=trust_pickle)


# ---- saving ---------------------------------------------------------------------------------------
def save_pretrained(model: nn.Module, path: str | Path, *, image_tokenizer: dict[str, Any] | None = None) -> Path:
    """config.json + model.safetensors, each written atomically (weights first).

    image_tokenizer: the identity of the image tokenizer whose ids the model was trained on
    (`libra_tok.pipeline.tokenizer_identity`: config, architecture_hash, weights_sha256,
    source), recorded in config.json so that later stages and `generate` can check it."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    atomic_save_safetensors(model.state_dict(), path / WEIGHTS_FILE, metadata={"format": "pt"})
    atomic_write_json(path / CONFIG_FILE, folder_meta(model.config, image_tokenizer))
    return path


def folder_meta(config: LibraConfig, image_tokenizer: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json of a libra-lm folder (see save_pretrained; also written by libra_lm.export)."""
    from libra_tok import __version__

    meta = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, "libra_version": __version__,
            "config": config.to_dict()}
    if image_tokenizer is not None:
        meta["image_tokenizer"] = image_tokenizer
    return meta


def recorded_image_tokenizer(path: str | Path) -> dict[str, Any] | None:
    """The image-tokenizer identity a libra-lm folder records (see save_pretrained), or None
    (official and HF LLaMA folders, and folders saved without one)."""
    folder = resolve(path, CONFIG)
    meta = read_config_json(folder)
    if detect_format(meta, folder) != "ours":
        return None
    return meta.get("image_tokenizer")


def image_tokenizer_for(
    path: str | Path,
    *,
    device: str | torch.device | None = None,
    trust_pickle: bool = False,
    hint: str = "pass the image tokenizer's folder or vqgan.ckpt to ImageTokenizer.from_pretrained",
) -> ImageTokenizer:
    """The image tokenizer of an LM folder, in eval mode on `device` (default CPU):

    - an `image_tokenizer/` sub-folder (a libra-tok folder, or official files) if present;
    - else, for our folders, the tokenizer recorded in config.json by training
      (`recorded_image_tokenizer`): its recorded source, or the preset of its architecture with
      the reproducible random weights of `libra_tok.pipeline.load_tokenizer(preset=...)`;
    - else the folder's official `vqgan.ckpt` (+ vision_tokenizer_config.yaml), as in the
      official Libra folders.
    A recorded tokenizer is checked by its weights digest wherever it is found, so the ids are
    those the LM was trained on. Otherwise a ValueError/FileNotFoundError ending with `hint`.
    trust_pickle: allow Python objects besides tensors in a .ckpt (only for files you trust)."""
    from libra_tok import ImageTokenizer, load_official
    from libra_tok.pipeline import load_tokenizer_matching

    folder = resolve(path, LM_IMAGE_TOKENIZER)  # a folder or a Hub id (libra_tok.hub)
    if not folder.is_dir():
        raise FileNotFoundError(f"model folder {folder} does not exist")
    meta = read_config_json(folder)
    kind = detect_format(meta, folder)
    identity = meta.get("image_tokenizer") if kind == "ours" else None
    sub = folder / IMAGE_TOKENIZER_DIR
    device = torch.device(device or "cpu")
    what = f"the LM in {folder}"
    if sub.is_dir():
        if identity is not None:
            tok = load_tokenizer_matching(identity, sub, device, what=what, hint=hint, trust_pickle=trust_pickle)
        else:
            tok = ImageTokenizer.from_pretrained(sub, trust_pickle=trust_pickle)
    elif identity is not None:
        tok = load_tokenizer_matching(identity, device=device, what=what, hint=hint, trust_pickle=trust_pickle)
    elif (folder / OFFICIAL_TOKENIZER_FILE).is_file():
        tok = load_official(folder, trust_pickle=trust_pickle)
    elif kind == "official":
        raise FileNotFoundError(
            f"{folder} is an official Libra model folder without {OFFICIAL_TOKENIZER_FILE}: put the official "
            f"image tokenizer in it (vqgan.ckpt and vision_tokenizer_config.yaml of YifanXu/libra-vision-tokenizer), "
            f"or {hint}"
        )
    else:
        raise ValueError(
            f"{folder} does not name its image tokenizer (no {IMAGE_TOKENIZER_DIR}/ sub-folder, no tokenizer "
            f"recorded in {CONFIG_FILE}, no {OFFICIAL_TOKENIZER_FILE}); {hint}"
        )
    return tok.to(device).eval()


__all__ = [
    "CheckpointError",
    "load_pretrained",
    "image_tokenizer_for",
    "load_weights",
    "save_pretrained",
    "folder_meta",
    "recorded_image_tokenizer",
    "weight_files",
    "WeightSlices",
    "open_folder",
    "check_weight_keys",
    "detect_format",
    "config_from_llama",
    "config_from_official",
    "config_from_ours",
    "read_config_json",
]
