"""Reading weights: state-dict files, HF CLIP naming, and the official Libra `vqgan.ckpt`.

Official layout (reference 6.1): a pickled dict whose `state_dict` has
  encoder.vision_tower.vision_model.*   HF CLIPVisionTransformer (q/k/v separate)
  quant_conv.*, quantize.*, post_quant_conv.*, decoder.*
  loss.*                                LPIPS + discriminator (training only, dropped)
Ours: encoder.tower.* (open_clip, fused in_proj), quantizer.{quant_conv,lfq,post_quant_conv}.*,
decoder.* (same names as the official decoder).
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from .config import TokenizerConfig
    from .model import ImageTokenizer

OFFICIAL_CLIP_PREFIX = "encoder.vision_tower.vision_model."
OFFICIAL_EXAMPLE_KEYS = (
    OFFICIAL_CLIP_PREFIX + "embeddings.patch_embedding.weight",
    "quant_conv.weight",
    "quantize.project_in.weight",
    "decoder.conv_in.weight",
)
# Official top-level module -> ours (everything but the CLIP tower, which is renamed per key).
_OFFICIAL_PREFIXES = {
    "quant_conv.": "quantizer.quant_conv.",
    "quantize.": "quantizer.lfq.",
    "post_quant_conv.": "quantizer.post_quant_conv.",
    "decoder.": "decoder.",
}
# Names inside the official LFQ that our LFQ rebuilds (non-persistent there too) may appear.
_OFFICIAL_OPTIONAL = {"quantize.codebook", "quantize.zero"}


class CheckpointError(ValueError):
    """A weights file does not hold what was expected; the message says what and how to fix it."""


# ---- generic state-dict reading -------------------------------------------------------------
# torch.save's legacy (non-zip) format starts with a pickled magic number.
_TORCH_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")
_HEAD_BYTES = 512


def _head(path: Path) -> bytes:
    with open(path, "rb") as fh:
        return fh.read(_HEAD_BYTES)


def _looks_like_safetensors(head: bytes) -> bool:
    """A little-endian u64 header length, then the JSON header."""
    return len(head) >= 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 1 << 30


def _torch_zip_members(path: Path) -> list[str] | None:
    """Member names of a zip archive, or None if the zip is damaged (e.g. cut short)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as archive:
            return archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError):
        return None


_SIGNATURES = (
    (b"\x89PNG\r\n\x1a\n", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
    (b"II*\x00", "a TIFF image"), (b"MM\x00*", "a TIFF image"), (b"%PDF", "a PDF document"),
    (b"\x1f\x8b", "a gzip archive"),
    (b"version https://git-lfs", "a Git LFS pointer, not the file itself (fetch it with `git lfs pull`)"),
)


def describe_file(path: str | Path, head: bytes | None = None) -> str:
    """What a file looks like from its first bytes ("a PNG image", "an empty file", ...),
    for messages about files that are not what a loader expected."""
    path = Path(path)
    head = _head(path) if head is None else head
    if not head:
        return "an empty file"
    for magic, what in _SIGNATURES:
        if head.startswith(magic):
            return what
    if head.startswith(b"RIFF") and head[8:12] == b"WEBP":
        return "a WebP image"
    if head.startswith(b"PK\x03\x04"):
        members = _torch_zip_members(path)
        if members is None:
            return "a damaged or truncated zip archive"
        if _is_torch_zip(members):
            return "a torch checkpoint (zip archive)"
        return f"a zip archive without data.pkl (members: {sample_keys(members, 3)})"
    if head[257:262] == b"ustar":
        return "a tar archive"
    if _looks_like_safetensors(head):
        return "the start of a safetensors file"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5:
        if _TORCH_LEGACY_MAGIC in head[:32]:
            return "a torch checkpoint (legacy format)"
        return "a Python pickle that torch.save did not write"
    text = head.decode("utf-8", "ignore")
    # A multi-byte character cut at the end of `head` is no reason to call the file binary.
    if len(text.encode()) >= len(head) - 3 and all(c.isprintable() or c in "\r\n\t" for c in text):
        first = text.strip().splitlines()[0] if text.strip() else ""
        return f"text ({first[:40]!r})"
    return f"binary data starting with {head[:8].hex(' ')}"


def _is_torch_zip(members: list[str]) -> bool:
    return any(name == "data.pkl" or name.endswith("/data.pkl") for name in members)


def _file_kind(path: Path, head: bytes) -> str:
    """"safetensors", "torch" (a zip archive with a data.pkl, or the legacy pickle that starts
    with torch's magic number) or "other"; a zip archive cut short is a CheckpointError."""
    if _looks_like_safetensors(head):
        return "safetensors"
    if head.startswith(b"PK\x03\x04"):
        members = _torch_zip_members(path)
        if members is None:
            raise CheckpointError(f"{path} is a damaged or truncated torch checkpoint (its zip archive is incomplete); "
                                  f"download or save it again")
        return "torch" if _is_torch_zip(members) else "other"
    if head[:1] == b"\x80" and 2 <= head[1] <= 5 and _TORCH_LEGACY_MAGIC in head[:32]:
        return "torch"
    return "other"


def read_state_dict(path: str | Path, *, trust_pickle: bool = False) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file or a torch pickle (unwrapping `state_dict` / `model`).

    The format is recognised from the file's first bytes (a .safetensors name must hold
    safetensors; other names may hold either), so only real torch pickles are ever unpickled,
    and then only tensors unless trust_pickle=True. Anything else, damaged and truncated files
    included, is a CheckpointError naming the file and saying what it looks like."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file {path} does not exist")
    head = _head(path)
    kind = _file_kind(path, head)
    if kind == "safetensors":
        return _safetensors_load(path)
    if path.suffix == ".safetensors":  # torch.load would take the name for the format, so the name must be right
        raise CheckpointError(f"cannot read {path}: it looks like {describe_file(path, head)}, not a safetensors "
                              f"file; download or save it again")
    if kind == "other":
        raise CheckpointError(f"{path} is not a torch checkpoint or safetensors file: it looks like "
                              f"{describe_file(path, head)}")
    obj = _torch_load(path, trust_pickle=trust_pickle, zipped=head.startswith(b"PK\x03\x04"))
    for key in ("state_dict", "model", "module"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict):
            obj = obj[key]
            break
    if not isinstance(obj, dict) or not obj:
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError(f"{path} holds a dict without tensors (keys: {sample_keys(obj)})")
    if all(k.startswith("module.") for k in tensors):  # saved from DDP
        tensors = {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _safetensors_load(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    try:
        return load_file(str(path))
    except Exception as exc:  # SafetensorError is no ValueError/OSError subclass
        raise CheckpointError(f"cannot read {path}: a damaged or truncated safetensors file ({exc}); "
                              f"download or save it again") from None


def _unpickler_refusal(exc: BaseException) -> str | None:
    """The reason torch's weights-only unpickler gave for refusing a Python object, or None
    when the error is something else (a damaged file)."""
    text = str(exc)
    if "Unsupported global" not in text:
        return None
    line = next(line for line in text.splitlines() if "Unsupported global" in line)
    line = line.split("Unsupported global:", 1)[1].strip()
    return line.split(". Please", 1)[0]


def _torch_load(path: Path, *, trust_pickle: bool, zipped: bool) -> Any:
    """torch.load of a file `_file_kind` recognised: tensors only unless trust_pickle."""
    try:
        # Memory-map the zip format (large files load lazily); the legacy format cannot be.
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle, mmap=zipped)
    except pickle.UnpicklingError as exc:
        refused = None if trust_pickle else _unpickler_refusal(exc)
        if refused is None:
            raise CheckpointError(f"{path} is a damaged or truncated torch checkpoint ({_first_line(exc)}); "
                                  f"download or save it again") from None
        raise CheckpointError(
            f"{path} contains Python objects besides tensors ({refused}), which are not loaded by default "
            f"because unpickling can run code. If you trust the file, load it with trust_pickle=True "
            f"(command line: --trust-pickle)."
        ) from None
    except (ImportError, AttributeError) as exc:  # trusted objects whose classes are not installed
        raise CheckpointError(f"{path} holds Python objects whose code is not installed here ({exc}); install the "
                              f"package that wrote it, or convert the file to tensors only") from None
    except Exception as exc:  # truncated data: RuntimeError, EOFError, struct.error, ...
        raise CheckpointError(f"{path} is a damaged or truncated torch checkpoint "
                              f"({type(exc).__name__}: {_first_line(exc)}); download or save it again") from None


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).splitlines() if line.strip()]
    return lines[0].strip() if lines else type(exc).__name__


def sample_keys(keys: Any, n: int = 6) -> str:
    keys = list(keys)
    more = f", ... ({len(keys)} in all)" if len(keys) > n else ""
    return ", ".join(repr(k) for k in keys[:n]) + more


def key_problems(missing: list[str], unexpected: list[str], mismatched: list[str]) -> list[str]:
    """Human-readable summaries of a state dict that does not fit a model (empty if it fits)."""
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} key(s): {sample_keys(missing, 10)}")
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} key(s): {sample_keys(unexpected, 10)}")
    if mismatched:
        problems.append(f"{len(mismatched)} shape mismatch(es): " + "; ".join(mismatched[:10]))
    return problems


# ---- CLIP naming ------------------------------------------------------------------------------
_HF_LAYER = re.compile(r"encoder\.layers\.(\d+)\.(.+)")
_HF_DIRECT = {
    "embeddings.class_embedding": "class_embedding",
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
_HF_LAYER_SUB = {
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}


def hf_clip_vision_to_open_clip(hf: dict[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """HF CLIPVisionTransformer keys (relative to `vision_model.`) -> open_clip VisionTransformer.

    q/k/v projections are concatenated into `attn.in_proj_{weight,bias}` in that order, as
    nn.MultiheadAttention expects. `embeddings.position_ids` (a buffer) is dropped. Any key
    that has no open_clip counterpart is an error, so nothing is silently ignored.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    unknown = []
    for key, value in hf.items():
        if key == "embeddings.position_ids":
            continue
        if key in _HF_DIRECT:
            out[_HF_DIRECT[key]] = value
            continue
        match = _HF_LAYER.fullmatch(key)
        if match:
            layer, rest = int(match.group(1)), match.group(2)
            attn = re.fullmatch(r"self_attn\.([qkv])_proj\.(weight|bias)", rest)
            if attn:
                qkv.setdefault((layer, attn.group(2)), {})[attn.group(1)] = value
                continue
            if rest in _HF_LAYER_SUB:
                out[f"transformer.resblocks.{layer}.{_HF_LAYER_SUB[rest]}"] = value
                continue
        unknown.append(key)
    if unknown:
        raise CheckpointError(f"unrecognised CLIP vision keys in {source}: {sample_keys(unknown, 10)}")
    for (layer, kind), parts in sorted(qkv.items()):
        missing = [p for p in "qkv" if p not in parts]
        if missing:
            raise CheckpointError(f"{source}: layer {layer} lacks self_attn.{missing[0]}_proj.{kind}")
        out[f"transformer.resblocks.{layer}.attn.in_proj_{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    return out


def clip_state_dict_to_open_clip(sd: dict[str, torch.Tensor], source: str = "state dict") -> dict[str, torch.Tensor]:
    """Vision-tower weights in open_clip naming from open_clip, HF or official-Libra naming."""
    for prefix in (OFFICIAL_CLIP_PREFIX, "vision_model."):
        sub = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
        if sub:
            out = hf_clip_vision_to_open_clip(sub, source)
            if "visual_projection.weight" in sd:  # HF CLIPModel: Linear(width -> embed), no bias
                out["proj"] = sd["visual_projection.weight"].t()
            return out
    if "embeddings.patch_embedding.weight" in sd:  # HF vision tower without its prefix
        return hf_clip_vision_to_open_clip(sd, source)
    if any(k.startswith("visual.") for k in sd):
        return {k[len("visual."):]: v for k, v in sd.items() if k.startswith("visual.")}
    if "conv1.weight" in sd:
        return dict(sd)
    raise CheckpointError(
        f"no CLIP vision weights found in {source}: expected keys starting with 'vision_model.' "
        f"(HF), 'visual.' (open_clip) or '{OFFICIAL_CLIP_PREFIX}' (official Libra); found {sample_keys(sd)}"
    )


# ---- the official vqgan.ckpt ------------------------------------------------------------------
def official_to_ours(sd: dict[str, torch.Tensor], source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Rename an official `VQModel` state dict to ours; `loss.*` is dropped, nothing else."""
    clip = {k[len(OFFICIAL_CLIP_PREFIX):]: v for k, v in sd.items() if k.startswith(OFFICIAL_CLIP_PREFIX)}
    out = {"encoder.tower." + k: v for k, v in hf_clip_vision_to_open_clip(clip, source).items()}
    unconsumed = []
    for key, value in sd.items():
        if key.startswith(OFFICIAL_CLIP_PREFIX) or key.startswith("loss."):
            continue
        prefix = next((p for p in _OFFICIAL_PREFIXES if key.startswith(p)), None)
        if prefix is None:
            unconsumed.append(key)
        elif key not in _OFFICIAL_OPTIONAL:
            out[_OFFICIAL_PREFIXES[prefix] + key[len(prefix):]] = value
    if unconsumed:
        raise CheckpointError(
            f"{source}: keys outside the official Libra tokenizer layout: {sample_keys(unconsumed, 10)} "
            f"(expected only {', '.join(repr(p + '*') for p in ['loss.', OFFICIAL_CLIP_PREFIX, *_OFFICIAL_PREFIXES])})"
        )
    return out


def _unused_tower_key(key: str, kept_blocks: int) -> bool:
    """Tower weights the official model computes but never uses (blocks after the last
    feature layer, the final LayerNorm, the projection); our encoder prunes them."""
    if not key.startswith("encoder.tower."):
        return False
    key = key[len("encoder.tower."):]
    match = re.match(r"transformer\.resblocks\.(\d+)\.", key)
    return (match is not None and int(match.group(1)) >= kept_blocks) or key.startswith("ln_post.") or key == "proj"


def check_tokenizer_state(model: "ImageTokenizer", state: dict[str, torch.Tensor], source: str, hint: str = "") -> None:
    """Raise a CheckpointError listing every missing, unexpected or mis-shaped key."""
    expected = model.state_dict()
    kept_blocks = len(model.encoder.tower.transformer.resblocks)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(k for k in set(state) - set(expected) if not _unused_tower_key(k, kept_blocks))
    mismatched = [
        f"{k}: expected {tuple(expected[k].shape)}, found {tuple(state[k].shape)}"
        for k in expected
        if k in state and tuple(state[k].shape) != tuple(expected[k].shape)
    ]
    problems = key_problems(missing, unexpected, mismatched)
    if problems:
        raise CheckpointError(f"{source} does not fit the model: " + " | ".join(problems) + (f"\n{hint}" if hint else ""))


def load_tokenizer_state(model: "ImageTokenizer", state: dict[str, torch.Tensor], source: str, hint: str = "") -> None:
    """Check `state` (see check_tokenizer_state), then assign its tensors to `model`, which may
    live on the meta device (ImageTokenizer.empty)."""
    check_tokenizer_state(model, state, source, hint)
    expected = model.state_dict()
    model.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected}, strict=True, assign=True)
    model.quantizer.reset_nonpersistent_buffers()  # LFQ codebook/zero are not in state dicts
    still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if still_meta:
        raise CheckpointError(f"{source}: tensors left without data after loading: {sample_keys(still_meta)}")


def find_official_files(path: str | Path) -> tuple[Path, Path | None]:
    """(vqgan.ckpt, vision_tokenizer_config.yaml or None) from a file or an official folder."""
    path = Path(path).expanduser()
    if path.is_dir():
        ckpt = path / "vqgan.ckpt"
        if not ckpt.is_file():
            raise FileNotFoundError(
                f"{path} has no vqgan.ckpt; expected an official Libra folder (vqgan.ckpt + "
                f"vision_tokenizer_config.yaml, e.g. YifanXu/libra-vision-tokenizer) or the .ckpt file itself"
            )
    elif path.is_file():
        ckpt = path
    else:
        raise FileNotFoundError(f"official tokenizer checkpoint {path} does not exist")
    yaml_path = ckpt.parent / "vision_tokenizer_config.yaml"
    return ckpt, (yaml_path if yaml_path.is_file() else None)


_OFFICIAL_CLIP_NAMES = {"openai-clip-vit-large-patch14-336": "ViT-L-14-336"}


def config_from_official_yaml(path: str | Path) -> "TokenizerConfig":
    """TokenizerConfig from the official vision_tokenizer_config.yaml (reference 1.2)."""
    import yaml

    from .config import TokenizerConfig

    data = yaml.safe_load(Path(path).read_text())
    params = (data or {}).get("params") or {}
    dd = params.get("ddconfig") or {}
    if not dd:
        raise CheckpointError(f"{path} has no params.ddconfig section; is it a Libra vision_tokenizer_config.yaml?")
    clip_name = Path(str(dd.get("encoder_name", ""))).name
    if clip_name not in _OFFICIAL_CLIP_NAMES:
        raise CheckpointError(
            f"{path}: encoder_name {dd.get('encoder_name')!r} has no known open_clip equivalent "
            f"(known: {sorted(_OFFICIAL_CLIP_NAMES)}); pass clip=<open_clip model name>"
        )
    codebook_size = int(params.get("codebook_size", 512))
    return TokenizerConfig(
        clip_model=_OFFICIAL_CLIP_NAMES[clip_name],
        clip_pretrained=None,
        feature_layers=tuple(dd["select_layer"]),
        resolution=int(dd["resolution"]),
        embed_dim=int(params["embed_dim"]),
        codebook_bits=codebook_size.bit_length() - 1,
        num_codebooks=int(params.get("num_codebook", 2)),
        z_channels=int(dd["z_channels"]),
        ch=int(dd["ch"]),
        ch_mult=tuple(dd["ch_mult"]),
        num_res_blocks=int(dd["num_res_blocks"]),
        attn_resolutions=tuple(dd["attn_resolutions"]),
        num_attn_heads=int(dd.get("num_attn_head", 1)),
        dropout=float(dd.get("dropout", 0.0)),
        out_ch=int(dd.get("out_ch", 3)),
    )


def load_official(
    path: str | Path,
    clip: str | None = None,
    config: "TokenizerConfig | str | None" = None,
    *,
    trust_pickle: bool = False,
) -> "ImageTokenizer":
    """Load the official Libra tokenizer (`vqgan.ckpt`, or its folder) as an ImageTokenizer.

    config: a TokenizerConfig or preset name; default: the folder's
        vision_tokenizer_config.yaml if present, else the `libra-l336` preset.
    clip: open_clip model name of the CLIP architecture, overriding the config's.
    trust_pickle: allow non-tensor objects in the pickle (only for files you trust).
    """
    from .config import TokenizerConfig
    from .model import ImageTokenizer

    ckpt, yaml_path = find_official_files(path)
    if isinstance(config, str):
        config = TokenizerConfig.from_preset(config)
    if config is None:
        config = config_from_official_yaml(yaml_path) if yaml_path else TokenizerConfig.from_preset("libra-l336")
    config = config.replace(clip_pretrained=None)
    if clip is not None:
        config = config.replace(clip_model=clip)

    raw = read_state_dict(ckpt, trust_pickle=trust_pickle)
    if not any(k.startswith(OFFICIAL_CLIP_PREFIX) for k in raw) or "quant_conv.weight" not in raw:
        raise CheckpointError(
            f"{ckpt} is not an official Libra tokenizer checkpoint: expected keys such as "
            f"{sample_keys(OFFICIAL_EXAMPLE_KEYS)}; found {sample_keys(raw)}"
        )
    state = official_to_ours(raw, str(ckpt))
    mask = state.get("quantizer.lfq.mask")
    expected_mask = 2 ** torch.arange(config.codebook_bits - 1, -1, -1)
    if mask is not None and not torch.equal(mask.long(), expected_mask):
        raise CheckpointError(f"{ckpt}: quantize.mask is {mask.tolist()}, expected MSB-first {expected_mask.tolist()}")
    model = ImageTokenizer.empty(config)
    load_tokenizer_state(
        model,
        state,
        str(ckpt),
        hint=f"The model was built for clip {config.clip_model}, resolution {config.resolution}, embed_dim "
        f"{config.embed_dim}, ch {config.ch}, ch_mult {list(config.ch_mult)}; if the checkpoint has other "
        f"dimensions pass its config (config=..., CLI --config/--preset).",
    )
    return model


__all__ = [
    "CheckpointError",
    "read_state_dict",
    "describe_file",
    "hf_clip_vision_to_open_clip",
    "clip_state_dict_to_open_clip",
    "official_to_ours",
    "key_problems",
    "check_tokenizer_state",
    "load_tokenizer_state",
    "config_from_official_yaml",
    "load_official",
]
