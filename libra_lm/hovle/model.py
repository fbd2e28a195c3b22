"""HoVLEForCausalLM: the holistic embedding module in front of a plain LLaMA.

    model = HoVLEForCausalLM.from_preset("hovle-tiny")       # or from_pretrained(folder), from_llm(LLaMA or Libra)
    out = model(input_ids, pixel_values, attention_mask, labels)
    out.loss, out.logits (B, N, V_t), out.embeddings (B, N, D) = the module's outputs = the LLM's inputs_embeds

`input_ids` are the joint ids of libra_lm.segments ((B, N, num_codebooks), or (B, N) text ids):
the sequences Libra's data pipeline and prompts build, BOI [patches] EOI for each image. HoVLE
reads column 0: text ids through its table, BOI/EOI through two learned rows, and every run of
patch positions is filled with the patch embeddings of the next image of `pixel_values`
(M, 3, R, R) (raw pixels, `libra_lm.hovle.data.preprocess`). The LLM predicts text only: labels
at image positions (vision ids) are ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..model import IGNORE_INDEX, KVCache, TrainableParameters, key_padding_mask, segment_positions
from ..routing import RMSNorm, init_official_
from ..segments import as_joint_ids, check_joint_ids
from .config import HoVLEConfig
from .embedding import HolisticEmbedding
from .llama import LlamaDecoderLayer, run_layers, stack_input


@dataclass
class HoVLEOutput:
    loss: torch.Tensor | None  # mean cross-entropy over the text labels
    logits: torch.Tensor | None  # (B, n, V_t) float32 (None when the LLM was not run)
    embeddings: torch.Tensor  # (B, N, D) the module's outputs (the LLM's inputs_embeds)
    hidden_states: torch.Tensor | None = None  # (B, n, D) after the LLM's final norm
    past_key_values: "HoVLECache | None" = None
    token_losses: torch.Tensor | None = None  # (B, N-1) cross-entropy per label, 0 where ignored


class HoVLECache:
    """The KV caches of both stacks (libra_lm.model.KVCache each) and the padding of every
    cached position."""

    def __init__(self, config: HoVLEConfig, capacity: int = 0):
        self.embedding = KVCache(config.num_embedding_layers, capacity)
        self.language = KVCache(config.num_hidden_layers, capacity)
        self.length = 0
        self.key_mask: torch.Tensor | None = None  # (B, length) True = real token
        self.has_padding = False

    def advance(self, key_mask: torch.Tensor, has_padding: bool) -> None:
        self.key_mask, self.has_padding, self.length = key_mask, has_padding, key_mask.shape[1]
        no_vision = torch.zeros_like(key_mask)
        for cache in (self.embedding, self.language):
            cache.advance(no_vision, key_mask, has_padding)


class LlamaBody(nn.Module):
    """HF LlamaModel's parameters: embed_tokens, layers, norm."""

    def __init__(self, config: HoVLEConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.text_vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(LlamaDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class LanguageModel(nn.Module):
    """A plain LLaMA (HF LlamaForCausalLM's names under `language_model.`); its embedding table
    is read only as the stage-1 target of text positions (the module feeds it embeddings)."""

    def __init__(self, config: HoVLEConfig):
        super().__init__()
        self.model = LlamaBody(config)
        self.lm_head = nn.Linear(config.hidden_size, config.text_vocab_size, bias=False)


class HoVLEForCausalLM(TrainableParameters, nn.Module):
    arch = "hovle"

    def __init__(self, config: HoVLEConfig | str):
        super().__init__()
        if isinstance(config, str):
            config = HoVLEConfig.from_preset(config)
        self.config = config
        self.embedding_model = HolisticEmbedding(config)
        self.language_model = LanguageModel(config)
        self.gradient_checkpointing = False  # recompute each decoder layer (both stacks) in the backward pass
        self.run_idle_modules = False  # the Libra model's switch; every HoVLE parameter runs each step anyway
        self._frozen_llm = False
        self.init_weights()

    # ---- construction and files ----------------------------------------------------------------
    def init_weights(self, modules: list[nn.Module] | None = None) -> None:
        """LLaMA's init (N(0, initializer_range), norms 1, padding row 0) for `modules` (default: all);
        the position embedding and the image boundaries likewise, conv/MLP biases 0."""
        std = self.config.initializer_range
        for module in modules if modules is not None else self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
            else:
                init_official_(module, std)
            for name, param in module.named_parameters(recurse=False):
                if name == "position_embedding":
                    nn.init.normal_(param, std=std)

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "HoVLEForCausalLM":
        return cls(HoVLEConfig.from_preset(name, **overrides))

    @classmethod
    def from_pretrained(cls, path: str | Path, *, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None, **config_overrides) -> "HoVLEForCausalLM":
        """A folder written by save_pretrained (or its Hub id)."""
        from .checkpoint import load_pretrained

        return load_pretrained(cls, path, device=device, dtype=dtype, **config_overrides)

    @classmethod
    def from_llm(cls, path: str | Path, config: HoVLEConfig | None = None, *, preset: str = "hovle-tiny",
                 device: str | torch.device | None = None, dtype: torch.dtype | None = None,
                 trust_pickle: bool = False, **config_overrides) -> "HoVLEForCausalLM":
        """A fresh module on the LLaMA of `path` (an HF LLaMA, or the text half of a Libra folder,
        ours or official); the module's table starts as a copy of the LLM's."""
        from .checkpoint import load_llm

        return load_llm(cls, path, config, preset=preset, device=device, dtype=dtype, trust_pickle=trust_pickle,
                        **config_overrides)

    def save_pretrained(self, path: str | Path, *, image_tokenizer: dict | None = None) -> Path:
        """config.json + model.safetensors, atomically (see libra_lm.hovle.checkpoint)."""
        from .checkpoint import save_pretrained

        return save_pretrained(self, path, image_tokenizer=image_tokenizer)

    # ---- parameters ------------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return self.language_model.lm_head.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.language_model.lm_head.weight.dtype

    @property
    def frozen_llm(self) -> bool:
        """True: only the holistic embedding module trains (HoVLE stages 1 and 2)."""
        return self._frozen_llm

    @frozen_llm.setter
    def frozen_llm(self, value: bool) -> None:
        for param in self.embedding_model.parameters():
            param.requires_grad_(True)
        for param in self.language_model.parameters():
            param.requires_grad_(not value)
        self._frozen_llm = bool(value)

    def decoder_layers(self) -> list[nn.Module]:
        """Every decoder layer of both stacks (the units of FSDP sharding)."""
        return [*self.embedding_model.layers, *self.language_model.model.layers]

    # ---- forward ---------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        *,
        position_ids: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
        past_key_values: HoVLECache | None = None,
        use_cache: bool = False,
        logits_to_keep: int = 0,
        embeddings_only: bool = False,
    ) -> HoVLEOutput:
        """input_ids (B, N, num_codebooks) joint ids or (B, N) text ids (checked: one host
        synchronisation); pixel_values (M, 3, R, R), one image per BOI [patches] EOI run in
        row-major order; attention_mask (B, N) or, with a cache, (B, past + N), 1 = token;
        labels like input_ids, -100 or a vision id = ignored, shifted inside (t predicts t + 1);
        segment_ids (B, N): packed sequences; past_key_values/use_cache: incremental decoding
        (both stacks cached); logits_to_keep: the head on the last k positions only (0 = all);
        embeddings_only: run the module only (stage 1), no LLM."""
        ids = check_joint_ids(input_ids, self.config)[..., 0]
        return self._forward(ids, pixel_values, attention_mask, labels, position_ids=position_ids,
                             segment_ids=segment_ids, cache=past_key_values, use_cache=use_cache,
                             logits_to_keep=logits_to_keep, embeddings_only=embeddings_only)

    def decode_step(self, input_ids: torch.Tensor, cache: HoVLECache) -> HoVLEOutput:
        """One decoding step on text ids (B, n) (or joint ids) after the cached positions,
        without a host synchronisation: the ids are the model's own samples, unchecked, real
        tokens (no padding), no image."""
        ids = as_joint_ids(input_ids, self.config)[..., 0]
        return self._forward(ids, None, None, None, cache=cache, check=False)

    def _forward(self, ids, pixel_values, attention_mask, labels, *, position_ids=None, segment_ids=None,
                 cache=None, use_cache=False, logits_to_keep=0, embeddings_only=False, check=True) -> HoVLEOutput:
        cfg = self.config
        b, n = ids.shape
        device = ids.device
        if cache is None and use_cache:
            cache = HoVLECache(cfg)
        past = cache.length if cache is not None else 0
        if cache is not None and segment_ids is not None:
            raise ValueError("segment_ids (packed sequences) cannot be combined with a KV cache")
        key_mask = key_padding_mask(attention_mask, cache, b, n, past, device)
        if attention_mask is None:
            has_padding = past > 0 and cache.has_padding
        else:
            has_padding = bool((~key_mask).any())
        if position_ids is None:
            if segment_ids is not None:
                position_ids = segment_positions(segment_ids)
            elif has_padding:
                position_ids = (key_mask.long().cumsum(1) - 1).clamp(min=0)[:, past:]
            else:
                position_ids = torch.arange(past, past + n, device=device).expand(b, n)
        if tuple(position_ids.shape) != (b, n):
            raise ValueError(f"position_ids must be (B, N) = ({b}, {n}), got {tuple(position_ids.shape)}")
        checkpointing = self.gradient_checkpointing and self.training and torch.is_grad_enabled()
        if checkpointing and cache is not None:
            raise ValueError("gradient checkpointing is for training; call without use_cache/past_key_values")

        x = self.embedding_model.embed(ids, pixel_values, check=check)
        ctx = stack_input(cfg, position_ids.to(device), key_mask if has_padding else None, segment_ids, past, x.dtype)
        emb = self.embedding_model(x, ctx, cache.embedding if cache is not None else None, checkpointing)
        if embeddings_only:
            return HoVLEOutput(None, None, emb)
        lm = self.language_model
        h = run_layers(lm.model.layers, emb, ctx, cache.language if cache is not None else None, checkpointing)
        h = lm.model.norm(h)
        if cache is not None:
            cache.advance(key_mask, has_padding)
        if logits_to_keep and logits_to_keep < n:
            if labels is not None:
                raise ValueError("labels need logits at every position; leave logits_to_keep at 0")
            h = h[:, -logits_to_keep:]
        logits = lm.lm_head(h).float()
        loss = per = None
        if labels is not None:
            per, valid = self.token_losses(logits, labels)
            loss = per.sum() / valid.sum().clamp(min=1)
        return HoVLEOutput(loss, logits, emb, h, cache, per)

    def text_labels(self, labels: torch.Tensor) -> torch.Tensor:
        """(B, N) text labels: column 0 of joint labels, vision ids and -100 -> IGNORE_INDEX
        (HoVLE generates text only)."""
        if labels.ndim == 3:
            labels = labels[..., 0]
        labels = labels.long()
        return torch.where((labels >= 0) & (labels < self.config.text_vocab_size), labels, IGNORE_INDEX)

    def token_losses(self, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cross-entropy of every label (B, N-1), 0 where ignored; the mask of those that count)."""
        if tuple(labels.shape[:2]) != tuple(logits.shape[:2]):
            raise ValueError(f"labels must have the shape of input_ids {tuple(logits.shape[:2])}, "
                             f"got {tuple(labels.shape)}")
        target = self.text_labels(labels.to(logits.device))[:, 1:]
        ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), target.flatten(), reduction="none").view(target.shape)
        valid = target != IGNORE_INDEX
        return ce * valid, valid


__all__ = ["HoVLEForCausalLM", "HoVLEOutput", "HoVLECache", "LanguageModel"]
