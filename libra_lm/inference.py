"""What a command needs to run a trained LM: the device and dtype, the model folder (a path or a
Hub id), its text tokenizer and its image tokenizer. `libra-lm generate`, the visual commands
(`libra_lm.visual`) and the benchmark harness (`libra_lm.eval`) load through these functions, so a
model is found, checked and placed the same way everywhere.

    lm = load_for_inference("YifanXu/libra-11b-chat")      # or a folder; device/dtype "auto"
    lm.model, lm.text_tokenizer, lm.image_tokenizer, lm.device, lm.folder

or piece by piece: resolve_model, resolve_device, resolve_dtype, load_model,
load_text_tokenizer, load_image_tokenizer.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from libra_tok.precision import resolve_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
TOKENIZER_HINT = "pass --tokenizer PATH (a libra-tok folder or the official vqgan.ckpt) or --tokenizer-preset tiny"


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """"auto" (bf16 on CUDA, as the released weights; fp32 on the CPU) or one of DTYPES."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    if name not in DTYPES:
        raise ValueError(f"--dtype must be auto or one of {tuple(DTYPES)}, got {name!r}")
    return DTYPES[name]


def resolve_model(model: str | Path, *, text_tokenizer: bool = True, image_tokenizer: bool = False) -> Path:
    """The local folder of an LM given as a path or a Hub id (`org/name[@revision]`); from the
    Hub only the files needed: the weights and config, plus the folder's own text tokenizer and
    image tokenizer when they will be used (`libra_tok.hub`)."""
    from libra_tok.hub import lm_files, resolve

    return resolve(model, lm_files(text_tokenizer=text_tokenizer, image_tokenizer=image_tokenizer))


def load_model(folder: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
               attn_backend: str = "auto", trust_pickle: bool = False):
    """The LM of a folder (ours, official Libra or HF LLaMA; or HoVLE's, libra_lm.hovle) in eval
    mode on `device`."""
    from .hovle.checkpoint import is_hovle_folder
    from .model import LibraForCausalLM

    if is_hovle_folder(folder):  # the monolithic baseline reads pixels: no attention backend, no image tokenizer
        from .hovle.model import HoVLEForCausalLM

        return HoVLEForCausalLM.from_pretrained(folder, device=device, dtype=dtype).eval()
    model = LibraForCausalLM.from_pretrained(folder, device=device, dtype=dtype, trust_pickle=trust_pickle)
    model.attn_backend = attn_backend
    return model.eval()


def load_text_tokenizer(folder: str | Path, path: str | Path | None = None):
    """`path` (a tokenizer.model, a folder holding one, or a Hub id), else the model folder's own."""
    from libra_tok.hub import TEXT_TOKENIZER, resolve

    from .text import MODEL_FILE, TextTokenizer

    if path is not None:
        return TextTokenizer.from_pretrained(resolve(path, TEXT_TOKENIZER))
    own = Path(folder) / MODEL_FILE
    if not own.is_file():
        raise FileNotFoundError(f"{folder} has no {MODEL_FILE}; pass --text-tokenizer PATH")
    return TextTokenizer.from_pretrained(own)


def load_image_tokenizer(folder: str | Path, path: str | Path | None = None, preset: str | None = None, *,
                         device: torch.device | str = "cpu", trust_pickle: bool = False, hint: str = TOKENIZER_HINT):
    """The image tokenizer to use with the LM of `folder`, in eval mode on `device`: `path` (a
    libra-tok folder, an official vqgan.ckpt or its folder, or a Hub id), else the random weights
    of `preset` that `libra-tok encode --preset` uses, else the model folder's own
    (`libra_lm.checkpoint.image_tokenizer_for`)."""
    from libra_tok import ImageTokenizer
    from libra_tok.pipeline import load_tokenizer

    from .checkpoint import image_tokenizer_for

    if path is not None and preset is not None:
        raise ValueError("give --tokenizer or --tokenizer-preset, not both")
    if preset is not None:
        return load_tokenizer(preset=preset, device=device)
    if path is not None:
        return ImageTokenizer.from_pretrained(path, trust_pickle=trust_pickle).to(device).eval()
    return image_tokenizer_for(folder, device=device, trust_pickle=trust_pickle, hint=hint).eval()


@dataclass
class LoadedLM:
    model: Any  # LibraForCausalLM, eval mode, on `device`
    text_tokenizer: Any  # TextTokenizer, or None when not asked for
    image_tokenizer: Any  # ImageTokenizer on `device`, or None when not asked for
    device: torch.device
    folder: Path  # the model's local folder (a Hub id's snapshot)


def load_for_inference(model: str | Path, *, tokenizer: str | Path | None = None, tokenizer_preset: str | None = None,
                       text_tokenizer: str | Path | None = None, with_text_tokenizer: bool = True,
                       with_image_tokenizer: bool = True, device: str = "auto", dtype: str = "auto",
                       attn_backend: str = "auto", trust_pickle: bool = False) -> LoadedLM:
    """An LM with the tokenizers a command needs, each found as the functions above find it.
    The tokenizers load before the model, so a wrong tokenizer fails before the large load."""
    if tokenizer is not None and tokenizer_preset is not None:
        raise ValueError("give --tokenizer or --tokenizer-preset, not both")
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    own_image_tokenizer = with_image_tokenizer and tokenizer is None and tokenizer_preset is None
    folder = resolve_model(model, text_tokenizer=with_text_tokenizer and text_tokenizer is None,
                           image_tokenizer=own_image_tokenizer)
    text_tok = load_text_tokenizer(folder, text_tokenizer) if with_text_tokenizer else None
    from .hovle.checkpoint import is_hovle_folder

    with_image_tokenizer = with_image_tokenizer and not is_hovle_folder(folder)  # HoVLE reads pixels
    image_tok = (load_image_tokenizer(folder, tokenizer, tokenizer_preset, device=dev, trust_pickle=trust_pickle)
                 if with_image_tokenizer else None)
    lm = load_model(folder, device=dev, dtype=torch_dtype, attn_backend=attn_backend, trust_pickle=trust_pickle)
    return LoadedLM(lm, text_tok, image_tok, dev, folder)


def read_image(path: str | Path, option: str = "--image"):
    """An image file as 8-bit RGB, read with the bounds of `libra-tok encode`; a file that is not a
    readable image is a ValueError naming the option, the file and the reason."""
    from libra_tok.data import ImageReadError, ImageRecord
    from libra_tok.data import read_image as read_record

    try:
        return read_record(ImageRecord(str(path)))
    except ImageReadError as err:
        raise ValueError(f"cannot read {option} {path}: {err}") from None


__all__ = ["DTYPES", "resolve_device", "resolve_dtype", "resolve_model", "load_model", "load_text_tokenizer",
           "load_image_tokenizer", "load_for_inference", "LoadedLM", "read_image"]
