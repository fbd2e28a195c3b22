"""ImageTokenizer: frozen CLIP features -> two LFQ ids per patch -> conv decoder; its own
folder format (config.json + model.safetensors), and building it from a checked state dict
(`from_state`, used for our folders and, through libra_tok.official, for official ones).

    tok = ImageTokenizer.from_pretrained("path/to/tokenizer")      # or load_official(...)
    pixels = tok.preprocess([Image.open("cat.jpg")])                # (B, 3, R, R), CLIP-normalised
    out = tok.encode(pixels)                                        # .ids (B, 576, 2), .features (B, 576, 4096)
    images = tok.decode(out.ids)                                    # (B, 3, R, R) in [-1, 1]
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from torch import nn

from .config import TokenizerConfig
from .data import load_image
from .decoder import Decoder
from .encoder import ClipFeatureEncoder
from .fileio import atomic_save_safetensors, atomic_write_json
from .hub import IMAGE_TOKENIZER, resolve
from .official import read_official
from .precision import autocast_for
from .preprocess import clip_to_signed, preprocess_images
from .quantizer import Quantizer
from .version import __version__
from .weight_files import CheckpointError, key_problems, read_state_dict, sample_keys

FORMAT_NAME = "libra-tok"
FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


@dataclass
class EncodeOutput:
    ids: torch.Tensor  # (B, G*G, num_codebooks) int64, row-major grid; column 0 = id1
    features: torch.Tensor  # (B, G*G, feature_dim) float32: the CLIP concat (LM contiguous signal)


@dataclass
class TokenizerOutput:
    reconstruction: torch.Tensor  # (B, 3, R, R), unclamped, target range [-1, 1]
    ids: torch.Tensor
    aux_loss: torch.Tensor  # LFQ entropy + commitment (weighted), 0 in eval mode
    features: torch.Tensor


def _read_config(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); save the tokenizer again") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path} holds a JSON {type(meta).__name__}, not a tokenizer config")
    return meta


def _lm_folder_kind(meta: dict) -> str | None:
    """"a libra-lm" / "an official Libra" / "an HF LLaMA" when a config.json is a language
    model's (libra_lm.checkpoint.detect_format), else None."""
    architectures = meta.get("architectures") or []
    if meta.get("format") == "libra-lm":
        return "a libra-lm"
    if meta.get("model_type") == "libra" or "LibraForCausalLM" in architectures:
        return "an official Libra"
    if meta.get("model_type") == "llama" or "LlamaForCausalLM" in architectures:
        return "an HF LLaMA"
    return None


def _unused_tower_key(key: str, kept_blocks: int) -> bool:
    """Tower weights the official model computes but never uses (blocks after the last
    feature layer, the final LayerNorm, the projection); our encoder prunes them."""
    if not key.startswith("encoder.tower."):
        return False
    key = key[len("encoder.tower."):]
    match = re.match(r"transformer\.resblocks\.(\d+)\.", key)
    return (match is not None and int(match.group(1)) >= kept_blocks) or key.startswith("ln_post.") or key == "proj"


def check_tokenizer_state(model: "ImageTokenizer", state: dict[str, torch.Tensor], source: str, hint: str = "") -> None:
    """Raise a CheckpointError listing every missing, unexpected or mis-shaped key of `state`
    for `model`; tower weights the encoder prunes may be present."""
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
        raise CheckpointError(f"{source} does not fit the model: " + " | ".join(problems)
                              + (f"\n{hint}" if hint else ""))


class ImageTokenizer(nn.Module):
    def __init__(self, config: TokenizerConfig | str, load_clip_weights: bool = True, *, trust_pickle: bool = False):
        """A tokenizer of `config` (or preset name): CLIP weights from config.clip_pretrained
        when load_clip_weights (trust_pickle: allow Python objects besides tensors in that
        file, only for files you trust), the rest randomly initialised."""
        super().__init__()
        if isinstance(config, str):
            config = TokenizerConfig.from_preset(config)
        self.config = config
        self.encoder = ClipFeatureEncoder(config, load_weights=load_clip_weights, trust_pickle=trust_pickle)
        self.quantizer = Quantizer(config, self.encoder.feature_dim)
        self.decoder = Decoder(config)

    # ---- construction -----------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ImageTokenizer":
        return cls(TokenizerConfig.from_preset(name, **overrides))

    @classmethod
    def empty(cls, config: TokenizerConfig) -> "ImageTokenizer":
        """A model on the meta device (no memory, no random init), for `from_state`, which
        checks shapes and assigns real tensors."""
        with torch.device("meta"):
            return cls(config, load_clip_weights=False)

    @classmethod
    def from_state(cls, config: TokenizerConfig, state: dict[str, torch.Tensor], source: str,
                   hint: str = "") -> "ImageTokenizer":
        """A tokenizer of `config` holding the tensors of `state` (our names): every key and shape
        is checked first (check_tokenizer_state), so a CheckpointError lists all that does not
        fit; `source` names where `state` came from, `hint` what to try then."""
        model = cls.empty(config)
        check_tokenizer_state(model, state, source, hint)
        expected = model.state_dict()
        model.load_state_dict({k: state[k].to(expected[k].dtype) for k in expected}, strict=True, assign=True)
        model.quantizer.reset_nonpersistent_buffers()  # LFQ codebook/zero are not in state dicts
        still_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
        if still_meta:
            raise CheckpointError(f"{source}: tensors left without data after loading: {sample_keys(still_meta)}")
        return model

    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device | None = None, *, trust_pickle: bool = False
    ) -> "ImageTokenizer":
        """Load a folder written by `save_pretrained`, or an official Libra `vqgan.ckpt`
        (the file or a folder holding it, an official Libra LM folder included; see
        `libra_tok.checkpoint.load_official`), or any of them by Hugging Face Hub id
        (`org/name[@revision]`, libra_tok.hub). trust_pickle: allow Python objects besides
        tensors in a .ckpt pickle (only for files you trust)."""
        path = resolve(path, IMAGE_TOKENIZER)
        official = None
        if (path / CONFIG_FILE).is_file():
            meta = _read_config(path / CONFIG_FILE)
            if meta.get("format") != FORMAT_NAME and (path / "vqgan.ckpt").is_file():
                # An official Libra LM folder: the LM's config.json beside the tokenizer's files.
                official = read_official(path, trust_pickle=trust_pickle)
            else:
                model = cls._load_ours(path, meta)
        elif path.is_file() or (path / "vqgan.ckpt").is_file():
            official = read_official(path, trust_pickle=trust_pickle)
        else:
            raise FileNotFoundError(
                f"{path} is not a tokenizer: expected a folder written by save_pretrained "
                f"({CONFIG_FILE} + {WEIGHTS_FILE}), an official Libra folder with vqgan.ckpt, or a .ckpt file"
            )
        if official is not None:
            model = cls.from_state(official.config, official.state, official.source, official.hint)
        return model.to(device) if device is not None else model

    @classmethod
    def _load_ours(cls, folder: Path, meta: dict) -> "ImageTokenizer":
        if meta.get("format") != FORMAT_NAME or "config" not in meta:
            lm_kind = _lm_folder_kind(meta)
            if lm_kind is not None:
                raise CheckpointError(
                    f"{folder} is {lm_kind} model folder, not an image tokenizer; pass the image tokenizer's own "
                    f"folder or vqgan.ckpt (the tokenizer an LM folder names: libra_lm.checkpoint.image_tokenizer_for)"
                )
            raise CheckpointError(
                f"{folder / CONFIG_FILE} is not a libra-tok config (format {meta.get('format')!r}); "
                f"expected format {FORMAT_NAME!r} with a 'config' section"
            )
        if int(meta.get("format_version", 0)) > FORMAT_VERSION:
            raise CheckpointError(
                f"{folder} was written by a newer libra (format {meta['format_version']} > "
                f"{FORMAT_VERSION}); upgrade the package"
            )
        weights = folder / WEIGHTS_FILE
        if not weights.is_file():
            raise FileNotFoundError(f"{folder} has {CONFIG_FILE} but no {WEIGHTS_FILE}")
        return cls.from_state(TokenizerConfig.from_dict(meta["config"]), read_state_dict(weights), str(weights))

    def save_pretrained(self, path: str | Path, *, push_to_hub: bool = False, repo_id: str | None = None,
                        **push_options) -> Path:
        """Write `config.json` + `model.safetensors` (CLIP included: the folder stands alone);
        push_to_hub: then upload the folder with a model card to the Hub repo `repo_id`
        (libra_tok.hub_push.push_to_hub, which takes `push_options`)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        atomic_save_safetensors(self.state_dict(), path / WEIGHTS_FILE, metadata={"format": "pt"})
        atomic_write_json(
            path / CONFIG_FILE,
            {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "libra_version": __version__,
                "config": self.config.to_dict(),
            },
        )
        if push_to_hub:
            from .hub_push import push_to_hub as push

            push(path, repo_id, expect="tokenizer", **push_options)
        return path

    # ---- shapes and parameters -------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.decoder.conv_out.weight.device

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    @property
    def codebook_size(self) -> int:
        return self.config.codebook_size

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """Quantizer and decoder; CLIP is frozen (official generator optimiser group)."""
        yield from self.quantizer.parameters()
        yield from self.decoder.parameters()

    # ---- the pipeline ----------------------------------------------------------------------
    def preprocess(self, images: Iterable[Image.Image | str | Path], pad_mode: str | None = None) -> torch.Tensor:
        """PIL images (or paths) -> (B, 3, R, R) CLIP-normalised float32 on the CPU. A path that
        is not a readable image is a ValueError naming it and the reason (libra_tok.data.load_image)."""
        if isinstance(images, (Image.Image, str, Path)):
            images = [images]
        images = [load_image(item) if isinstance(item, (str, Path)) else item for item in images]
        cfg = self.config
        return preprocess_images(images, cfg.resolution, pad_mode or cfg.pad_mode, cfg.image_mean, cfg.image_std)

    def target(self, pixels: torch.Tensor) -> torch.Tensor:
        """The reconstruction target of CLIP-normalised `pixels`: the image in [-1, 1]."""
        return clip_to_signed(pixels, self.config.image_mean, self.config.image_std)

    def _check_pixels(self, pixels: torch.Tensor) -> torch.Tensor:
        r = self.config.resolution
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != (3, r, r):
            raise ValueError(f"expected pixels of shape (B, 3, {r}, {r}) from preprocess(), got {tuple(pixels.shape)}")
        return pixels.to(self.device, dtype=torch.float32, non_blocking=True)

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, precision: str = "auto") -> EncodeOutput:
        """CLIP-normalised pixels -> ids and CLIP features. CLIP runs under `precision`
        (auto: bf16 autocast on CUDA, fp32 elsewhere); the quantizer always in fp32."""
        pixels = self._check_pixels(pixels)
        with autocast_for(pixels.device, precision):
            features = self.encoder(pixels)
        features = features.float()
        return EncodeOutput(ids=self.quantizer.encode_ids(features), features=features)

    @torch.no_grad()
    def decode(self, ids: torch.Tensor, precision: str = "auto") -> torch.Tensor:
        """(B, G*G, 2) ids -> images (B, 3, R, R) clamped to [-1, 1]."""
        n = self.num_tokens
        if ids.ndim != 3 or ids.shape[1] != n:
            raise ValueError(f"expected ids of shape (B, {n}, {self.config.num_codebooks}), got {tuple(ids.shape)}")
        ids = ids.to(self.device)
        z = self.quantizer.ids_to_z(ids)
        with autocast_for(ids.device, precision):
            images = self.decoder(z)
        return images.float().clamp_(-1.0, 1.0)

    def forward(self, pixels: torch.Tensor) -> TokenizerOutput:
        """Training pass: gradients reach the quantizer and decoder (straight-through LFQ)."""
        pixels = self._check_pixels(pixels)
        features = self.encoder(pixels)
        q = self.quantizer(features)
        return TokenizerOutput(reconstruction=self.decoder(q.z), ids=q.ids, aux_loss=q.aux_loss, features=features)


__all__ = ["ImageTokenizer", "EncodeOutput", "TokenizerOutput", "check_tokenizer_state"]
