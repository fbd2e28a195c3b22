"""Libra LM training: pretraining (frozen LLM, image-caption shards) and instruction tuning
(LLaVA-format JSON), one process or torchrun DDP / FSDP2, exact resume, atomic checkpoints.

    from libra_lm.train import TrainConfig, train
    train(TrainConfig(stage="pretrain", data=["shards/"], preset="tiny", text_tokenizer="tokenizer.model",
                      steps=200, out_dir="runs/pretrain"))

Defaults are the official hyper-parameters (`libra/configs/libra_pretrain.yaml`,
`libra/configs/libra_instruction.yaml`; docs/official-formats.md#lm-behaviour): AdamW betas
(0.9, 0.99), eps 1e-8, weight decay 0.01 except norms and biases, cosine schedule with 5 %
warm-up, gradient clipping at 1.0, bf16 on GPU; pretraining lr 1e-4, 8 x 4 sequences per GPU
and step, 700 tokens; instruction tuning lr 2e-5, 2 x 8, 2048 tokens, one epoch. Pretraining
freezes every parameter without "vision" in its name (the official `frozen_language: True`
of `libra_pretrain.yaml`): those get neither gradients nor optimizer state, and checkpoints
hold only what trains.

The data order is a function of (seed, sample number) (`libra_tok.run.KeyedBatches`), so a
resumed run continues exactly as an uninterrupted one (bitwise on CPU). This module holds the
LM's steps, losses and validation; the run folder, checkpoints, resume rules, metrics, loss
plot and the loop come from `libra_tok.run`, shared with the tokenizer trainer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from libra_tok.fileio import atomic_write_bytes, atomic_write_json
from libra_tok.precision import autocast_for
from libra_tok.run import (
    TRUST_PICKLE_HELP,
    Cadence,
    KeyedBatches,
    RunOptions,
    Throughput,
    TrainingLoop,
    all_reduce_sum,
    barrier,
    holdout_indices,
    missing_keys,
    option,
    resume_state,
    warmup_cosine,
)

from .config import LibraConfig
from .data import INPUT_MODES, Batch, Collator, InstructionDataset, PretrainDataset, ShardImages, T2IDataset
from .hovle.stages import ARCHS, HOVLE_FROZEN_LLM, HOVLE_STAGE_DEFAULTS, HOVLE_STAGES  # arch hovle: docs/hovle.md
from .model import IGNORE_INDEX, LibraForCausalLM
from .routing import RMSNorm
from .text import MODEL_FILE

log = logging.getLogger(__name__)

STAGES = ("pretrain", "sft", "t2i")
SHARD_STAGES = ("pretrain", "t2i")  # stages whose data are shard folders (t2i: text-to-image, libra_lm.data.t2i)
# Official per-stage values (`libra/configs/libra_pretrain.yaml`, `libra_instruction.yaml`);
# steps None = `epochs` over the data.
STAGE_DEFAULTS: dict[str, dict[str, Any]] = {
    "pretrain": {"lr": 1e-4, "batch_size": 8, "grad_accum": 4, "max_length": 700, "steps": 40_000},
    "sft": {"lr": 2e-5, "batch_size": 2, "grad_accum": 8, "max_length": 2048, "steps": None},
    # t2i: the paper's text-to-image fine-tuning (§4.3, pairs from the pretraining data) states no
    # hyper-parameters; the pretraining ones, one pass over the pairs.
    "t2i": {"lr": 1e-4, "batch_size": 8, "grad_accum": 4, "max_length": 700, "steps": None},
}
PARALLEL = ("auto", "ddp", "fsdp")
LOSS_REDUCTIONS = ("tokens", "official")
CHECKPOINT_FORMAT = "libra-lm-train"
SHARDED_FORMAT = "libra-lm-train-dcp"  # --parallel fsdp: a DCP folder per checkpoint (libra_tok.run.dcp)


@dataclass
class TrainConfig(RunOptions):
    """Every field can be set in a YAML/JSON file and overridden on the command line.
    Fields left at None take the stage's official value (STAGE_DEFAULTS)."""

    # ---- arch hovle (libra_lm.hovle.trainer; docs/hovle.md) ----
    arch: str = option("libra, or hovle (the monolithic baseline; stages distill, align, sft; docs/hovle.md)",
                       default="libra")
    teacher: str | None = option("hovle --stage distill: the map of the shards' CLIP features to the LLM width: a "
                                 "Libra folder or Hub id (its trained hybrid-input projection, frozen), linear (a "
                                 "trainable map), or auto (init_from when it is a Libra model, else linear)",
                                 default="auto")
    # ---- end arch hovle ----
    stage: str = option("pretrain (image-caption shards, frozen LLM), sft (LLaVA JSON, everything trains) or t2i "
                        "(text-to-image on image-caption shards: caption, then the image; frozen LLM)",
                        default="pretrain")
    data: list[str] = option("pretrain, t2i: shard folders from `libra-tok encode`; sft: LLaVA-format JSON files",
                             default_factory=list)
    image_shards: list[str] = option("sft: shard folders holding the images the JSON names", default_factory=list)
    val_data: list[str] = option("validation data, as `data` (pretrain, t2i: shard folders; sft: JSON files)",
                                 default_factory=list)
    val_holdout: int = option("samples held out of `data` for validation (when no val_data is given)", default=0)
    val_every: int = option("steps between validation losses (official: 200)", default=200)
    val_max_samples: int | None = option("validate on at most this many samples (official: 5000)", default=5000)
    out_dir: str = option("run folder: checkpoints, metrics, loss plot, the final model", default="runs/libra-lm")
    init_from: str | None = option("start from this model: the folder or Hugging Face Hub id (org/name[@revision]) "
                                   "of an HF LLaMA, an official Libra or one of ours", default=None)
    preset: str = option("LM preset for a fresh model when init_from is not given (tiny or libra-7b)", default="tiny")
    lm: dict = option("LibraConfig overrides for a fresh or an HF LLaMA model, e.g. {num_hidden_layers: 4}",
                      default_factory=dict)
    text_tokenizer: str | None = option("SentencePiece tokenizer.model, a folder or Hub id holding one (default: "
                                        "the one in init_from)", default=None)
    image_tokenizer: str | None = option("image tokenizer (folder, vqgan.ckpt or Hub id) to recompute CLIP features "
                                         "when the shards store none (default: the one the shards name)", default=None)
    input: str = option("hybrid (ids + CLIP features, the paper) or discrete (ids only, ablation Tab. 3 f)",
                        default="hybrid")
    frozen_llm: bool | None = option("train only the vision parts (default: on for pretrain and t2i, off for sft)",
                                     default=None)
    steps: int | None = option("optimizer steps (default: pretrain 40000; sft, t2i: `epochs` over the data)",
                               default=None)
    epochs: float = option("sft, t2i without steps: passes over the data", default=1.0)
    batch_size: int | None = option("sequences per micro-batch and process (default: pretrain 8, sft 2)", default=None)
    grad_accum: int | None = option("micro-batches per optimizer step (default: pretrain 4, sft 8)", default=None)
    lr: float | None = option("peak learning rate (default: pretrain 1e-4, sft 2e-5)", default=None)
    betas: tuple[float, float] = option("AdamW betas", default=(0.9, 0.99))
    eps: float = option("AdamW epsilon", default=1e-8)
    weight_decay: float = option("AdamW weight decay (norm weights and biases excluded)", default=0.01)
    warmup_ratio: float = option("fraction of the steps with linear warm-up", default=0.05)
    min_lr_ratio: float = option("the cosine ends at lr * min_lr_ratio", default=0.0)
    grad_clip: float = option("max gradient norm (0 = off)", default=1.0)
    loss_reduction: str = option("tokens: mean over every label of the step, however it is split over micro-batches "
                                 "and processes; official: mean per micro-batch, averaged (HF Trainer)",
                                 default="tokens")
    max_length: int | None = option("tokens per sequence, longer ones cut (default: pretrain 700, sft 2048)",
                                    default=None)
    max_words: int = option("pretrain, t2i: caption words kept (official 64)", default=64)
    caption_eos: bool = option("pretrain: end captions with EOS (the official Libra-Base has none)", default=False)
    packing: bool = option("pack the sequences of a micro-batch into rows of pack_length tokens", default=False)
    pack_length: int | None = option("tokens per packed row (default: max_length)", default=None)
    gradient_checkpointing: bool = option("recompute each decoder layer in the backward pass (official: on)",
                                          default=True)
    precision: str = option("auto (bf16 on CUDA, fp32 on CPU), fp32 or bf16", default="auto")
    attn_backend: str = option("bridged attention: auto, eager, sdpa, flex or cuda", default="auto")
    parallel: str = option("multi-process training: auto (= ddp), ddp or fsdp (FSDP2 fully_shard per layer, built "
                           "on the meta device and loaded shard by shard, frozen weights in the compute dtype, sharded "
                           "DCP checkpoints that resume on any number of processes; docs/scale.md)", default="auto")
    device_memory_gb: float | None = option("memory of one device for the start-up memory plan (default: the GPU's; "
                                            "CPU runs are not planned); a run that cannot fit stops before loading",
                                            default=None)
    num_workers: int = option("data-loader worker processes", default=2)
    log_every: int = option("steps between metric lines", default=10)
    save_every: int = option("steps between checkpoints", default=1000)
    keep_checkpoints: int = option("checkpoints kept on disk (older ones are deleted)", default=2)
    max_minutes: float | None = option("stop (with a checkpoint) after this many minutes", default=None)
    seed: int = option("seed of fresh weights and of the data order", default=42)
    device: str | None = option("cuda, cpu, ... (default: cuda if available)", default=None)
    trust_pickle: bool = option(TRUST_PICKLE_HELP, default=False)

    def __post_init__(self) -> None:
        for name in ("data", "image_shards", "val_data"):
            setattr(self, name, [str(d) for d in getattr(self, name)])
        if isinstance(self.betas, list):
            self.betas = tuple(self.betas)
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {ARCHS}, got {self.arch!r}")
        stages, defaults = (HOVLE_STAGES, HOVLE_STAGE_DEFAULTS) if self.arch == "hovle" else (STAGES, STAGE_DEFAULTS)
        if self.stage not in stages:
            raise ValueError(f"stage must be one of {stages} for arch {self.arch}, got {self.stage!r}")
        for key, value in defaults[self.stage].items():
            if getattr(self, key) is None:
                setattr(self, key, value)
        if self.frozen_llm is None:
            self.frozen_llm = HOVLE_FROZEN_LLM[self.stage] if self.arch == "hovle" else self.stage in SHARD_STAGES
        checks = [
            (self.input in INPUT_MODES, f"input must be one of {INPUT_MODES}, got {self.input!r}"),
            (self.parallel in PARALLEL, f"parallel must be one of {PARALLEL}, got {self.parallel!r}"),
            (self.loss_reduction in LOSS_REDUCTIONS, f"loss_reduction must be one of {LOSS_REDUCTIONS}"),
            (self.precision in ("auto", "fp32", "bf16"),
             f"precision must be auto, fp32 or bf16, got {self.precision!r}"),
            (self.batch_size >= 1 and self.grad_accum >= 1, "batch_size and grad_accum must be >= 1"),
            (self.steps is None or self.steps >= 0, "steps must be >= 0"),
            (self.epochs > 0, "epochs must be > 0"),
            (0 <= self.warmup_ratio < 1, "warmup_ratio must be in [0, 1)"),
            (self.log_every >= 1 and self.save_every >= 1 and self.val_every >= 1,
             "log_every, save_every and val_every must be >= 1"),
        ]
        problems = [message for ok, message in checks if not ok]
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(names)}")
        return cls(**data)


# ---- losses ---------------------------------------------------------------------------------------
def label_loss_terms(out, labels: torch.Tensor, config: LibraConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-position terms of the official loss (`LibraForCausalLM.forward` in
    `libra/models/libra/modeling_libra.py`; docs/official-formats.md#lm-behaviour) from a forward with labels:
    (loss (B, N-1), valid, is_image). A text label costs its cross-entropy, an image label the
    mean over codebooks of each codebook's cross-entropy; when no label ignores a single
    codebook, the official loss is loss[valid].sum() / valid.sum(), and the image and text
    parts split that sum by label kind."""
    labels = labels[:, 1:].to(out.token_losses.device)
    per_codebook = labels != IGNORE_INDEX
    valid = per_codebook.any(-1)
    image = valid & (labels.max(-1).values >= config.text_vocab_size)
    loss = out.token_losses.sum(-1) / per_codebook.sum(-1).clamp(min=1)
    return loss.float(), valid, image


def sample_losses(batch: Batch, loss: torch.Tensor, valid: torch.Tensor) -> list[float]:
    """Mean loss of each example of a batch (labels inside the example only)."""
    out = []
    for row, start, length in batch.samples:
        # Predictions of positions start .. start+length-2 target the example's own tokens.
        sel = slice(start, start + length - 1)
        n = valid[row, sel].sum()
        out.append(float(loss[row, sel][valid[row, sel]].sum() / n.clamp(min=1)))
    return out


# ---- model and optimizer --------------------------------------------------------------------------
def lm_config_for(cfg: TrainConfig, images: ShardImages | None) -> tuple[LibraConfig, str, dict[str, Any]]:
    """(LM config of the run, where weights come from: "preset", "ours", "official" or "llama",
    the LibraConfig overrides an HF LLaMA folder needs). An HF LLaMA model takes its image
    sizes from the shards; a preset's must fit them (checked with the data)."""
    from libra_tok.hub import CONFIG, resolve

    from .checkpoint import (
        config_from_llama,
        config_from_official,
        config_from_ours,
        detect_format,
        read_config_json,
    )

    image_fields = {}
    if images is not None:
        image_fields = dict(num_image_tokens=images.num_tokens, num_codebooks=images.num_codebooks,
                            codebook_size=images.codebook_size)
        if cfg.input == "hybrid":
            image_fields["contiguous_signal_size"] = images.feature_dim
    if cfg.init_from is None:
        return LibraConfig.from_preset(cfg.preset, **cfg.lm), "preset", {}
    folder = resolve(cfg.init_from, CONFIG)  # a folder or a Hub id (libra_tok.hub)
    if not folder.is_dir():
        raise FileNotFoundError(f"--init-from {folder}: no such model folder")
    meta = read_config_json(folder)
    kind = detect_format(meta, folder)
    source = str(folder / "config.json")
    if kind == "llama":
        overrides = {**image_fields, **cfg.lm}
        return config_from_llama(meta, source, **overrides), kind, overrides
    if cfg.lm:
        raise ValueError(f"--lm overrides apply to a fresh model or an HF LLaMA; {folder} has its own config")
    return (config_from_ours(meta, source) if kind == "ours" else config_from_official(meta, source)), kind, {}


def build_model(cfg: TrainConfig, config: LibraConfig, kind: str, overrides: dict[str, Any]) -> LibraForCausalLM:
    torch.manual_seed(cfg.seed)  # fresh parts (a preset, the vision half of an HF LLaMA) are seeded
    if kind == "preset":
        model = LibraForCausalLM(config)
    else:
        model = LibraForCausalLM.from_pretrained(cfg.init_from, trust_pickle=cfg.trust_pickle, **overrides)
    model.frozen_llm = bool(cfg.frozen_llm)
    model.gradient_checkpointing = cfg.gradient_checkpointing
    model.attn_backend = cfg.attn_backend
    return model.train()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Trainable parameters in two AdamW groups, as the official trainer: weight decay on
    everything except norm weights and biases. Frozen parameters are left out entirely, so
    they get no optimizer state."""
    no_decay = {id(p) for m in model.modules() if isinstance(m, (RMSNorm, torch.nn.LayerNorm)) for p in m.parameters()}
    decay, plain = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (plain if id(p) in no_decay or name.endswith("bias") else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": plain, "weight_decay": 0.0}]


def frozen_fingerprint(model: torch.nn.Module) -> str:
    """A digest of the frozen weights (sums per tensor): resuming rebuilds them from the
    starting point, and this proves they are the ones the run began with."""
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            t = p.detach().double()
            digest.update(f"{name}:{tuple(p.shape)}:{float(t.sum())!r}:{float(t.abs().sum())!r}".encode())
    return digest.hexdigest()


# ---- image tokenizer for features ------------------------------------------------------------------
def resolve_image_tokenizer(images: ShardImages, path: str | None, device: torch.device, trust_pickle: bool = False):
    """The frozen tokenizer that wrote the shards (checked by its weights digest): `path`, else
    the source the shards record, else the matching preset (random weights made reproducibly)."""
    from libra_tok.pipeline import load_tokenizer_matching

    tok = load_tokenizer_matching(
        images.tokenizer, path, device, what="the shards",
        hint="pass the tokenizer used by `libra-tok encode` with --image-tokenizer PATH, re-encode with "
             "--save-features, or train with --input discrete", trust_pickle=trust_pickle)
    return tok.eval().requires_grad_(False)


def _describe_tokenizer(identity: dict[str, Any]) -> str:
    return f"{identity.get('source') or 'source not recorded'}, weights {str(identity.get('weights_sha256'))[:12]}"


def run_image_tokenizer(cfg: TrainConfig, shard_sets: Sequence[ShardImages]) -> dict[str, Any] | None:
    """The identity of the image tokenizer whose ids a run trains on (recorded in its final
    folder): that of its shards, else the one its starting folder records (a text-only run
    keeps it). A starting folder that records one accepts only shards of that tokenizer: its
    image ids mean nothing under another one. Folders without a record accept any shards."""
    from .checkpoint import recorded_image_tokenizer

    recorded = recorded_image_tokenizer(cfg.init_from) if cfg.init_from else None
    if recorded is not None:
        for images in shard_sets:
            found = images.tokenizer
            if (found.get("architecture_hash"), found.get("weights_sha256")) != \
                    (recorded.get("architecture_hash"), recorded.get("weights_sha256")):
                source = recorded.get("source")
                raise ValueError(
                    f"the shards in {', '.join(images.folders)} were encoded by another image tokenizer "
                    f"({_describe_tokenizer(found)}) than the one {cfg.init_from} was trained with "
                    f"({_describe_tokenizer(recorded)}): the model would read ids it never learned; re-encode the "
                    "images with that tokenizer" + (f" (libra-tok encode --checkpoint {source})" if source else "")
                    + " or start from a model trained on these shards")
    return dict(shard_sets[0].tokenizer) if shard_sets else recorded


# ---- the run ---------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    out_dir: Path
    final_model: Path
    step: int
    history: list[dict[str, Any]]
    skipped: dict[str, str]
    plot: Path | None


def _check_checkpoint(state: dict[str, Any]) -> str | None:
    if state.get("sharded"):
        if state.get("format") != SHARDED_FORMAT:
            return f"format {state.get('format')!r}, expected {SHARDED_FORMAT!r}"
        return missing_keys(state, ("step", "batches_seen", "samples_seen", "scheduler", "frozen_fingerprint"))
    if state.get("format") != CHECKPOINT_FORMAT:
        return f"format {state.get('format')!r}, expected {CHECKPOINT_FORMAT!r}"
    return missing_keys(state, ("step", "batches_seen", "trainable", "optimizer", "scheduler", "rng",
                                "frozen_fingerprint"))


class Trainer(TrainingLoop):
    throughput = Throughput("tokens_per_s", "tok_s", ".0f")
    loss_series = (("loss", "train loss", "tab:blue"), ("loss_image", "image part", "tab:orange"),
                   ("loss_text", "text part", "tab:green"), ("val_loss", "validation", "tab:red"))
    # What an architecture's trainer sets (libra_lm.hovle.trainer.HoVLETrainer is the other one):
    arch = "libra"
    title = "Libra LM"  # of the loss plot and the progress bar
    shard_stages = SHARD_STAGES  # stages whose training data are shard folders
    meta_device_fsdp = True  # --parallel fsdp builds on the meta device and writes DCP checkpoints

    def __init__(self, config: TrainConfig, resume: bool = False, progress: bool = True):
        super().__init__(config, progress)
        if config.arch != self.arch:
            raise ValueError(f"{type(self).__name__} trains arch {self.arch!r}, not {config.arch!r} (`libra-lm "
                             "train` chooses the trainer by --arch; in Python libra_lm.train.train for libra, "
                             "libra_lm.hovle.trainer.train for hovle)")
        cfg = config
        self.plot_title = f"{self.title} {cfg.stage}"
        self.progress_desc = f"train {'' if self.arch == 'libra' else self.arch + ' '}{cfg.stage}"
        if self.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True  # official run: tf32 on
            torch.backends.cudnn.allow_tf32 = True
        self.parallel = "none" if self.d.world == 1 else ("ddp" if cfg.parallel == "auto" else cfg.parallel)
        # --parallel fsdp: sharded loading and DCP checkpoints, also in one process (a run resumed on fewer).
        self.sharded_checkpoints = cfg.parallel == "fsdp" and self.meta_device_fsdp

        # Data first: a wrong path or an empty set fails before any weights are loaded.
        self.text_tokenizer_path = self._text_tokenizer_path()
        self.images = self._images(cfg.data if cfg.stage in self.shard_stages else cfg.image_shards)
        self.lm_config, self.init_kind, self.lm_overrides = self._model_config()
        self.train_data, self.val_data = self._datasets()
        self.image_tokenizer_identity = self._image_tokenizer_identity()

        # Read before any weights are loaded: a damaged checkpoint is reported at once.
        self.resume_from, resume_state_ = resume_state(self.out, resume, _check_checkpoint)

        self.world_batch = cfg.batch_size * cfg.grad_accum * self.d.world
        self.total_steps = cfg.steps if cfg.steps is not None else math.ceil(
            cfg.epochs * len(self.train_data) / self.world_batch)
        self.warmup_steps = math.ceil(self.total_steps * cfg.warmup_ratio)  # as HF get_warmup_steps

        self.dtype = torch.bfloat16 if (cfg.precision == "bf16" or (cfg.precision == "auto"
                                                                     and self.device.type == "cuda")) else torch.float32
        self.memory_plan = self._check_memory()  # before any weights are loaded
        if self.sharded_checkpoints:
            from .sharding import fingerprint

            self.model = self._build_sharded()
            self.fingerprint = fingerprint(((n, p) for n, p in self.model.named_parameters() if not p.requires_grad),
                                           self.d)
        else:
            self.model = self._build_model().to(self.device)
            self.fingerprint = frozen_fingerprint(self.model)
        self.image_tok = self._image_encoder()
        self.wrapped = self._wrap()
        self.opt = torch.optim.AdamW(param_groups(self.model, cfg.weight_decay), lr=cfg.lr, betas=cfg.betas,
                                     eps=cfg.eps)
        self.sched = warmup_cosine(self.opt, self.warmup_steps, self.total_steps, cfg.min_lr_ratio)
        self.trainable = [p for p in self.model.parameters() if p.requires_grad]

        self._id_mismatch_logged = False
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from, resume_state_)

    # -- setup: what an architecture's trainer overrides -------------------------------------------
    def _model_config(self) -> tuple[Any, str, dict[str, Any]]:
        """(the model config, where the weights come from, config overrides of the source)."""
        return lm_config_for(self.cfg, self.images)

    def _image_tokenizer_identity(self) -> dict[str, Any] | None:
        """The image tokenizer of the run's ids, recorded in checkpoints and the final folder."""
        return run_image_tokenizer(self.cfg, self.shard_sets)

    def _make_dataset(self, sources: Sequence[str] | None, images: ShardImages | None):
        """The dataset of `sources` (None: the training data); `images`: their shard images
        (shard stages) or the run's image lookup (conversations)."""
        cfg = self.cfg
        if cfg.stage == "t2i":
            return T2IDataset(images, self.text_tokenizer_path, self.lm_config, max_length=cfg.max_length,
                              max_words=cfg.max_words)
        if cfg.stage in self.shard_stages:
            return PretrainDataset(images, self.text_tokenizer_path, self.lm_config, max_length=cfg.max_length,
                                   max_words=cfg.max_words, eos=cfg.caption_eos)
        return InstructionDataset(sources or cfg.data, images, self.text_tokenizer_path, self.lm_config,
                                  max_length=cfg.max_length)

    def _build_model(self) -> torch.nn.Module:
        """The model on the CPU (one process, DDP, and FSDP without the meta-device build)."""
        return build_model(self.cfg, self.lm_config, self.init_kind, self.lm_overrides)

    def _image_encoder(self):
        """The frozen image tokenizer that computes CLIP features the shards do not store, or None."""
        if not any(images.needs_encoder for images in self.shard_sets):
            return None
        return resolve_image_tokenizer(self.images, self.cfg.image_tokenizer, self.device, self.cfg.trust_pickle)

    def _objective(self, module: torch.nn.Module, batch) -> tuple[torch.Tensor, torch.Tensor]:
        """(the loss to backpropagate, its parts: float64 [image loss sum, image labels, text
        loss sum, text labels]) of one micro-batch; the loss averages over `_counts` labels."""
        out = self._forward(module, batch, with_loss=True)
        with torch.no_grad():
            per, valid, image = label_loss_terms(out, batch.labels, self.lm_config)
            text = valid & ~image
            parts = torch.tensor([float(per[image].sum()), int(image.sum()), float(per[text].sum()), int(text.sum())],
                                 dtype=torch.float64)
        return out.loss, parts

    def _counts(self, micro: Sequence[Batch]) -> list[int]:
        """What each micro-batch's loss averages over (the token-mean reduction weighs by it)."""
        return [b.num_labels for b in micro]

    # -- setup ----------------------------------------------------------------------------------
    def _text_tokenizer_path(self) -> str:
        from libra_tok.hub import TEXT_TOKENIZER, resolve  # paths or Hub ids

        cfg = self.cfg
        if cfg.text_tokenizer:
            path = resolve(cfg.text_tokenizer, TEXT_TOKENIZER)
            return str(path / MODEL_FILE if path.is_dir() else path)
        in_init = resolve(cfg.init_from, TEXT_TOKENIZER) / MODEL_FILE if cfg.init_from else None
        if in_init is not None and in_init.is_file():
            return str(in_init)
        raise ValueError("no text tokenizer: pass --text-tokenizer PATH (a SentencePiece tokenizer.model; "
                         "`libra-lm train-text-tokenizer` makes a small one) or --init-from a folder that holds one")

    def _images(self, folders: Sequence[str]) -> ShardImages | None:
        if not folders:
            if self.cfg.stage in self.shard_stages:
                raise ValueError("no training data: pass the shard folders written by `libra-tok encode`")
            return None
        return self._shard_images(folders)

    def _shard_images(self, folders: Sequence[str]) -> ShardImages:
        # t2i: the images are what is generated, fed without CLIP features (paper §4.3), so none are read or computed.
        return ShardImages(folders, "discrete" if self.cfg.stage == "t2i" else self.cfg.input)

    def _datasets(self):
        cfg = self.cfg
        if not cfg.data:
            raise ValueError("no training data: pass " + ("shard folders" if cfg.stage in self.shard_stages else
                                                          "LLaVA-format JSON files"))

        def make(sources=None):
            if cfg.stage in self.shard_stages:
                images = self.images if sources is None else self._shard_images(sources)
                if images.tokenizer["weights_sha256"] != self.images.tokenizer["weights_sha256"]:
                    raise ValueError(f"the validation shards {', '.join(sources)} were encoded by another image "
                                     "tokenizer than the training shards; encode both with the same one")
                self.shard_sets.append(images)
                return self._make_dataset(sources, images)
            return self._make_dataset(sources, self.images)

        self.shard_sets = [self.images] if self.images is not None else []
        train_data = make()
        val_data = None
        if cfg.val_data:
            val_data = make(cfg.val_data)
        elif cfg.val_holdout > 0 and len(train_data) > 1:
            held = holdout_indices(len(train_data), cfg.val_holdout)
            val_data = _Subset(train_data, held)
            train_data = _Subset(train_data, np.delete(np.arange(len(train_data)), held))
        if val_data is not None and cfg.val_max_samples is not None and len(val_data) > cfg.val_max_samples:
            val_data = _Subset(val_data, np.arange(cfg.val_max_samples))  # official: the first 5000
        return train_data, val_data

    def _check_memory(self):
        """The memory plan per process (logged by the main process); stops a run that cannot fit."""
        from .memory_plan import check_fits, device_bytes, plan

        cfg = self.cfg
        mode = "fsdp" if self.sharded_checkpoints and self.d.world > 1 else self.parallel
        p = plan(self.lm_config, frozen_llm=bool(cfg.frozen_llm), parallel=mode, world=self.d.world,
                 precision="bf16" if self.dtype == torch.bfloat16 else "fp32", batch_size=cfg.batch_size,
                 seq_len=(cfg.pack_length or cfg.max_length) if cfg.packing else cfg.max_length,
                 checkpointing=cfg.gradient_checkpointing)
        if self.d.main:
            log.info("%s", p.table())
        capacity = device_bytes(self.device, cfg.device_memory_gb)
        if capacity is not None:
            check_fits(p, self.lm_config, capacity, str(self.device))
        return p

    def _build_sharded(self) -> LibraForCausalLM:
        """--parallel fsdp: built on the meta device, sharded, each process reading its slices
        of the starting weights (libra_lm.sharding)."""
        from .checkpoint import open_folder
        from .sharding import build_sharded

        cfg = self.cfg
        source = None
        if self.init_kind != "preset":
            _, source = open_folder(cfg.init_from, trust_pickle=cfg.trust_pickle, **self.lm_overrides)
        mesh = None
        if self.d.world > 1:
            from torch.distributed.device_mesh import init_device_mesh

            mesh = init_device_mesh(self.device.type, (self.d.world,))
        with contextlib.closing(source) if source is not None else contextlib.nullcontext():
            model = build_sharded(self.lm_config, self.init_kind, source, seed=cfg.seed,
                                  frozen_llm=bool(cfg.frozen_llm), mesh=mesh, param_dtype=self.dtype,
                                  device=self.device)
        model.gradient_checkpointing = cfg.gradient_checkpointing
        model.attn_backend = cfg.attn_backend
        return model.train()

    def _wrap(self) -> torch.nn.Module:
        # A batch without images (or text) would skip that modality's modules, and ranks would
        # then reduce different gradients: run them on zero rows instead (zero gradients).
        self.model.run_idle_modules = True
        if self.parallel == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            return DDP(self.model, device_ids=ids)
        return self.model  # fsdp: sharded when built (_build_sharded)

    # -- checkpoints ----------------------------------------------------------------------------
    def _state_options(self, **kw):
        from torch.distributed.checkpoint.state_dict import StateDictOptions

        return StateDictOptions(full_state_dict=True, cpu_offload=True, **kw)

    def checkpoint_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import (
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        if self.sharded_checkpoints:
            from torch.distributed.checkpoint.state_dict import StateDictOptions

            # Each process's shards of what trains (DTensors under FSDP), written by DCP in parallel.
            trainable = get_model_state_dict(self.model, options=StateDictOptions(ignore_frozen_params=True))
            return {"format": SHARDED_FORMAT, "total_steps": self.total_steps, "lm_config": self.lm_config.to_dict(),
                    "init_kind": self.init_kind, "lm_overrides": self.lm_overrides,
                    "image_tokenizer": self.image_tokenizer_identity, "frozen_dtype": str(self.dtype),
                    "scheduler": self.sched.state_dict(), "frozen_fingerprint": self.fingerprint,
                    "samples_seen": self.batches_seen * self.d.world * self.cfg.batch_size,
                    "tensors": {"model": trainable, "optimizer": get_optimizer_state_dict(self.model, self.opt)}}
        # Collective under FSDP: every rank calls it, rank 0 writes.
        trainable = get_model_state_dict(self.model, options=self._state_options(ignore_frozen_params=True))
        optimizer = get_optimizer_state_dict(self.model, self.opt, options=self._state_options())
        return {
            "format": CHECKPOINT_FORMAT,
            "total_steps": self.total_steps,
            "lm_config": self.lm_config.to_dict(),
            "trainable": trainable,
            "optimizer": optimizer,
            "scheduler": self.sched.state_dict(),
            "frozen_fingerprint": self.fingerprint,
        }

    def load_checkpoint_state(self, path: Path, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import (
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        names = {n for n, p in self.model.named_parameters() if p.requires_grad}
        if state.get("sharded"):
            return self._load_sharded(path, state, names)
        self._check_same_start(path, set(state["trainable"]), names, state["frozen_fingerprint"], "--lm or --seed")
        set_model_state_dict(self.model, state["trainable"], options=self._state_options(strict=False))
        set_optimizer_state_dict(self.model, self.opt, state["optimizer"], options=self._state_options())
        self.sched.load_state_dict(state["scheduler"])

    def _check_same_start(self, path: Path, saved: set[str], names: set[str], frozen_fingerprint: str,
                          last_options: str) -> None:
        """A checkpoint resumes only the run that wrote it: the same trainable set, the same
        frozen weights (`last_options`: the final options named in the message)."""
        if saved != names:
            raise ValueError(f"checkpoint {path} holds other trainable parameters than this run trains "
                             f"(frozen_llm {self.cfg.frozen_llm}); resume with the options the run started with")
        if frozen_fingerprint != self.fingerprint:
            raise ValueError(f"the frozen weights differ from those the run in {self.out} started from (was "
                             f"--init-from, --preset, {last_options} changed?); resume with the same "
                             "starting point")

    def _load_sharded(self, path: Path, state: dict[str, Any], names: set[str]) -> None:
        """Each process reads the slices it now owns: the same split as when saved, or another
        one on another number of processes (DCP re-shards)."""
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        from libra_tok.run import load_sharded, sharded_tensor_keys

        saved = {k.removeprefix("model.") for k in sharded_tensor_keys(path) if k.startswith("model.")}
        # Frozen weights are stored in the compute dtype here: --precision is part of the start.
        self._check_same_start(path, saved, names, state["frozen_fingerprint"], "--lm, --precision or --seed")
        options = StateDictOptions(ignore_frozen_params=True)
        tensors = {"model": get_model_state_dict(self.model, options=options),
                   "optimizer": get_optimizer_state_dict(self.model, self.opt)}
        load_sharded(path, tensors)
        set_model_state_dict(self.model, tensors["model"], options=StateDictOptions(strict=False))
        set_optimizer_state_dict(self.model, self.opt, tensors["optimizer"])
        self.sched.load_state_dict(state["scheduler"])

    def load_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        super().load_checkpoint(path, state)
        if "samples_seen" not in state:
            return
        # The data position in samples: a run resumed on another number of processes reads on from there.
        per_batch = self.d.world * self.cfg.batch_size
        if state["samples_seen"] % per_batch:
            raise ValueError(f"{path} was written after {state['samples_seen']} samples, which {self.d.world} "
                             f"process(es) x --batch-size {self.cfg.batch_size} do not divide; choose a batch size "
                             "that does (keep processes x batch size x grad accumulation as before for the same steps)")
        self.batches_seen = state["samples_seen"] // per_batch
        if state.get("world") != self.d.world and self.d.main:
            log.info("resuming a checkpoint of %s process(es) on %d: the same samples per step, but sums over "
                     "processes run in another order, so the steps equal an uninterrupted run to rounding, not "
                     "bitwise", state.get("world"), self.d.world)

    def save_final(self) -> Path:
        """The trained model as a libra-lm folder (config.json + model.safetensors) with the
        text tokenizer beside it, ready for `libra-lm generate --model`; config.json records
        the image tokenizer of the training ids (`run_image_tokenizer`)."""
        final = self.out / "final"
        if self.sharded_checkpoints:
            # Streamed from the last checkpoint by one process, one output shard in memory at a time.
            from .export import export_checkpoint

            barrier(self.d)
            if self.d.main:
                export_checkpoint(self.last_checkpoint, final, text_tokenizer=self.text_tokenizer_path,
                                  trust_pickle=self.cfg.trust_pickle, replace=True, progress=self.progress)
            barrier(self.d)
            return final
        if self.d.main:
            self.model.save_pretrained(final, image_tokenizer=self.image_tokenizer_identity)
            atomic_write_bytes(final / MODEL_FILE, Path(self.text_tokenizer_path).read_bytes())
        barrier(self.d)
        return final

    # -- batches --------------------------------------------------------------------------------
    def _collator(self) -> Collator:
        cfg = self.cfg
        return Collator(self.lm_config, pack=cfg.packing, pack_length=cfg.pack_length or cfg.max_length)

    def _loader(self) -> Iterator[Batch]:
        cfg = self.cfg
        batches = KeyedBatches(len(self.train_data), cfg.batch_size, cfg.seed, self.d, start=self.batches_seen)
        loader = DataLoader(self.train_data, batch_sampler=batches, num_workers=cfg.num_workers,
                            collate_fn=self._collator(), pin_memory=self.device.type == "cuda",
                            persistent_workers=cfg.num_workers > 0, prefetch_factor=4 if cfg.num_workers > 0 else None)
        return iter(loader)

    def features(self, batch: Batch) -> torch.Tensor | None:
        """CLIP features (B, N, C) of a batch on the device: stored ones, plus those the frozen
        tokenizer computes from `batch.pixels`; None in discrete mode (zeros in the model)."""
        feats = batch.clip_features
        if batch.pixels is None:
            return feats
        if self.image_tok is None:
            raise RuntimeError("a batch needs CLIP features computed but no image tokenizer was loaded")
        out = self.image_tok.encode(batch.pixels.to(self.device), precision=self.cfg.precision)
        if feats is None:
            b, n = batch.input_ids.shape[:2]
            feats = torch.zeros(b, n, self.lm_config.contiguous_signal_size, device=self.device)
        p = self.lm_config.num_image_tokens
        mismatched = 0
        for k, (row, start) in enumerate(batch.pixel_slots):
            feats[row, start:start + p] = out.features[k].to(feats.dtype)
            stored = batch.input_ids[row, start:start + p] - self.lm_config.text_vocab_size
            mismatched += int((stored != out.ids[k].to(stored.device)).any(-1).sum())
        total = p * len(batch.pixel_slots)
        if mismatched > 0.01 * total and not self._id_mismatch_logged:
            self._id_mismatch_logged = True
            log.warning("recomputed image ids differ from the shard's at %d of %d patches: the features may not "
                        "belong to these ids (other image files or tokenizer than at encoding?)", mismatched, total)
        return feats

    # -- steps ----------------------------------------------------------------------------------
    def _sync_context(self, sync: bool):
        if sync or self.parallel == "none":
            return contextlib.nullcontext()
        if self.parallel == "ddp":
            return self.wrapped.no_sync()
        self.model.set_requires_gradient_sync(False)
        return _restore_sync(self.model)

    def _autocast(self):
        # Under FSDP the mixed-precision policy casts the parameters instead.
        if self.parallel == "fsdp" or self.dtype == torch.float32:
            return contextlib.nullcontext()
        return autocast_for(self.device, "bf16")

    def _forward(self, module: torch.nn.Module, batch: Batch, with_loss: bool):
        with self._autocast():
            return module(batch.input_ids, self.features(batch), batch.attention_mask,
                          batch.labels if with_loss else None, segment_ids=batch.segment_ids)

    def train_step(self, micro: Sequence[Batch]) -> dict[str, float]:
        """One optimizer step over `micro` batches: backward each, average as loss_reduction
        says, clip, step. Returns the step's metrics (global over processes)."""
        cfg = self.cfg
        self.model.train()
        counts = self._counts(micro)
        total = float(all_reduce_sum(torch.tensor(float(sum(counts)), dtype=torch.float64), self.d))
        sums = torch.zeros(7, dtype=torch.float64)  # loss sum, count, image sum, n, text sum, n, tokens
        for i, batch in enumerate(micro):
            batch = batch.to(self.device, non_blocking=True)
            with self._sync_context(i == len(micro) - 1):
                loss, parts = self._objective(self.wrapped, batch)
                if cfg.loss_reduction == "tokens":
                    # DDP/FSDP average gradients over processes: scale by world to get the global token mean.
                    scaled = loss * (counts[i] * self.d.world / max(total, 1.0))
                else:
                    scaled = loss / len(micro)
                scaled.backward()
            sums += torch.cat([torch.tensor([float(loss.detach()) * counts[i], counts[i]], dtype=torch.float64), parts,
                               torch.tensor([batch.num_tokens], dtype=torch.float64)])
        sums = all_reduce_sum(sums, self.d)
        loss_value = float(sums[0] / sums[1].clamp(min=1))
        if not math.isfinite(loss_value):
            raise self.diverged(loss_value)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.trainable, cfg.grad_clip if cfg.grad_clip > 0 else float("inf"))
        if hasattr(grad_norm, "full_tensor"):
            grad_norm = grad_norm.full_tensor()
        lr = self.sched.get_last_lr()[0]
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        return {
            "loss": loss_value,
            "loss_image": float(sums[2] / sums[3]) if sums[3] > 0 else None,
            "loss_text": float(sums[4] / sums[5]) if sums[5] > 0 else None,
            "lr": lr,
            "grad_norm": float(grad_norm),
            "labels": int(sums[1]),
            "tokens": int(sums[6]),
        }

    @torch.no_grad()
    def validate(self) -> dict[str, float]:
        """Loss of the validation set (global token mean and its parts), on every process."""
        if self.val_data is None:
            return {}
        cfg = self.cfg
        self.model.eval()
        n = len(self.val_data)
        chunks = [list(range(s, min(n, s + cfg.batch_size))) for s in range(0, n, cfg.batch_size)]
        mine = chunks[self.d.rank::self.d.world]
        # Every rank runs as many forwards (FSDP gathers weights collectively); extra ones weigh 0.
        rounds = math.ceil(len(chunks) / self.d.world)
        weights = [1.0] * len(mine) + [0.0] * (rounds - len(mine))
        mine = mine + [chunks[0]] * (rounds - len(mine))
        loader = DataLoader(self.val_data, batch_sampler=mine, num_workers=min(cfg.num_workers, 2),
                            collate_fn=self._collator())
        sums = torch.zeros(4, dtype=torch.float64)  # image loss sum, n, text loss sum, n
        module = self.model if self.parallel == "ddp" else self.wrapped  # no DDP hooks for evaluation
        for weight, batch in zip(weights, loader, strict=True):
            _, parts = self._objective(module, batch.to(self.device))
            sums += weight * parts
        sums = all_reduce_sum(sums, self.d)
        self.model.train()
        # The token mean over every label, whatever the training reduction.
        row = {"val_loss": float((sums[0] + sums[2]) / (sums[1] + sums[3]).clamp(min=1)), "val_samples": n}
        if sums[3] > 0:
            row["val_loss_text"] = float(sums[2] / sums[3])
        if sums[1] > 0:
            row["val_loss_image"] = float(sums[0] / sums[1])
        return row

    # -- the loop -------------------------------------------------------------------------------
    def cadence(self, last: int) -> Cadence:
        cfg = self.cfg
        return Cadence(cfg.log_every, cfg.save_every, cfg.max_minutes,
                       eval_every=cfg.val_every if self.val_data is not None else None, eval_at=self.total_steps)

    def training_steps(self) -> Iterator[tuple[dict[str, Any], float]]:
        """One step per `grad_accum` micro-batches: (metrics, tokens over all processes)."""
        batches = self._loader()
        while True:
            micro = [next(batches) for _ in range(self.cfg.grad_accum)]
            self.batches_seen += self.cfg.grad_accum
            row = self.train_step(micro)
            yield row, row["tokens"]

    def log_fields(self, row: dict[str, Any]) -> dict[str, Any]:
        return {**row, "epoch": self.batches_seen * self.cfg.batch_size * self.d.world / len(self.train_data)}

    def evaluate(self) -> dict[str, float]:
        return self.validate()

    def run(self, stop_at: int | None = None) -> TrainResult:
        """Train until the configured steps (or `stop_at`, e.g. to split a run into chunks),
        then write a checkpoint, the final model and the loss plot."""
        cfg = self.cfg
        if self.d.main:
            log.info("%s: %d samples, %d steps of %d sequences (%d x %d x %d processes), %.1f M of %.1f M parameters "
                     "train", cfg.stage, len(self.train_data), self.total_steps, self.world_batch, cfg.batch_size,
                     cfg.grad_accum, self.d.world, self.model.num_parameters(True) / 1e6,
                     self.model.num_parameters() / 1e6)
        stop_reason = self.run_steps(stop_at)
        final = self.save_final()
        if self.d.main:
            skipped = self.images_skipped()
            if skipped:
                data = self.train_data.dataset if isinstance(self.train_data, _Subset) else self.train_data
                log.info("%d training sample(s) left out (%s)", getattr(data, "num_skipped", len(skipped)),
                         self.out / "skipped_samples.json")
                atomic_write_json(self.out / "skipped_samples.json", skipped)
        plot = self.finish_run(stop_reason, final, "model")
        return TrainResult(self.out, final, self.step, self.history, self.images_skipped(), plot)

    def images_skipped(self) -> dict[str, str]:
        data = self.train_data.dataset if isinstance(self.train_data, _Subset) else self.train_data
        return dict(getattr(data, "skipped", {}))


class _Subset(torch.utils.data.Dataset):
    """Positions of a dataset (keys may be (position, seed) as KeyedBatches gives them)."""

    def __init__(self, dataset, positions: Sequence[int]):
        self.dataset, self.positions = dataset, np.asarray(positions, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, key):
        position = key[0] if isinstance(key, tuple) else key
        return self.dataset[int(self.positions[position])]


@contextlib.contextmanager
def _restore_sync(module):
    try:
        yield
    finally:
        module.set_requires_gradient_sync(True)


def train(config: TrainConfig, resume: bool = False, progress: bool = True, stop_at: int | None = None) -> TrainResult:
    """Train the LM; see TrainConfig for every option. `resume` continues the run in
    `config.out_dir` from its latest checkpoint; `stop_at` ends this call early at that step
    (the schedule still spans all steps)."""
    return Trainer(config, resume=resume, progress=progress).run(stop_at=stop_at)


__all__ = ["TrainConfig", "Trainer", "TrainResult", "train", "label_loss_terms", "sample_losses", "param_groups",
           "lm_config_for", "build_model", "resolve_image_tokenizer", "run_image_tokenizer", "STAGE_DEFAULTS"]
