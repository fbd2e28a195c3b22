"""The part of a training run that both trainers share: the loop around their steps.

A trainer subclasses `TrainingLoop` and supplies its steps and losses; the loop brings the run
folder, the checkpoints (common fields, writing, restoring), the metrics log, the cadence of
metric rows, evaluations and checkpoints, the time limit, the final checkpoint and the loss plot:

    class Trainer(TrainingLoop):
        def training_steps(self):       # forever: (metrics row, images or tokens) per optimiser step
        def checkpoint_state(self):     # what this trainer adds to a checkpoint (every process calls it);
                                        # with sharded_checkpoints its tensors go under "tensors" (DCP)
        def load_checkpoint_state(self, path, state)
        def cadence(self, last):        # when to log, evaluate and save
        def evaluate(self):             # optional: sample grids, validation loss
        def log_fields(self, row):      # optional: fields added to each logged row

    trainer.run_steps(stop_at) -> stop reason; then the trainer writes its final weights and
    calls trainer.finish_run(...), which draws loss.png.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..fileio import atomic_write_json
from .checkpoints import CHECKPOINT_DIR, checkpoint_name, write_checkpoint
from .dcp import read_rank_rng, write_sharded_checkpoint
from .distributed import barrier, process_device
from .loss_plot import Series, plot_losses
from .metrics_log import MetricsLog
from .options import TRAIN_CONFIG, saved_options
from .rng import rng_state, set_rng_state


class TrainingDiverged(RuntimeError):
    """A non-finite loss: the message names the step and the last good checkpoint."""


@dataclass
class Cadence:
    """When a run logs, evaluates and saves (steps counted from 1)."""

    log_every: int
    save_every: int
    max_minutes: float | None = None  # stop (with a checkpoint) after this long
    eval_every: int | None = None  # None: never evaluate
    eval_at: int | None = None  # evaluate at this step too (the run's last)
    eval_in_log_row: bool = False  # an evaluation at a logged step adds to that row (else a row of its own)


@dataclass
class Throughput:
    """How the loop reports what the steps processed: metric key, progress-bar label, format."""

    key: str = "images_per_s"
    short: str = "img_s"
    fmt: str = ".1f"


class TrainingLoop:
    """Base of a trainer: the process and device, the run folder, checkpoints, metrics and the
    loop (see the module docstring for what a subclass supplies).

    `config` needs out_dir, device, log_every, save_every, keep_checkpoints, max_minutes and a
    `to_dict` (`RunOptions`); the subclass sets `total_steps` before `run_steps`.
    """

    throughput = Throughput()
    loss_series: Series = (("loss", "train loss", "tab:blue"),)
    plot_title = "training"
    progress_desc = "train"
    # True: checkpoints are DCP folders every process writes its shards of (libra_tok.run.dcp);
    # False: one step-*.pt file written by the main process.
    sharded_checkpoints = False

    def __init__(self, config: Any, progress: bool = True):
        self.cfg = config
        self.progress = progress
        self.out = Path(config.out_dir)
        self.device, self.d = process_device(config.device)
        self.logger = logging.getLogger(type(self).__module__)  # the trainer's own logger
        self.metrics = MetricsLog(self.out, write=self.d.main)
        self.total_steps = 0
        self.step = 0
        self.batches_seen = 0
        self.last_checkpoint: Path | None = None

    @property
    def history(self) -> list[dict[str, Any]]:
        """Every metric row this process logged in this run."""
        return self.metrics.history

    # -- what a trainer supplies ----------------------------------------------------------------
    def training_steps(self) -> Iterator[tuple[dict[str, Any], float]]:
        """Forever: train one optimiser step, yield (its metrics row, what it processed)."""
        raise NotImplementedError

    def checkpoint_state(self) -> dict[str, Any]:
        """The trainer's part of a checkpoint (called by every process: may be collective)."""
        raise NotImplementedError

    def load_checkpoint_state(self, path: Path, state: dict[str, Any]) -> None:
        """Restore the trainer's part of a checkpoint (raise ValueError if it does not fit)."""
        raise NotImplementedError

    def cadence(self, last: int) -> Cadence:
        """When to log, evaluate and save in a call that ends at step `last`."""
        return Cadence(self.cfg.log_every, self.cfg.save_every, self.cfg.max_minutes)

    def evaluate(self) -> dict[str, Any]:
        """Metrics of an evaluation (called by every process)."""
        return {}

    def log_fields(self, row: dict[str, Any]) -> dict[str, Any]:
        """A step's row as logged (called by every process at logged steps: may be collective)."""
        return row

    # -- checkpoints ----------------------------------------------------------------------------
    def save_checkpoint(self) -> Path:
        """Write the checkpoint of the current step (the main process writes; every process
        builds the state, which FSDP needs), then wait for every process."""
        state = self.checkpoint_state()
        run = {"step": self.step, "batches_seen": self.batches_seen, "config": saved_options(self.cfg)}
        if self.sharded_checkpoints:
            tensors = state.pop("tensors")
            path = write_sharded_checkpoint(self.out / CHECKPOINT_DIR, self.step, tensors, {**state, **run},
                                            rng_state(), self.d, keep=self.cfg.keep_checkpoints)
            self.last_checkpoint = path
            return path
        path = self.out / CHECKPOINT_DIR / checkpoint_name(self.step)
        if self.d.main:
            write_checkpoint(path.parent, self.step, {**state, **run, "rng": rng_state()},
                             keep=self.cfg.keep_checkpoints)
        barrier(self.d)
        self.last_checkpoint = path
        return path

    def load_checkpoint(self, path: Path, state: dict[str, Any]) -> None:
        """Continue from a checkpoint `resume_state` returned: the trainer's state, then the
        step, the data position and the RNG states."""
        self.load_checkpoint_state(path, state)
        set_rng_state(state["rng"] if "rng" in state else read_rank_rng(path, self.d.rank))
        self.step = int(state["step"])
        self.batches_seen = int(state["batches_seen"])
        self.last_checkpoint = path
        self.logger.info("resumed from %s at step %d", path, self.step)

    def diverged(self, loss: float) -> TrainingDiverged:
        """The error for a non-finite loss at the current step."""
        return TrainingDiverged(
            f"non-finite loss ({loss}) at step {self.step}; last good checkpoint: "
            f"{self.last_checkpoint or 'none yet'} (resume from it with a lower --lr, or check the data)")

    # -- the loop -------------------------------------------------------------------------------
    def log_row(self, row: dict[str, Any]) -> None:
        self.metrics.log(row)

    def run_steps(self, stop_at: int | None = None) -> str:
        """Train until `total_steps` (or `stop_at`, e.g. to split a run into chunks; the schedule
        still spans every step), then write a checkpoint. Returns why it stopped."""
        last = self.total_steps if stop_at is None else min(self.total_steps, stop_at)
        if self.d.main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_json(self.out / TRAIN_CONFIG, saved_options(self.cfg))
        self.metrics.start(self.step)
        stop_reason = self._loop(last, self.cadence(last))
        if self.step % self.cfg.save_every != 0:
            self.save_checkpoint()
        return stop_reason

    def _loop(self, last: int, cadence: Cadence) -> str:
        from tqdm.auto import tqdm

        tp = self.throughput
        bar = tqdm(total=self.total_steps, initial=self.step, desc=self.progress_desc, unit="step",
                   disable=not (self.progress and self.d.main), dynamic_ncols=True)
        steps = self.training_steps()
        started = time.perf_counter()
        window_t, window_amount = started, 0.0
        try:
            while self.step < last:
                row, amount = next(steps)
                self.step += 1
                window_amount += amount
                bar.update(1)
                evaluate = cadence.eval_every is not None and (self.step % cadence.eval_every == 0
                                                               or self.step == cadence.eval_at)
                if self.step % cadence.log_every == 0 or self.step == last:
                    now = time.perf_counter()
                    row = {k: v for k, v in self.log_fields(row).items() if v is not None}
                    row.update({"step": self.step, tp.key: window_amount / max(now - window_t, 1e-9)})
                    window_t, window_amount = now, 0.0
                    if evaluate and cadence.eval_in_log_row:
                        row.update(self.evaluate())
                        evaluate = False
                    self.log_row(row)
                    bar.set_postfix({"loss": f"{row['loss']:.4f}", tp.short: format(row[tp.key], tp.fmt)})
                if evaluate:
                    self.log_row({"step": self.step, **self.evaluate()})
                if self.step % cadence.save_every == 0:
                    self.save_checkpoint()
                if cadence.max_minutes is not None and (time.perf_counter() - started) / 60 >= cadence.max_minutes:
                    return f"time limit of {cadence.max_minutes} min"
        finally:
            bar.close()
        return "done"

    def finish_run(self, stop_reason: str, final: Path, what: str) -> Path | None:
        """After the final weights are written: loss.png (main process), the closing log line,
        the metrics log closed, every process waited for. Returns the plot's path."""
        plot = None
        if self.d.main:
            plot = plot_losses(self.metrics.rows(), self.out / "loss.png", self.loss_series, self.plot_title)
            self.logger.info("stopped at step %d (%s); %s written to %s", self.step, stop_reason, what, final)
        self.metrics.close()
        barrier(self.d)
        return plot


__all__ = ["TrainingDiverged", "Cadence", "Throughput", "TrainingLoop"]
