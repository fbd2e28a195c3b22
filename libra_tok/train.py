"""Tokenizer training: one process or torchrun DDP, exact resume, atomic checkpoints.

    from libra_tok.train import TrainConfig, train
    train(TrainConfig(data=["images/"], preset="tiny", steps=200, out_dir="runs/tiny"))

The frozen CLIP encoder is never trained; the generator (quantizer + decoder) and the PatchGAN
discriminator each have an AdamW (betas 0.5, 0.9, as the official optimisers). Every random
choice of the data pipeline is a function of (seed, sample number), so a run resumed from a
checkpoint continues exactly as an uninterrupted one (bitwise on CPU).

Run-folder machinery shared with `libra_lm.train`: checkpoints hold tensors and plain values
only and are loaded with weights_only=True (`read_checkpoint`, `resume_state`: a damaged file
is named together with the previous intact one); metrics.jsonl is trimmed to the checkpoint's
step when a run resumes (`trim_metrics`) and read tolerantly (`read_metrics`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import pickle
import random
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from .config import TokenizerConfig, check_fields
from .data import ImageRecord, ImageReadError, TrainImages, collate_images, read_image, scan_inputs
from .fileio import atomic_path, atomic_save_image, atomic_write_json, atomic_write_text
from .loss import LossWeights, NLayerDiscriminator, TokenizerLoss
from .model import ImageTokenizer, autocast_for
from .metrics import build_lpips, psnr_signed
from .preprocess import preprocess_image, side_by_side, to_pil

log = logging.getLogger("libra_tok.train")

CHECKPOINT_DIR = "checkpoints"
LATEST = "latest.json"
METRICS = "metrics.jsonl"
# Options that hold for the command that gives them only: they are not saved with the run, so
# resuming it does not inherit them (e.g. permission to unpickle a file).
PER_COMMAND_OPTIONS = ("trust_pickle",)
TRUST_PICKLE_HELP = ("allow Python objects besides tensors when loading --init-from, the image tokenizer or CLIP "
                     "weights from pickle files (official vqgan.ckpt, pytorch_model.bin): unpickling can run code, "
                     "so only for files you trust; applies to this command only, never to the run's own checkpoints")


def _help(text: str, **kwargs: Any) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    """Every field can be set in a YAML/JSON file and overridden on the command line."""

    data: list[str] = _help("image folders (recursive), file lists or tar shards", default_factory=list)
    out_dir: str = _help("run folder: checkpoints, samples, metrics, the final tokenizer", default="runs/libra-tok")
    preset: str = _help("tokenizer preset (libra-l336 or tiny)", default="tiny")
    tokenizer: dict = _help("TokenizerConfig overrides, e.g. {clip_pretrained: /path/clip.bin}", default_factory=dict)
    init_from: str | None = _help("start from this tokenizer (folder or official vqgan.ckpt) instead of the preset", default=None)
    steps: int = _help("optimiser steps", default=2000)
    batch_size: int = _help("images per step and process", default=8)
    lr: float = _help("peak learning rate of the generator (quantizer + decoder)", default=1e-4)
    disc_lr: float | None = _help("peak learning rate of the discriminator (default: lr)", default=None)
    betas: tuple[float, float] = _help("AdamW betas (official: 0.5, 0.9)", default=(0.5, 0.9))
    weight_decay: float = _help("AdamW weight decay", default=0.0)
    warmup_steps: int = _help("linear warm-up steps", default=500)
    min_lr_ratio: float = _help("cosine decays to lr * min_lr_ratio", default=0.1)
    grad_clip: float = _help("max gradient norm (0 = off)", default=1.0)
    l1_weight: float = _help("L1 reconstruction weight", default=1.0)
    l2_weight: float = _help("L2 reconstruction weight", default=0.0)
    perceptual_weight: float = _help("LPIPS weight (0 = off; needs the backbone weights in TORCH_HOME)", default=1.0)
    perceptual_net: str = _help("LPIPS backbone: vgg (official) or alex", default="vgg")
    weights_dir: str | None = _help("folder of the LPIPS backbone weights (vgg16-397923af.pth / alexnet-owt-7be5be79.pth; "
                                    "default: $TORCH_HOME/hub/checkpoints)", default=None)
    codebook_weight: float = _help("weight of the LFQ entropy + commitment loss", default=1.0)
    disc_weight: float = _help("GAN weight (times the adaptive weight)", default=1.0)
    disc_start: int = _help("step at which the GAN loss starts (-1 = never)", default=5000)
    disc_layers: int = _help("PatchGAN layers", default=3)
    disc_channels: int = _help("PatchGAN base channels", default=64)
    ema_decay: float = _help("EMA decay of the trainable weights (0 = off)", default=0.999)
    crop_scale: tuple[float, float] = _help("random-resized-crop area range", default=(0.5, 1.0))
    flip: bool = _help("random horizontal flips", default=True)
    holdout: int = _help("images held out of training for sample grids and held-out PSNR", default=8)
    precision: str = _help("auto (bf16 autocast on CUDA, fp32 on CPU), fp32 or bf16; LFQ always fp32", default="auto")
    num_workers: int = _help("data-loader worker processes", default=2)
    cache_images: bool = _help("keep decoded images in memory (small datasets)", default=False)
    log_every: int = _help("steps between metric lines", default=10)
    save_every: int = _help("steps between checkpoints", default=1000)
    sample_every: int = _help("steps between reconstruction grids of the held-out images", default=500)
    keep_checkpoints: int = _help("checkpoints kept on disk (older ones are deleted)", default=2)
    max_minutes: float | None = _help("stop (with a checkpoint) after this many minutes", default=None)
    seed: int = _help("seed of initialisation and data order", default=0)
    device: str | None = _help("cuda, cpu, ... (default: cuda if available)", default=None)
    trust_pickle: bool = _help(TRUST_PICKLE_HELP, default=False)

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

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v) for f in dataclasses.fields(self)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        return cls(**check_fields(cls, data))

    @classmethod
    def from_file(cls, path: str | Path) -> "TrainConfig":
        return cls.from_dict(load_config_file(path))

    def loss_weights(self) -> LossWeights:
        return LossWeights(l1=self.l1_weight, l2=self.l2_weight, perceptual=self.perceptual_weight,
                           codebook=self.codebook_weight, disc=self.disc_weight,
                           disc_start=self.disc_start if self.disc_start >= 0 else 2**62)


def load_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping of option names to values."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text()) if path.suffix in (".yaml", ".yml") else json.loads(path.read_text())
    except (OSError, ValueError, yaml.YAMLError) as exc:
        raise ValueError(f"cannot read config file {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of option names to values")
    return data


class TrainingDiverged(RuntimeError):
    pass


# ---- distributed ------------------------------------------------------------------------------
@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def setup_distributed(device: torch.device) -> Dist:
    """torchrun sets WORLD_SIZE/RANK/LOCAL_RANK; without them this is one process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Dist()
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=dist.get_rank(), world=dist.get_world_size(), local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def _all_reduce_sum(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.world > 1:
        dist.all_reduce(value)
    return value


def holdout_indices(n: int, holdout: int) -> np.ndarray:
    """Indices of `holdout` of n items taken at a fixed stride, so they spread over the inputs;
    at least one item is always left for training."""
    n_hold = min(holdout, n - 1)
    if n_hold <= 0:
        return np.zeros(0, dtype=np.int64)
    stride = n / n_hold
    return np.array([int(i * stride + stride / 2) for i in range(n_hold)], dtype=np.int64)


def split_holdout(records: Sequence[ImageRecord], holdout: int) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """(train, held out) records, held-out ones chosen by `holdout_indices`."""
    held = set(holdout_indices(len(records), holdout).tolist())
    return ([r for i, r in enumerate(records) if i not in held], [r for i, r in enumerate(records) if i in held])


# ---- data order -------------------------------------------------------------------------------
class KeyedBatches:
    """Batches of (record index, sample seed) keys for batch number b = start, start+1, ...

    Global sample g = (b * world + rank) * batch_size + i belongs to epoch g // n, position
    g % n of that epoch's permutation (seeded by seed and epoch); its augmentation seed is a
    function of (seed, g). Nothing depends on what ran before: resuming at batch b is exact.
    """

    def __init__(self, n: int, batch_size: int, seed: int, d: Dist, start: int = 0):
        self.n, self.batch_size, self.seed, self.d, self.start = n, batch_size, seed, d, start
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            self._perms = {epoch: torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))}
        return self._perms[epoch]

    def batch(self, b: int) -> list[tuple[int, int]]:
        first = (b * self.d.world + self.d.rank) * self.batch_size
        keys = []
        for g in range(first, first + self.batch_size):
            epoch, pos = divmod(g, self.n)
            keys.append((int(self._perm(epoch)[pos]), (self.seed * 1_000_003 + g) % (2**63)))
        return keys

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.start
        while True:
            yield self.batch(b)
            b += 1


# ---- EMA ----------------------------------------------------------------------------------------
class EMA:
    """Exponential moving average of the trainable weights (quantizer + decoder)."""

    def __init__(self, params: dict[str, torch.Tensor], decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone().float() for k, v in params.items()}

    @torch.no_grad()
    def update(self, params: dict[str, torch.Tensor]) -> None:
        keys = list(self.shadow)
        torch._foreach_lerp_([self.shadow[k] for k in keys], [params[k].detach().float() for k in keys], 1.0 - self.decay)

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


# ---- helpers ------------------------------------------------------------------------------------
def lr_lambda(step: int, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warm-up to 1, then cosine to min_ratio at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def rng_state() -> dict[str, Any]:
    """The RNG states as tensors and plain values, so checkpoints load with weights_only=True
    (numpy's key array would need the unpickler to build an ndarray)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)  # ndarray in older checkpoints
    np.random.set_state((str(kind), keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---- run folders: checkpoints and the metrics log ----------------------------------------------------
def saved_options(config: Any) -> dict[str, Any]:
    """The options a run keeps (train_config.json, checkpoints): all but the per-command ones."""
    return {k: v for k, v in config.to_dict().items() if k not in PER_COMMAND_OPTIONS}


def _legacy_rng_globals() -> list:
    """What checkpoints written before `rng_state` stored numpy's state as a tensor need: the
    ndarray of that state. These build arrays only; nothing else is allowed."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), multiarray._reconstruct]


class UnusableCheckpoint(ValueError):
    """A checkpoint file that cannot be resumed from: damaged, foreign, or refused because it
    holds Python objects (`refused`); `reason` says why."""

    def __init__(self, path: Path, reason: str, refused: bool = False):
        super().__init__(f"{path}: {reason}")
        self.path, self.reason, self.refused = path, reason, refused


CheckpointCheck = Callable[[dict[str, Any]], "str | None"]  # a problem of a loaded state, or None


def _error_text(exc: BaseException) -> str:
    """The informative line of a torch.load error (its wrapper text dropped), shortened."""
    text = str(exc)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1]
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    line = lines[0] if lines else ""
    line = line.split(". This is an internal")[0]  # miniz's advice that follows the cause
    line = f"{type(exc).__name__}: {line}" if line else type(exc).__name__
    return line if len(line) <= 200 else line[:197] + "..."


def read_checkpoint(path: Path, validate: CheckpointCheck | None = None) -> dict[str, Any]:
    """A training checkpoint, loaded with weights_only=True: tensors and plain values only,
    nothing that unpickling could run. `validate(state)` returns a problem or None. A damaged,
    foreign or unsafe file raises UnusableCheckpoint with the reason."""
    path = Path(path)
    if path.stat().st_size == 0:
        raise UnusableCheckpoint(path, "empty file")
    try:
        with torch.serialization.safe_globals(_legacy_rng_globals()):
            state = torch.load(path, map_location="cpu", weights_only=True)
    except (MemoryError, PermissionError):
        raise  # not the file's fault
    except pickle.UnpicklingError as exc:
        try:
            allowed = {f"{g.__module__}.{g.__qualname__}" for g in _legacy_rng_globals()}
            unsafe = [g for g in torch.serialization.get_unsafe_globals_in_checkpoint(path) if g not in allowed]
        except Exception:  # too damaged to list what it refers to
            unsafe = []
        if unsafe:
            raise UnusableCheckpoint(path, f"it holds Python objects besides tensors ({', '.join(unsafe[:3])}), which "
                                     "training checkpoints never contain, and unpickling them could run code",
                                     refused=True) from None
        raise UnusableCheckpoint(path, _error_text(exc)) from None
    except Exception as exc:  # a truncated zip, bytes that are no pickle, ...: torch raises many kinds
        raise UnusableCheckpoint(path, _error_text(exc)) from None
    problem = "not a dict" if not isinstance(state, dict) else (validate(state) if validate else None)
    if problem:
        raise UnusableCheckpoint(path, f"not a training checkpoint of this trainer: {problem}")
    return state


def checkpoint_files(ckpt_dir: Path) -> list[Path]:
    """The step-*.pt files of a run, oldest first."""
    return sorted(ckpt_dir.glob("step-*.pt"))


def _latest_name(ckpt_dir: Path) -> str | None:
    try:
        name = json.loads((ckpt_dir / LATEST).read_text())["file"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return name if isinstance(name, str) and name and Path(name).name == name else None


def _newest_intact(files: Sequence[Path], validate: CheckpointCheck | None) -> tuple[Path, dict[str, Any]] | None:
    for path in reversed(files):
        try:
            return path, read_checkpoint(path, validate)
        except UnusableCheckpoint:
            continue
    return None


def resume_state(out_dir: str | Path, resume: bool,
                 validate: CheckpointCheck | None = None) -> tuple[Path | None, dict[str, Any] | None]:
    """(checkpoint, its state) a run in `out_dir` continues from; (None, None) for a fresh run.

    Without `resume`, a folder holding checkpoints is refused (FileExistsError). With it, the
    file latest.json names is loaded; if it is gone, the newest intact step-*.pt (logged).
    A damaged or unsafe file stops with a ValueError that names it and the previous intact
    checkpoint, if any."""
    ckpt_dir = Path(out_dir) / CHECKPOINT_DIR
    files = checkpoint_files(ckpt_dir)
    named = _latest_name(ckpt_dir)
    has_latest = (ckpt_dir / LATEST).exists()
    if not resume:
        if has_latest or files:
            last = named or (files[-1].name if files else LATEST)
            raise FileExistsError(f"{out_dir} already holds checkpoints (last: {last}); pass --resume to continue "
                                  "that run or choose another --out-dir")
        return None, None
    if named is not None and (ckpt_dir / named).is_file():
        path = ckpt_dir / named
        try:
            return path, read_checkpoint(path, validate)
        except UnusableCheckpoint as err:
            older = [f for f in files if f.name < path.name]
            intact = _newest_intact(older, validate)
            problem = (f"{path} is refused: {err.reason}" if err.refused else f"{path} is damaged ({err.reason})")
            if intact is None:
                raise ValueError(f"{problem}; no intact checkpoint is left: delete {ckpt_dir} to start the run over") \
                    from None
            raise ValueError(f"{problem}; {intact[0]} is intact: delete {path.name} to resume from it") from None
    if not files and not has_latest:
        log.info("no checkpoint in %s yet: the run starts at step 0", ckpt_dir)
        return None, None
    why = f"{LATEST} names {named}, which is missing" if named else f"{LATEST} is missing or unreadable"
    intact = _newest_intact(files, validate)
    if intact is None:
        damaged = f" ({', '.join(f.name for f in files)} cannot be read)" if files else ""
        raise ValueError(f"{ckpt_dir}: {why}, and no intact checkpoint is left{damaged}; delete {ckpt_dir} to start "
                         "the run over")
    log.warning("%s; resuming from %s", why, intact[0])
    return intact


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl; a line that is not a whole JSON object (the last line of a
    run killed while writing it) is skipped."""
    try:
        text = Path(path).read_text(errors="replace")
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict):
            rows.append(row)
    return rows


def trim_metrics(path: str | Path, step: int) -> None:
    """Make a metrics log describe the steps up to `step` (where a run starts or resumes): rows
    of later steps (logged after the checkpoint, by a run that was then stopped) and partial
    lines are dropped, the file rewritten atomically. New rows are then appended."""
    path = Path(path)
    if not path.is_file():
        return
    text = path.read_text(errors="replace")
    lines = text.splitlines()
    kept = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and not (isinstance(row.get("step"), (int, float)) and row["step"] > step):
            kept.append(line)
    if len(kept) != len(lines) or (text and not text.endswith("\n")):
        atomic_write_text(path, "".join(line + "\n" for line in kept))


# ---- the run ------------------------------------------------------------------------------------
CHECKPOINT_KEYS = ("step", "batches_seen", "trainable", "opt", "sched", "rng")


def _check_checkpoint(state: dict[str, Any]) -> str | None:
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    return f"no {', '.join(missing)}" if missing else None


@dataclass
class TrainResult:
    out_dir: Path
    final_tokenizer: Path
    step: int
    history: list[dict[str, Any]]
    skipped_images: dict[str, str]


class Trainer:
    def __init__(self, config: TrainConfig, resume: bool = False, progress: bool = True):
        self.cfg = config
        self.progress = progress
        self.out = Path(config.out_dir)
        self.device = torch.device(config.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.d = setup_distributed(self.device)
        if self.device.type == "cuda" and self.d.world > 1:
            self.device = torch.device("cuda", self.d.local_rank)
            torch.cuda.set_device(self.device)

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
        self.opt = torch.optim.AdamW(self.gen_params, lr=config.lr, betas=config.betas, weight_decay=config.weight_decay)
        sched = lambda s: lr_lambda(s, config.warmup_steps, config.steps, config.min_lr_ratio)  # noqa: E731
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, sched)
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
        self._tb = None

        self.step = 0
        self.batches_seen = 0
        self.history: list[dict[str, Any]] = []
        if self.resume_from is not None:
            self._load_checkpoint(self.resume_from, resume_state_)

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
    def _checkpoint_state(self) -> dict[str, Any]:
        state = {
            "step": self.step,
            "batches_seen": self.batches_seen,
            "config": saved_options(self.cfg),
            "trainable": {k: v.detach().cpu() for k, v in self.tok.state_dict().items() if k.startswith(("quantizer.", "decoder."))},
            "opt": self.opt.state_dict(),
            "sched": self.sched.state_dict(),
            "rng": rng_state(),
            "skipped_images": self.skipped,
        }
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.disc is not None:
            state.update(disc=self.disc.state_dict(), opt_d=self.opt_d.state_dict())
        return state

    def save_checkpoint(self) -> Path | None:
        if not self.d.main:
            return None
        ckpt_dir = self.out / CHECKPOINT_DIR
        name = f"step-{self.step:08d}.pt"
        with atomic_path(ckpt_dir / name) as tmp:
            torch.save(self._checkpoint_state(), tmp)
        atomic_write_json(ckpt_dir / LATEST, {"file": name, "step": self.step})
        kept = checkpoint_files(ckpt_dir)
        for old in kept[: max(0, len(kept) - max(1, self.cfg.keep_checkpoints))]:
            old.unlink(missing_ok=True)
        self.last_checkpoint = ckpt_dir / name
        return ckpt_dir / name

    def _load_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        missing = self.tok.load_state_dict(state["trainable"], strict=False)
        unexpected_trainable = [k for k in missing.missing_keys if k.startswith(("quantizer.", "decoder."))]
        if unexpected_trainable or missing.unexpected_keys:
            raise ValueError(f"checkpoint {path} does not match the model: {unexpected_trainable[:5]} {missing.unexpected_keys[:5]}")
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])
        if self.ema is not None and "ema" in state:
            self.ema.load_state_dict(state["ema"])
        if self.disc is not None and "disc" in state:
            self.disc.load_state_dict(state["disc"])
            self.opt_d.load_state_dict(state["opt_d"])
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.batches_seen = int(state["batches_seen"])
        self.skipped.update(state.get("skipped_images", {}))  # those met while training before the checkpoint
        self.last_checkpoint = path
        log.info("resumed from %s at step %d", path, self.step)

    # -- logging ------------------------------------------------------------------------------
    def _log(self, row: dict[str, Any]) -> None:
        self.history.append(row)
        if not self.d.main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        with open(self.out / METRICS, "a") as fh:  # append-only log (trimmed to the checkpoint on resume)
            fh.write(json.dumps(row) + "\n")
        if self._tb is not None:
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step":
                    self._tb.add_scalar(key, value, row["step"])

    def _global_mean(self, row: dict[str, Any]) -> dict[str, Any]:
        """Average the per-process loss parts over ranks, so metrics describe the global batch."""
        if self.d.world == 1:
            return row
        keys = sorted(k for k, v in row.items() if isinstance(v, float) and k not in ("loss", "lr", "grad_norm"))
        values = _all_reduce_sum(torch.tensor([row[k] for k in keys], dtype=torch.float64), self.d) / self.d.world
        return {**row, **dict(zip(keys, values.tolist()))}

    def _open_tensorboard(self):
        if not self.d.main:
            return None
        try:
            from torch.utils.tensorboard import SummaryWriter
        except Exception:  # tensorboard not installed: JSON lines only
            return None
        return SummaryWriter(str(self.out / "tensorboard"))

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
            recon = self.tok.decode(self.tok.encode(pixels, precision=self.cfg.precision).ids, precision=self.cfg.precision)
        target = self.tok.target(pixels.to(recon.device))
        grid = side_by_side([[to_pil(t), to_pil(r)] for t, r in zip(target, recon)])
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
        check = _all_reduce_sum(loss.detach().float().clone(), self.d)
        if not torch.isfinite(check):
            last = getattr(self, "last_checkpoint", None)
            raise TrainingDiverged(
                f"non-finite loss ({float(loss.detach())}) at step {self.step}; last good checkpoint: "
                f"{last if last else 'none yet'} (resume from it with a lower --lr, or check the data)"
            )
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
        write a checkpoint and the final tokenizer."""
        cfg = self.cfg
        last = min(cfg.steps, stop_at) if stop_at is not None else cfg.steps
        self._tb = self._open_tensorboard()
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out / "train_config.json", saved_options(cfg))
            trim_metrics(self.out / METRICS, self.step)  # rows after the checkpoint are logged again
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=self.step, desc="train", unit="step", disable=not (self.progress and self.d.main),
                   dynamic_ncols=True)
        batches = self._loader()
        started = time.perf_counter()
        window_t, window_images = time.perf_counter(), 0
        stop_reason = "done"
        try:
            while self.step < last:
                _, pixels, bad = next(batches)
                self.batches_seen += 1
                for index, reason in bad:
                    self.skipped[self.records[index].name] = reason
                if pixels is None:  # every image of this batch was unreadable
                    continue
                row = self.train_step(pixels)
                self.step += 1
                window_images += pixels.shape[0] * self.d.world
                bar.update(1)
                if self.step % cfg.log_every == 0 or self.step == last:
                    row = self._global_mean(row)
                    now = time.perf_counter()
                    row.update(step=self.step, images_per_s=window_images / max(now - window_t, 1e-9),
                               skipped_images=len(self.skipped))
                    window_t, window_images = now, 0
                    if self.step % cfg.sample_every == 0 or self.step == last:
                        row.update(self.sample())
                    self._log(row)
                    bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['images_per_s']:.1f}")
                elif self.step % cfg.sample_every == 0:
                    self._log({"step": self.step, **self.sample()})
                if self.step % cfg.save_every == 0:
                    self.save_checkpoint()
                if cfg.max_minutes is not None and (time.perf_counter() - started) / 60 >= cfg.max_minutes:
                    stop_reason = f"time limit of {cfg.max_minutes} min"
                    break
        finally:
            bar.close()
        if self.step % cfg.save_every != 0:
            self.save_checkpoint()
        final = self.out / "final"
        if self.d.main:
            with self.ema_weights():
                self.tok.save_pretrained(final)
            if self.skipped:
                atomic_write_json(self.out / "skipped_images.json", self.skipped)
            log.info("stopped at step %d (%s); tokenizer written to %s", self.step, stop_reason, final)
        if self._tb is not None:
            self._tb.close()
        if self.d.world > 1:
            dist.barrier()
        return TrainResult(self.out, final, self.step, self.history, self.skipped)


def train(config: TrainConfig, resume: bool = False, progress: bool = True, stop_at: int | None = None) -> TrainResult:
    """Train a tokenizer; see TrainConfig for every option. `resume` continues the run in
    `config.out_dir` from its latest checkpoint; `stop_at` ends this call early at that step
    (the schedule still spans `config.steps`)."""
    return Trainer(config, resume=resume, progress=progress).run(stop_at=stop_at)


__all__ = ["TrainConfig", "train", "Trainer", "TrainResult", "TrainingDiverged", "KeyedBatches", "EMA",
           "lr_lambda", "load_config_file", "split_holdout", "holdout_indices", "rng_state", "set_rng_state",
           "read_checkpoint", "resume_state", "UnusableCheckpoint", "checkpoint_files", "read_metrics", "trim_metrics", "saved_options"]
