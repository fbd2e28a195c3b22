"""The run machinery both trainers share (`libra_tok.run`): checkpoint rotation and latest.json,
the loop's cadence, exact resume, the metrics and TensorBoard logs after a resume, the loss plot,
the data order and the learning-rate schedule."""

import json
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from PIL import Image

from libra_tok.run import (
    CHECKPOINT_DIR,
    LATEST,
    Cadence,
    Dist,
    KeyedBatches,
    RunOptions,
    Throughput,
    TrainingDiverged,
    TrainingLoop,
    checkpoint_files,
    lr_lambda,
    missing_keys,
    plot_losses,
    read_checkpoint,
    read_metrics,
    resume_state,
    warmup_cosine,
    write_checkpoint,
)


# ---- checkpoints -------------------------------------------------------------------------------------
def test_rotation_keeps_the_newest_checkpoints(tmp_path):
    for step in (10, 20, 30, 40, 50):
        write_checkpoint(tmp_path, step, {"step": step}, keep=2)
    assert [p.name for p in checkpoint_files(tmp_path)] == ["step-00000040.pt", "step-00000050.pt"]
    write_checkpoint(tmp_path, 60, {"step": 60}, keep=0)  # at least the newest one stays
    assert [p.name for p in checkpoint_files(tmp_path)] == ["step-00000060.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [LATEST, "step-00000060.pt"]  # no temporary file left


def test_sharded_checkpoints_rotate_resume_and_reshard_in_one_process(tmp_path):
    """DCP folders sit beside .pt files: listed and rotated by step, a .partial folder ignored,
    read back by resume_state (meta.json) and load_sharded (any split of the rows)."""
    from libra_tok.run import load_sharded, read_rank_rng, rng_state, write_sharded_checkpoint

    ckpt = tmp_path / CHECKPOINT_DIR
    write_checkpoint(ckpt, 1, {"step": 1}, keep=3)
    for step in (2, 3):
        write_sharded_checkpoint(ckpt, step, {"w": torch.arange(10.0) * step}, {"batches_seen": step},
                                 rng_state(), Dist(), keep=3)
    (ckpt / "step-00000004.partial").mkdir()  # a save that was killed
    assert [p.name for p in checkpoint_files(ckpt)] == ["step-00000001.pt", "step-00000002", "step-00000003"]
    path, state = resume_state(tmp_path, resume=True)
    assert path == ckpt / "step-00000003" and state["batches_seen"] == 3 and state["world"] == 1
    rows = {"w": torch.zeros(10)}
    load_sharded(path, rows)
    assert torch.equal(rows["w"], torch.arange(10.0) * 3)
    assert torch.equal(read_rank_rng(path, 5)["torch"], read_rank_rng(path, 0)["torch"])  # fewer ranks saved
    write_sharded_checkpoint(ckpt, 5, {"w": torch.ones(10)}, {}, rng_state(), Dist(), keep=2)
    assert [p.name for p in checkpoint_files(ckpt)] == ["step-00000003", "step-00000005"]
    (path / ".metadata").unlink()  # damaged: named, with the previous intact one
    (ckpt / LATEST).write_text(json.dumps({"file": "step-00000003", "step": 3}))
    with pytest.raises(ValueError, match=r"step-00000003 is damaged \(no \.metadata"):
        resume_state(tmp_path, resume=True)


def test_latest_names_a_complete_checkpoint_even_after_a_crash(tmp_path, monkeypatch):
    for step in (1, 2):
        write_checkpoint(tmp_path, step, {"step": step, "w": torch.full((3,), float(step))}, keep=3)
        latest = json.loads((tmp_path / LATEST).read_text())
        assert latest == {"file": f"step-{step:08d}.pt", "step": step}
        assert read_checkpoint(tmp_path / latest["file"])["step"] == step

    def crash(state, path):  # a process killed while writing: half a file, then nothing
        Path(path).write_bytes(b"PK\x03\x04 half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        write_checkpoint(tmp_path, 3, {"step": 3}, keep=3)
    monkeypatch.undo()
    latest = json.loads((tmp_path / LATEST).read_text())
    assert latest["file"] == "step-00000002.pt"
    assert [p.name for p in checkpoint_files(tmp_path)] == ["step-00000001.pt", "step-00000002.pt"]
    assert torch.equal(read_checkpoint(tmp_path / latest["file"])["w"], torch.full((3,), 2.0))


# ---- a toy trainer on the shared loop ----------------------------------------------------------------
@dataclass
class ToyConfig(RunOptions):
    out_dir: str = "runs/toy"
    steps: int = 6
    log_every: int = 2
    save_every: int = 3
    keep_checkpoints: int = 2
    max_minutes: float | None = None
    eval_every: int | None = None
    eval_in_log_row: bool = False
    device: str = "cpu"
    trust_pickle: bool = False

    @classmethod
    def from_dict(cls, data):
        return cls(**data)


class Toy(TrainingLoop):
    """Fits w to random targets: every step draws from the torch RNG, so exact resume needs the
    RNG state, the optimiser, the schedule and the step to round trip."""

    throughput = Throughput("examples_per_s", "ex_s", ".0f")

    def __init__(self, config: ToyConfig, resume: bool = False):
        super().__init__(config, progress=False)
        self.total_steps = config.steps
        path, state = resume_state(self.out, resume, lambda s: missing_keys(s, ("w", "opt", "sched")))
        torch.manual_seed(0)
        self.w = torch.zeros(3, requires_grad=True)
        self.opt = torch.optim.AdamW([self.w], lr=0.1)
        self.sched = warmup_cosine(self.opt, 2, config.steps, 0.1)
        self.evaluations = []
        if path is not None:
            self.load_checkpoint(path, state)

    def training_steps(self):
        while True:
            loss = (self.w - torch.randn(3)).square().sum()
            if not torch.isfinite(loss):
                raise self.diverged(float(loss.detach()))
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.sched.step()
            yield {"loss": float(loss.detach()), "lr": self.sched.get_last_lr()[0], "skipped": None}, 4.0

    def checkpoint_state(self):
        return {"w": self.w.detach().clone(), "opt": self.opt.state_dict(), "sched": self.sched.state_dict()}

    def load_checkpoint_state(self, path, state):
        with torch.no_grad():
            self.w.copy_(state["w"])
        self.opt.load_state_dict(state["opt"])
        self.sched.load_state_dict(state["sched"])

    def cadence(self, last):
        cfg = self.cfg
        return Cadence(cfg.log_every, cfg.save_every, cfg.max_minutes, eval_every=cfg.eval_every, eval_at=last,
                       eval_in_log_row=cfg.eval_in_log_row)

    def evaluate(self):
        self.evaluations.append(self.step)
        return {"val_loss": float(self.w.detach().square().sum())}

    def run(self, stop_at=None):
        reason = self.run_steps(stop_at)
        plot = self.finish_run(reason, self.out, "nothing")
        return reason, plot


def toy(tmp_path, name="run", **kw) -> ToyConfig:
    return ToyConfig(out_dir=str(tmp_path / name), **kw)


def test_the_loop_logs_evaluates_and_saves_on_cadence(tmp_path):
    trainer = Toy(toy(tmp_path, steps=5, eval_every=2))
    assert trainer.run()[0] == "done"
    rows = read_metrics(tmp_path / "run" / "metrics.jsonl")
    # Logged every 2 steps and at the last; evaluations in rows of their own, after the step's row.
    assert [(r["step"], "loss" in r, "val_loss" in r) for r in rows] == [
        (2, True, False), (2, False, True), (4, True, False), (4, False, True), (5, True, False), (5, False, True)]
    assert all(r["examples_per_s"] > 0 and "skipped" not in r for r in rows if "loss" in r)  # None is not logged
    assert rows == trainer.history
    # Checkpoints every 3 steps and at the end; the run's options beside them.
    assert [p.name for p in checkpoint_files(tmp_path / "run" / CHECKPOINT_DIR)] == ["step-00000003.pt",
                                                                                  "step-00000005.pt"]
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["steps"] == 5
    state = read_checkpoint(tmp_path / "run" / CHECKPOINT_DIR / "step-00000005.pt")
    assert (state["step"], state["batches_seen"], state["config"]["steps"]) == (5, 0, 5)
    assert "trust_pickle" not in state["config"]  # a per-command option

    merged = Toy(toy(tmp_path, "merged", steps=5, eval_every=3, eval_in_log_row=True))
    merged.run()
    rows = read_metrics(tmp_path / "merged" / "metrics.jsonl")
    # An evaluation at a logged step joins its row; one between logged steps has its own.
    assert [(r["step"], "loss" in r, "val_loss" in r) for r in rows] == [
        (2, True, False), (3, False, True), (4, True, False), (5, True, True)]
    assert merged.evaluations == [3, 5]


def test_resume_continues_exactly_and_refuses_a_fresh_start(tmp_path):
    full = Toy(toy(tmp_path, "full", eval_every=2))
    full.run()
    part = toy(tmp_path, "part", eval_every=2)
    Toy(part).run(stop_at=4)
    with pytest.raises(FileExistsError, match="already holds checkpoints .*pass --resume"):
        Toy(part)
    resumed = Toy(part, resume=True)
    assert resumed.step == 4 and resumed.last_checkpoint.name == "step-00000004.pt"
    resumed.run()
    assert torch.equal(full.w, resumed.w)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "examples_per_s"} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "full" / "metrics.jsonl")) == strip(
        read_metrics(tmp_path / "part" / "metrics.jsonl"))


def test_the_time_limit_stops_with_a_checkpoint(tmp_path):
    trainer = Toy(toy(tmp_path, max_minutes=0.0))
    reason, _ = trainer.run()
    assert reason == "time limit of 0.0 min" and trainer.step == 1
    assert [p.name for p in checkpoint_files(tmp_path / "run" / CHECKPOINT_DIR)] == ["step-00000001.pt"]


def test_a_non_finite_loss_names_the_step_and_the_last_checkpoint(tmp_path):
    cfg = toy(tmp_path, steps=4, save_every=2)
    Toy(cfg).run(stop_at=2)
    trainer = Toy(cfg, resume=True)
    with torch.no_grad():
        trainer.w.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match=r"at step 2; last good checkpoint: .*step-00000002\.pt \(resume"):
        trainer.run()


# ---- metrics after a resume --------------------------------------------------------------------------
def test_a_resumed_run_logs_each_step_once_in_json_lines_and_tensorboard(tmp_path):
    """A run stopped after step 5 whose last checkpoint is step 3 resumes there: neither
    metrics.jsonl nor the TensorBoard events show steps 4 and 5 twice."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = toy(tmp_path, steps=6, log_every=1, save_every=3)
    Toy(cfg).run(stop_at=5)
    ckpt = tmp_path / "run" / CHECKPOINT_DIR
    (ckpt / "step-00000005.pt").unlink()  # as if killed before the checkpoint of step 5
    (ckpt / LATEST).write_text(json.dumps({"file": "step-00000003.pt", "step": 3}))
    time.sleep(1.1)  # event files are named by the second they were opened
    Toy(cfg, resume=True).run()
    assert [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    assert len(list((tmp_path / "run" / "tensorboard").iterdir())) == 2  # one event file per run
    for tag in ("loss", "lr", "examples_per_s"):
        assert [e.step for e in events.Scalars(tag)] == [1, 2, 3, 4, 5, 6], tag


# ---- the loss plot -----------------------------------------------------------------------------------
@pytest.mark.parametrize("trainer", ["libra_tok.train", "libra_lm.train"])
def test_the_loss_plot_is_drawn_by_matplotlib(tmp_path, trainer):
    import importlib

    series = importlib.import_module(trainer).Trainer.loss_series
    rows = [{"step": s, **{key: 1.0 / s + i for i, (key, _, _) in enumerate(series)}} for s in range(1, 6)]
    rows += [{"step": 6, "loss": float("nan")}, {"loss": 0.5}, {"step": 7}]  # skipped: not finite, no step, no loss
    path = plot_losses(rows, tmp_path / "loss.png", series, "title")
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (900, 540)
        assert im.info["Software"].startswith("Matplotlib")
    assert plot_losses([], tmp_path / "empty.png", series, "no rows").is_file()


# ---- the data order and the learning-rate schedule ---------------------------------------------------
def test_keyed_batches_are_deterministic_and_split_by_rank():
    one = KeyedBatches(10, 4, seed=3, d=Dist())
    r0 = KeyedBatches(10, 2, seed=3, d=Dist(rank=0, world=2))
    r1 = KeyedBatches(10, 2, seed=3, d=Dist(rank=1, world=2))
    for b in range(6):  # crosses epoch boundaries (10 images, 4 per step)
        assert one.batch(b) == r0.batch(b) + r1.batch(b)
    epoch0 = [k[0] for b in range(2) for k in one.batch(b)] + [k[0] for k in one.batch(2)[:2]]
    assert sorted(epoch0) == list(range(10))  # each epoch is a permutation
    assert KeyedBatches(10, 4, seed=3, d=Dist(), start=4).batch(4) == one.batch(4)


def test_lr_schedule():
    assert lr_lambda(0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_lambda(9, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_lambda(55, 10, 100, 0.1) == pytest.approx(0.55)  # cosine midpoint
    assert lr_lambda(100, 10, 100, 0.1) == pytest.approx(0.1)
