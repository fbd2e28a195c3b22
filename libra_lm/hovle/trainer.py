"""`libra-lm train --arch hovle --stage distill|align|sft`: HoVLE's three stages on the trainer
of the Libra LM (libra_lm.train.Trainer: options, data order, resume, DDP/FSDP2, metrics, loss
plot, final folder). This subclass supplies what differs: the model (libra_lm.hovle.model,
built from a preset, an LLM folder or an earlier HoVLE stage), the datasets with raw pixels
(libra_lm.hovle.data), the losses (stage 1: libra_lm.hovle.objectives; stages 2 and 3: text
cross-entropy) and the final folder's format.

    from libra_lm.hovle.trainer import train
    train(TrainConfig(arch="hovle", stage="distill", data=["shards/"], preset="tiny", text_tokenizer="tokenizer.model"))
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from libra_tok.fileio import atomic_write_bytes
from libra_tok.run import barrier

from ..config import PRESETS as LIBRA_PRESETS
from ..config import LibraConfig
from ..data import InstructionDataset, PretrainDataset, ShardImages
from ..text import MODEL_FILE
from ..train import (
    TrainConfig,
    Trainer,
    TrainResult,
)
from .checkpoint import is_hovle_folder, llm_config, load_libra_teacher, read_hovle_config
from .config import PRESETS, HoVLEConfig, from_llama_fields
from .data import Collator, DistillDataset, HoVLEBatch, PixelDataset, ShardPixels
from .model import HoVLEForCausalLM
from .objectives import Distillation
from .stages import HOVLE_SHARD_STAGES


def module_preset(cfg: TrainConfig) -> str:
    """The HoVLE preset whose module (layers, patch size, shuffle) a run uses: --preset when it
    names one; hovle-tiny for Libra's `tiny` LLaMA; else hovle-2.6b's."""
    if cfg.preset in PRESETS:
        return cfg.preset
    return "hovle-tiny" if cfg.preset == "tiny" and cfg.init_from is None else "hovle-2.6b"


def hovle_config_for(cfg: TrainConfig, images: ShardImages | None) -> tuple[HoVLEConfig, str]:
    """(the run's HoVLEConfig, where the weights come from: "preset", "hovle" (an earlier
    stage's folder) or "llm" (an HF LLaMA or Libra folder: its LLaMA, a fresh module))."""
    image_fields = {}
    if images is not None:
        image_fields = dict(num_image_tokens=images.num_tokens, num_codebooks=images.num_codebooks,
                            codebook_size=images.codebook_size)
        if images.has_features:
            image_fields["contiguous_signal_size"] = images.feature_dim
    if cfg.init_from is None:
        if cfg.preset in PRESETS:
            return HoVLEConfig.from_preset(cfg.preset, **cfg.lm), "preset"
        if cfg.preset in LIBRA_PRESETS:  # the same LLaMA as Libra's preset of that name
            return from_llama_fields(LibraConfig.from_preset(cfg.preset), module_preset(cfg), **cfg.lm), "preset"
        raise ValueError(f"unknown preset {cfg.preset!r}: HoVLE presets {sorted(PRESETS)}, or a Libra preset "
                         f"{sorted(LIBRA_PRESETS)} (HoVLE on the same LLaMA)")
    from libra_tok.hub import CONFIG, resolve

    folder = resolve(cfg.init_from, CONFIG)
    if is_hovle_folder(folder):
        if cfg.lm:
            raise ValueError(f"--lm overrides apply to a fresh HoVLE; {folder} has its own config")
        return read_hovle_config(folder), "hovle"
    _, kind, libra_config = llm_config(folder)
    fields = {k: v for k, v in image_fields.items() if kind == "llama" or k != "contiguous_signal_size"}
    return from_llama_fields(libra_config.replace(**fields), module_preset(cfg), **cfg.lm), "llm"


class HoVLETrainer(Trainer):
    """The Libra trainer with HoVLE's model, data and losses (the hooks below)."""

    arch = "hovle"
    title = "HoVLE"
    shard_stages = HOVLE_SHARD_STAGES
    meta_device_fsdp = False  # FSDP2 shards the built model (_wrap); checkpoints gather full state dicts

    # -- setup ----------------------------------------------------------------------------------
    def _model_config(self) -> tuple[HoVLEConfig, str, dict[str, Any]]:
        config, kind = hovle_config_for(self.cfg, self.images)
        if self.cfg.stage == "distill":
            self.cfg.teacher = self._teacher_choice(kind)  # recorded in train_config.json: which map the run used
        return config, kind, {}

    def _check_memory(self) -> None:
        return None  # libra_lm.memory_plan counts the Libra model's parameters and activations

    def _image_encoder(self) -> None:
        return None  # HoVLE reads pixels; stage 1's teacher reads the features the shards store

    def _shard_images(self, folders):
        # Stage 1 reads the stored CLIP features (the teacher's input); stages 2 and 3 only ids and pixels.
        return ShardImages(folders, "hybrid" if self.cfg.stage == "distill" else "discrete")

    def _teacher_choice(self, init_kind: str) -> str:
        """"linear", or the Libra folder whose hybrid-input projection is the teacher: --teacher,
        or by default (auto) --init-from when it is a Libra model."""
        cfg = self.cfg
        if cfg.teacher not in (None, "auto"):
            return cfg.teacher
        if init_kind == "llm":
            _, kind, _ = llm_config(cfg.init_from)
            if kind in ("ours", "official"):
                return cfg.init_from
        return "linear"

    def _image_tokenizer_identity(self) -> dict[str, Any] | None:
        if self.shard_sets:
            return dict(self.shard_sets[0].tokenizer)
        if self.cfg.init_from and self.init_kind == "hovle":
            import json

            from libra_tok.hub import CONFIG, resolve

            return json.loads((resolve(self.cfg.init_from, CONFIG) / "config.json").read_text()).get("image_tokenizer")
        return None

    def _make_dataset(self, sources, images):
        cfg, config = self.cfg, self.lm_config
        if cfg.stage in HOVLE_SHARD_STAGES:
            pixels = ShardPixels(images, config)
            if cfg.stage == "distill":
                return DistillDataset(images, pixels, self.text_tokenizer_path, config, max_length=cfg.max_length,
                                      max_words=cfg.max_words)
            return PixelDataset(PretrainDataset(images, self.text_tokenizer_path, config, max_length=cfg.max_length,
                                                max_words=cfg.max_words, eos=cfg.caption_eos), pixels)
        base = InstructionDataset(sources or cfg.data, images, self.text_tokenizer_path, config,
                                  max_length=cfg.max_length)
        return PixelDataset(base, ShardPixels(images, config) if images is not None else None)

    def _build_model(self) -> nn.Module:
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # a fresh module (and a linear teacher map) is seeded
        if self.init_kind == "preset":
            model = HoVLEForCausalLM(self.lm_config)
        elif self.init_kind == "hovle":
            model = HoVLEForCausalLM.from_pretrained(cfg.init_from)
        else:
            model = HoVLEForCausalLM.from_llm(cfg.init_from, self.lm_config, trust_pickle=cfg.trust_pickle)
        model.frozen_llm = bool(cfg.frozen_llm)
        model.gradient_checkpointing = cfg.gradient_checkpointing
        model.train()
        if cfg.stage != "distill":
            return model
        config = self.lm_config
        if cfg.teacher == "linear":
            teacher: nn.Module = nn.Linear(config.contiguous_signal_size, config.hidden_size, bias=False)
            nn.init.normal_(teacher.weight, std=config.contiguous_signal_size ** -0.5)
        else:
            teacher = load_libra_teacher(cfg.teacher, config.hidden_size, trust_pickle=cfg.trust_pickle)
        return Distillation(model, teacher).train()

    @property
    def hovle(self) -> HoVLEForCausalLM:
        return self.model.hovle if isinstance(self.model, Distillation) else self.model

    def _wrap(self) -> nn.Module:
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DDP(self.model, device_ids=ids)
        if self.parallel == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh

            from ..sharding import shard

            shard(self.model, init_device_mesh(self.device.type, (self.d.world,)), self.dtype,
                  layers=self.hovle.decoder_layers())
        return self.model

    def _collator(self) -> Collator:
        cfg = self.cfg
        return Collator(self.lm_config, pack=cfg.packing, pack_length=cfg.pack_length or cfg.max_length)

    def save_final(self) -> Path:
        """The trained HoVLE model as a folder (config.json + model.safetensors) with the text
        tokenizer beside it, ready for `libra-lm generate --model` and the next stage's --init-from."""
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        final = self.out / "final"
        prefix = "hovle." if isinstance(self.model, Distillation) else ""
        if self.parallel == "fsdp":
            state = get_model_state_dict(self.model, options=self._state_options())
            if self.d.main:
                with torch.device("meta"):
                    model = HoVLEForCausalLM(self.lm_config)
                model.load_state_dict({k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)},
                                      assign=True)
                model.save_pretrained(final, image_tokenizer=self.image_tokenizer_identity)
        elif self.d.main:
            self.hovle.save_pretrained(final, image_tokenizer=self.image_tokenizer_identity)
        if self.d.main:
            atomic_write_bytes(final / MODEL_FILE, Path(self.text_tokenizer_path).read_bytes())
        barrier(self.d)
        return final

    # -- steps ----------------------------------------------------------------------------------
    def _objective(self, module: nn.Module, hb: HoVLEBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Stage 1: 1 - cos at image and text positions; stages 2 and 3: text cross-entropy."""
        b = hb.batch
        with self._autocast():
            if self.cfg.stage == "distill":
                out = module(b.input_ids, hb.pixel_values, b.clip_features, b.attention_mask, b.segment_ids)
                parts = torch.stack([out.image_sum, out.image_count, out.text_sum, out.text_count])
                return out.loss, parts.detach().double().cpu()
            out = module(b.input_ids, hb.pixel_values, b.attention_mask, b.labels, segment_ids=b.segment_ids)
        with torch.no_grad():
            parts = torch.tensor([0.0, 0.0, float(out.token_losses.sum()), hb.num_text_labels], dtype=torch.float64)
        return out.loss, parts

    def _counts(self, micro) -> list[int]:
        if self.cfg.stage != "distill":
            return [hb.num_text_labels for hb in micro]
        cfg = self.lm_config
        counts = []
        for hb in micro:
            ids, mask = hb.batch.input_ids[..., 0], hb.batch.attention_mask.bool()
            patch = (ids >= cfg.text_vocab_size) & (ids < cfg.text_vocab_size + cfg.codebook_size)
            counts.append(int(((ids < cfg.text_vocab_size) | patch)[mask].sum()))
        return counts


def train(config: TrainConfig, resume: bool = False, progress: bool = True, stop_at: int | None = None) -> TrainResult:
    """Train HoVLE (config.arch "hovle"); see libra_lm.train.TrainConfig for every option."""
    return HoVLETrainer(config, resume=resume, progress=progress).run(stop_at=stop_at)


__all__ = ["HoVLETrainer", "train", "hovle_config_for", "module_preset"]
