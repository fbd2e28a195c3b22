"""Tokenizer training: one process or torchrun DDP, exact resume, atomic checkpoints.

    from libra_tok.train import TrainConfig, train
    train(TrainConfig(data=["images/"], preset="tiny", steps=200, out_dir="runs/tiny"))

The frozen CLIP encoder is never trained; the generator (quantizer + decoder) and the PatchGAN
discriminator each have an AdamW (betas 0.5, 0.9, as the official optimisers in
`libra/models/libra/taming/models/vqgan.py`). Every random choice of the data pipeline is a
function of (seed, sample number), so a run resumed from a checkpoint continues exactly as an
uninterrupted one (bitwise on CPU).

This module holds the tokenizer's steps, losses, EMA and held-out samples; the run folder,
checkpoints, resume rules, metrics and the loop come from `libra_tok.run`, shared with the LM
trainer.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from .config import TokenizerConfig, check_fields
from .data import ImageReadError, ImageRecord, TrainImages, collate_images, read_image, scan_inputs
from .fileio import atomic_save_image, atomic_write_json
from .loss import LossWeights, NLayerDiscriminator, TokenizerLoss
from .metrics import build_lpips, psnr_signed
from .model import ImageTokenizer
from .precision import autocast_for
from .preprocess import preprocess_image, side_by_side, to_pil
from .run import (
    TRUST_PICKLE_HELP,
    Cadence,
    KeyedBatches,
    RunOptions,
    TrainingLoop,
    all_reduce_sum,
    holdout_indices,
    lr_lambda,
    missing_keys,
    option,
    resume_state,
    warmup_cosine,
)

log = logging.getLogger(__name__)


@dataclass
class TrainConfig(RunOptions):
    """Every field can be set in a YAML/JSON file and overridden on the command line."""

    data: list[str] = option("image folders (recursive), file lists or tar shards", default_factory=list)
    out_dir: str = option("run folder: checkpoints, samples, metrics, the final tokenizer", default="runs/libra-tok")
    preset: str = option("tokenizer preset (libra-l336 or tiny)", default="tiny")
    tokenizer: dict = option("TokenizerConfig overrides, e.g. {clip_pretrained: /path/clip.bin}", default_factory=dict)
    init_from: str | None = option("start from this tokenizer (folder, official vqgan.ckpt or Hugging Face Hub id "
                                   "org/name[@revision]) instead of the preset", default=None)
    steps: int = option("optimiser steps", default=2000)
    batch_size: int = option("images per step and process", default=8)
    lr: float = option("peak learning rate of the generator (quantizer + decoder)", default=1e-4)
    disc_lr: float | None = option("peak learning rate of the discriminator (default: lr)", default=None)
    betas: tuple[float, float] = option("AdamW betas (official: 0.5, 0.9)", default=(0.5, 0.9))
    weight_decay: float = option("AdamW weight decay", default=0.0)
    warmup_steps: int = option("linear warm-up steps", default=500)
    min_lr_ratio: float = option("cosine decays to lr * min_lr_ratio", default=0.1)
    grad_clip: float = option("max gradient norm (0 = off)", default=1.0)
    l1_weight: float = option("L1 reconstruction weight", default=1.0)
    l2_weight: float = option("L2 reconstruction weight", default=0.0)
    perceptual_weight: float = option("LPIPS weight (0 = off; needs the backbone weights in TORCH_HOME)", default=1.0)
    perceptual_net: str = option("LPIPS backbone: vgg (official) or alex", default="vgg")
    weights_dir: str | None = option("folder of the LPIPS backbone weights (vgg16-397923af.pth / "
                                     "alexnet-owt-7be5be79.pth; default: $TORCH_HOME/hub/checkpoints)", default=None)
    codebook_weight: float = option("weight of the LFQ entropy + commitment loss", default=1.0)
    disc_weight: float = option("GAN weight (times the adaptive weight)", default=1.0)
    disc_start: int = option("step at which the GAN loss starts (-1 = never)", default=5000)
    disc_layers: int = option("PatchGAN layers", default=3)
    disc_channels: int = option("PatchGAN base channels", default=64)
    ema_decay: float = option("EMA decay of the trainable weights (0 = off)", default=0.999)
    crop_scale: tuple[float, float] = option("random-resized-crop area range", default=(0.5, 1.0))
    flip: bool = option("random horizontal flips", default=True)
    holdout: int = option("images held out of training for sample grids and held-out PSNR", default=8)
    precision: str = option("auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16; LFQ always fp32", default="auto")
    num_workers: int = option("data-loader worker processes", default=2)
    cache_images: bool = option("keep decoded images in memory (small datasets)", default=False)
    log_every: int = option("steps between metric lines", default=10)
    save_every: int = option("steps between checkpoints", default=1000)
    sample_every: int = option("steps between reconstruction grids of the held-out images", default=500)
    keep_checkpoints: int = option("checkpoints kept on disk (older ones are deleted)", default=2)
    max_minutes: float | None = option("stop (with a checkpoint) after this many minutes", default=None)
    seed: int = option("seed of initialisation and data order", default=0)
    device: str | None = option("cuda, cpu, ... (default: cuda if available)", default=None)
    trust_pickle: bool = option(TRUST_PICKLE_HELP, default=False)

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, list) and f.name != "data":
                setattr(self, f.name, tuple(value))
        self.data = [str(d) for d in self.data]
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"precision must be auto, fp32 or bf16 for training, got {self.precision!r}")
        if self.batch_size < 1 or self.steps < 0:
            raise ValueError("batch_size must be >= 1 and steps >= 0")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return cls(**check_fields(cls, data))

    def loss_weights(self) -> LossWeights:
        return LossWeights(l1=self.l1_weight, l2=self.l2_weight, perceptual=self.perceptual_weight,
                           codebook=self.codebook_weight, disc=self.disc_weight,
                           disc_start=self.disc_start if self.disc_start >= 0 else 2**62)


def split_holdout(records: Sequence[ImageRecord], holdout: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train, held out) records, held-out ones chosen by `holdout_indices`."""
    held = set(holdout_indices(len(records), holdout).tolist())
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


# ---- EMA ----------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of the trainable weights (quantizer + decoder)."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        keys = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [params[k].detach().float() for k in keys],
                             1.0 - self.decay)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.shadow

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        missing = set(self.shadow) ^ set(state)
        if missing:
            raise ValueError(f"EMA state does not match the model: {sorted(missing)[:5]}")
        self.shadow = {k: v.clone().float() for k, v in state.items()}


def trainable_params(tok: ImageTokenizer) -> dict[str, nn.Parameter]:
    """The trained parameters by name: quantizer and decoder (CLIP has requires_grad off)."""
    return {name: p for name, p in tok.named_parameters() if p.requires_grad}


# ---- the run ------------------------------------------------------------------------------------
CHECKPOINT_KEYS = ("step", "batches_seen", "trainable", "opt", "sched", "rng")


def _check_checkpoint(state: dict[str, Any]) -> str | None:
    return missing_keys(state, CHECKPOINT_KEYS)


@dataclass
class TrainResult:
    out_dir: Path
    final_tokenizer: Path
    step: int
    history: list[dict[str, Any]]
    skipped_images: dict[str, str]
    plot: Path | None = None  # loss.png


class Trainer(TrainingLoop):
    loss_series = (("loss", "generator loss", "tab:blue"), ("l1", "L1", "tab:orange"), ("l2", "L2", "tab:green"),
                   ("lpips", "LPIPS", "tab:purple"), ("aux", "LFQ entropy + commitment", "tab:brown"),
                   ("g_loss", "GAN (generator)", "tab:pink"), ("d_loss", "discriminator", "tab:red"))
    plot_title = "Libra tokenizer training"

    def __init__(self, config: TrainConfig, resume: bool = False, progress: bool = True):
        super().__init__(config, progress)
        self.total_steps = config.steps

        # Data first: an empty or unreadable input fails before any model is built.
        self.skipped: dict[str, str] = {}  # input -> reason: left out while listing or unreadable when read
        self.records, self.holdout = self._split_data()

        # Read before any model is built: a damaged checkpoint is reported at once.
        self.resume_from, resume_state_ = resume_state(self.out, resume, _check_checkpoint)

        # LPIPS weights are read from disk (never downloaded): a missing file fails here, early.
        perceptual = (build_lpips(config.perceptual_net, config.weights_dir, device=self.device)
                      if config.perceptual_weight > 0 else None)
        torch.manual_seed(config.seed)
        self.tok = self._build_tokenizer().to(self.device)
        self.disc = None
        if config.disc_start >= 0 and config.disc_weight > 0:
            self.disc = NLayerDiscriminator(ndf=config.disc_channels, n_layers=config.disc_layers).to(self.device)
        self.loss = TokenizerLoss(config.loss_weights(), perceptual, None)

        self.gen_params = list(self.tok.trainable_parameters())
        self.opt = torch.optim.AdamW(self.gen_params, lr=config.lr, betas=config.betas,
                                     weight_decay=config.weight_decay)
        self.sched = warmup_cosine(self.opt, config.warmup_steps, config.steps, config.min_lr_ratio)
        self.opt_d = None
        if self.disc is not None:
            self.opt_d = torch.optim.AdamW(self.disc.parameters(), lr=config.disc_lr or config.lr, betas=config.betas,
                                           weight_decay=config.weight_decay)
        self.ema = EMA(trainable_params(self.tok), config.ema_decay) if config.ema_decay > 0 else None

        # DDP over the trainable parts; CLIP has no trainable parameter and is left alone.
        self.tok_ddp: nn.Module = self.tok
        self.disc_ddp = self.disc
        if self.d.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.device.index] if self.device.type == "cuda" else None
            self.tok_ddp = DDP(self.tok, device_ids=ids)
            if self.disc is not None:
                self.disc_ddp = DDP(self.disc, device_ids=ids)
        self.loss.discriminator = self.disc  # the generator's GAN term runs the local module

        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from, resume_state_)

    # -- setup ------------------------------------------------------------------------------
    def _split_data(self) -> tuple[list[ImageRecord], list[ImageRecord]]:
        cfg = self.cfg
        if not cfg.data:
            raise ValueError("no training data given: pass image folders, file lists or tar shards")
        scan = scan_inputs(cfg.data)
        for row in scan.skipped:
            self.skipped[ImageRecord(row["source"], row.get("member")).name] = row["reason"]
        if scan.skipped:
            log.warning("%d input(s) left out while listing the data (listed in skipped_images.json), e.g. %s: %s",
                        len(scan.skipped), scan.skipped[0]["source"], scan.skipped[0]["reason"])
        records = scan.records
        if not records:
            skipped = (f"; {len(scan.skipped)} input(s) left out, e.g. {scan.skipped[0]['source']}: "
                       f"{scan.skipped[0]['reason']}") if scan.skipped else ""
            raise ValueError(f"no images found in {', '.join(cfg.data)} (searched recursively for "
                             f".jpg .jpeg .png .webp .bmp .gif .tif .tiff and .tar shards){skipped}")
        probe = records[: min(16, len(records))]
        reasons = []
        for rec in probe:
            try:
                read_image(rec)
                break
            except ImageReadError as err:
                reasons.append(f"{rec.name}: {err}")
        else:
            raise ValueError(f"none of the first {len(probe)} images could be read: " + "; ".join(reasons[:4]))
        return split_holdout(records, cfg.holdout)

    def _tokenizer_config(self) -> TokenizerConfig:
        return TokenizerConfig.from_preset(self.cfg.preset, **self.cfg.tokenizer)

    def _build_tokenizer(self) -> ImageTokenizer:
        base = self.out / "init_tokenizer"
        if self.resume_from is not None and (base / "config.json").is_file():
            return ImageTokenizer.from_pretrained(base)  # the exact starting CLIP and weights
        if self.cfg.init_from:
            tok = ImageTokenizer.from_pretrained(self.cfg.init_from, trust_pickle=self.cfg.trust_pickle)
        else:
            tok = ImageTokenizer(self._tokenizer_config(), trust_pickle=self.cfg.trust_pickle)  # CLIP weights file
        if self.d.main:
            tok.save_pretrained(base)  # CLIP is frozen: stored once here, not in every checkpoint
        return tok

    # -- checkpoints --------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        if not self.d.main:
            return {}  # only the main process writes, and nothing here is collective
        state = {
            "trainable": {k: v.detach().cpu() for k, v in self.tok.state_dict().items()
                          if k.startswith(("quantizer.", "decoder."))},
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "skipped_images": self.skipped,
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.disc is not None:
            state.update(disc=self.disc.state_dict(), opt_d=self.opt_d.state_dict())
        return state

    def load_checkpoint_state(self, path: Path, state: dict[str, Any]) -> None:
        missing = self.tok.load_state_dict(state["trainable"], strict=False)
        unexpected_trainable = [k for k in missing.missing_keys if k.startswith(("quantizer.", "decoder."))]
        if unexpected_trainable or missing.unexpected_keys:
            raise ValueError(f"checkpoint {path} does not match the model: {unexpected_trainable[:5]} "
                             f"{missing.unexpected_keys[:5]}")
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        if self.disc is not None and "disc" in state:
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["opt_d"])
        self.skipped.update(state.get("skipped_images", {}))  # those met while training before the checkpoint

    # -- metrics --------------------------------------------------------------------------------
    def log_fields(self, row: dict[str, Any]) -> dict[str, Any]:
        """Loss parts averaged over the processes (so metrics describe the global batch), and the
        number of inputs skipped so far."""
        if self.d.world > 1:
            keys = sorted(k for k, v in row.items() if isinstance(v, float) and k not in ("loss", "lr", "grad_norm"))
            values = all_reduce_sum(torch.tensor([row[k] for k in keys], dtype=torch.float64), self.d) / self.d.world
            row = {**row, **dict(zip(keys, values.tolist(), strict=True))}
        return {**row, "skipped_images": len(self.skipped)}

    def evaluate(self) -> dict[str, float]:
        return self.sample()

    @torch.no_grad()
    def sample(self) -> dict[str, float]:
        """Reconstruction grid and PSNR of the held-out images (EMA weights when kept)."""
        if not self.holdout or not self.d.main:
            return {}
        images = []
        for rec in self.holdout:
            try:
                images.append(preprocess_image(read_image(rec), self.tok.config.resolution, self.tok.config.pad_mode,
                                               self.tok.config.image_mean, self.tok.config.image_std))
            except ImageReadError:
                continue
        if not images:
            return {}
        pixels = torch.stack(images)
        with self.ema_weights():
            ids = self.tok.encode(pixels, precision=self.cfg.precision).ids
            recon = self.tok.decode(ids, precision=self.cfg.precision)
        target = self.tok.target(pixels.to(recon.device))
        grid = side_by_side([[to_pil(t), to_pil(r)] for t, r in zip(target, recon, strict=True)])
        atomic_save_image(grid, self.out / "samples" / f"step-{self.step:08d}.png")
        return {"holdout_psnr": float(psnr_signed(recon, target).mean())}

    @contextlib.contextmanager
    def ema_weights(self) -> Iterator[None]:
        """Inside the block the trainable weights are the EMA weights (when an EMA is kept)."""
        if self.ema is None:
            yield
            return
        params = trainable_params(self.tok)
        backup = {k: v.detach().clone() for k, v in params.items()}
        with torch.no_grad():
            for k, v in params.items():
                v.copy_(self.ema.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in params.items():
                    v.copy_(backup[k])

    # -- the loop -----------------------------------------------------------------------------
    def cadence(self, last: int) -> Cadence:
        cfg = self.cfg
        return Cadence(cfg.log_every, cfg.save_every, cfg.max_minutes, eval_every=cfg.sample_every, eval_at=last,
                       eval_in_log_row=True)

    def _loader(self) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, list]]:
        cfg = self.cfg
        tc = self.tok.config
        dataset = TrainImages(self.records, tc.resolution, cfg.crop_scale, cfg.flip, tc.image_mean, tc.image_std,
                              cache=cfg.cache_images)
        batches = KeyedBatches(len(self.records), cfg.batch_size, cfg.seed, self.d, start=self.batches_seen)
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers, collate_fn=collate_images,
                            pin_memory=self.device.type == "cuda", persistent_workers=cfg.num_workers > 0,
                            prefetch_factor=4 if cfg.num_workers > 0 else None)
        return iter(loader)

    def training_steps(self) -> Iterator[tuple[dict[str, float], float]]:
        """One step per batch with a readable image: (metrics, images over all processes)."""
        batches = self._loader()
        while True:
            _, pixels, bad = next(batches)
            self.batches_seen += 1
            for index, reason in bad:
                self.skipped[self.records[index].name] = reason
            if pixels is None:  # every image of this batch was unreadable
                continue
            yield self.train_step(pixels), pixels.shape[0] * self.d.world

    def train_step(self, pixels: torch.Tensor) -> dict[str, float]:
        cfg = self.cfg
        pixels = pixels.to(self.device, non_blocking=True)
        target = self.tok.target(pixels)
        self.tok.train()
        if self.disc is not None:
            # The generator step must not touch the discriminator's weights or its DDP reducer.
            self.disc.requires_grad_(False)
        with autocast_for(self.device, cfg.precision):
            out = self.tok_ddp(pixels)
            loss, row = self.loss.generator_loss(target, out.reconstruction, out.aux_loss, self.step,
                                                 self.tok.decoder.conv_out.weight)
        check = all_reduce_sum(loss.detach().float().clone(), self.d)
        if not torch.isfinite(check):
            raise self.diverged(float(loss.detach()))
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip > 0:
            row["grad_norm"] = float(torch.nn.utils.clip_grad_norm_(self.gen_params, cfg.grad_clip))
        self.opt.step()
        self.sched.step()
        if self.ema is not None:
            self.ema.update(trainable_params(self.tok))

        if self.loss.gan_active(self.step):
            self.disc.train().requires_grad_(True)
            # Same schedule shape as the generator, following the global step.
            disc_lr = (cfg.disc_lr or cfg.lr) * lr_lambda(self.step, cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio)
            for group in self.opt_d.param_groups:
                group["lr"] = disc_lr
            with autocast_for(self.device, cfg.precision):
                d_loss, d_row = self.loss.discriminator_loss(target, out.reconstruction, self.step, self.disc_ddp)
            self.opt_d.zero_grad(set_to_none=True)
            d_loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.disc.parameters(), cfg.grad_clip)
            self.opt_d.step()
            row.update(d_row)
        row["loss"] = float(check) / self.d.world
        row["lr"] = self.sched.get_last_lr()[0]
        return row


    def run(self, stop_at: int | None = None) -> TrainResult:
        """Train until `config.steps` (or `stop_at`, e.g. to split a run into chunks), then
        write a checkpoint, the final tokenizer and the loss plot."""
        stop_reason = self.run_steps(stop_at)
        final = self.out / "final"
        if self.d.main:
            with self.ema_weights():
                self.tok.save_pretrained(final)
            if self.skipped:
                atomic_write_json(self.out / "skipped_images.json", self.skipped)
        plot = self.finish_run(stop_reason, final, "tokenizer")
        return TrainResult(self.out, final, self.step, self.history, self.skipped, plot)


def train(config: TrainConfig, resume: bool = False, progress: bool = True, stop_at: int | None = None) -> TrainResult:
    """Train a tokenizer; see TrainConfig for every option. `resume` continues the run in
    `config.out_dir` from its latest checkpoint; `stop_at` ends this call early at that step
    (the schedule still spans `config.steps`)."""
    return Trainer(config, resume=resume, progress=progress).run(stop_at=stop_at)


__all__ = ["TrainConfig", "train", "Trainer", "TrainResult", "EMA", "split_holdout", "trainable_params"]
