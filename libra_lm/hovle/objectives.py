"""Stage 1 of HoVLE (paper §3.2, distillation): the module's outputs regress a frozen teacher,
negative cosine similarity, reported as 1 - cos (0 = the teacher's direction).

    image patches  the teacher's embedding of the patch: the CLIP features of the shards mapped
                   to the LLM width, by a trained Libra model's hybrid-input projection (frozen,
                   libra_lm.hovle.checkpoint.LibraInputTeacher) or by a trainable linear map
    text tokens    the LLM's own (frozen) embedding of the token
BOI, EOI and padding have no target. Only the module (and a linear teacher map) trains; the LLM
is not run.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..model import TrainableParameters
from .model import HoVLEForCausalLM


@dataclass
class DistillOutput:
    loss: torch.Tensor  # mean of 1 - cos over the positions with a target
    image_sum: torch.Tensor  # sums and counts of 1 - cos per part (for the metrics)
    image_count: torch.Tensor
    text_sum: torch.Tensor
    text_count: torch.Tensor


class Distillation(TrainableParameters, nn.Module):
    """The HoVLE model and the teacher map of its image targets, as one module for the trainer
    (so that DDP/FSDP, checkpoints and the optimizer see a linear teacher map as a parameter)."""

    def __init__(self, hovle: HoVLEForCausalLM, teacher: nn.Module):
        super().__init__()
        self.hovle, self.teacher = hovle, teacher
        self.linear_teacher = isinstance(teacher, nn.Linear)
        hovle.frozen_llm = True

    @property
    def config(self):
        return self.hovle.config

    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None, clip_features: torch.Tensor | None,
                attention_mask: torch.Tensor | None = None, segment_ids: torch.Tensor | None = None) -> DistillOutput:
        cfg = self.hovle.config
        out = self.hovle(input_ids, pixel_values, attention_mask, segment_ids=segment_ids, embeddings_only=True)
        ids = input_ids[..., 0] if input_ids.ndim == 3 else input_ids
        real = attention_mask.bool() if attention_mask is not None else torch.ones_like(ids, dtype=torch.bool)
        is_text = (ids < cfg.text_vocab_size) & real
        is_patch = (ids >= cfg.text_vocab_size) & (ids < cfg.text_vocab_size + cfg.codebook_size) & real
        emb = out.embeddings.float()
        with torch.no_grad():
            text_target = self.hovle.language_model.model.embed_tokens(ids[is_text]).float()
        text_cost = 1 - F.cosine_similarity(emb[is_text], text_target, dim=-1)
        image_cost = emb.new_zeros(0)
        if bool(is_patch.any()):
            if clip_features is None:
                raise ValueError("stage 1 needs the CLIP features of the images (shards encoded with --save-features)")
            feats = clip_features[is_patch].float()
            if self.linear_teacher:
                target = self.teacher(feats.to(self.teacher.weight.dtype)).float()
            else:
                with torch.no_grad():
                    target = self.teacher(input_ids[is_patch], feats).float()
            image_cost = 1 - F.cosine_similarity(emb[is_patch], target, dim=-1)
        total = text_cost.sum() + image_cost.sum()
        count = text_cost.numel() + image_cost.numel()
        loss = total / max(count, 1)
        # Keep the linear map in the graph on batches without images (DDP/FSDP reduce every gradient).
        if self.linear_teacher:
            loss = loss + 0.0 * self.teacher.weight.sum()
        as_t = lambda v: torch.tensor(float(v), dtype=torch.float64)  # noqa: E731
        return DistillOutput(loss, image_cost.detach().double().sum().cpu(), as_t(image_cost.numel()),
                             text_cost.detach().double().sum().cpu(), as_t(text_cost.numel()))


__all__ = ["Distillation", "DistillOutput"]
