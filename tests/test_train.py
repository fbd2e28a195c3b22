"""Tokenizer training: the loss falls, resume is exact, DDP works, failures are explained."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from builders import (
    ROOT,
    MarkerPayload,
    Opaque,
    check_damaged_checkpoint_flow,
    cli_error,
    free_port,
    hf_tiny_clip,
    hf_vision_state,
    point_latest_at,
)
from libra_tok import ImageTokenizer
from libra_tok.run import TrainingDiverged
from libra_tok.train import TrainConfig, train


def small_config(tmp_path, **kw):
    base = dict(data=[str(ROOT / "assets")], out_dir=str(tmp_path / "run"), preset="tiny", steps=4, batch_size=2,
                lr=2e-3, warmup_steps=2, perceptual_weight=0.0, disc_start=-1, holdout=2, num_workers=0,
                cache_images=True, log_every=1, save_every=100, sample_every=100, ema_decay=0.9, seed=0, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def trainable(path):
    tok = ImageTokenizer.from_pretrained(path)
    return {k: v for k, v in tok.state_dict().items()}


@pytest.mark.slow
def test_reconstruction_loss_falls(tmp_path):
    torch.manual_seed(0)
    cfg = small_config(tmp_path, steps=30, batch_size=4, l2_weight=1.0, crop_scale=(0.6, 1.0))
    result = train(cfg, progress=False)
    l1 = [row["l1"] for row in result.history if "l1" in row]
    first, last = sum(l1[:5]) / 5, sum(l1[-5:]) / 5
    assert last < 0.75 * first, (first, last)
    assert (Path(cfg.out_dir) / "final" / "model.safetensors").is_file()
    rows = [json.loads(line) for line in (Path(cfg.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["step"] == 30 and "holdout_psnr" in rows[-1] and rows[-1]["images_per_s"] > 0
    assert (Path(cfg.out_dir) / "samples" / "step-00000030.png").is_file()


def test_a_run_draws_its_loss_curves_and_logs_to_tensorboard(tmp_path):
    result = train(small_config(tmp_path, steps=2), progress=False)
    assert result.plot == Path(result.out_dir) / "loss.png"
    with Image.open(result.plot) as im:
        assert im.format == "PNG" and im.info["Software"].startswith("Matplotlib")
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return
    assert any((Path(result.out_dir) / "tensorboard").glob("events.out.tfevents.*"))


def test_clip_never_changes(tmp_path):
    result = train(small_config(tmp_path, steps=3, disc_start=1), progress=False)
    init = ImageTokenizer.from_pretrained(Path(result.out_dir) / "init_tokenizer")
    final = ImageTokenizer.from_pretrained(result.final_tokenizer)
    for (k, a), (_, b) in zip(init.state_dict().items(), final.state_dict().items(), strict=True):
        if k.startswith("encoder."):
            assert torch.equal(a, b), k
    assert not torch.equal(init.decoder.conv_out.weight, final.decoder.conv_out.weight)


def test_resume_is_bitwise_exact(tmp_path):
    """Stop at step 3, resume, and reach exactly the weights of an uninterrupted run (GAN and
    EMA on, so discriminator, optimisers, EMA and RNG state all have to round trip)."""
    kw = dict(steps=6, disc_start=2, save_every=3)
    full = train(small_config(tmp_path / "a", **kw), progress=False)
    part = small_config(tmp_path / "b", **kw)
    first = train(part, progress=False, stop_at=3)
    assert first.step == 3 and (Path(part.out_dir) / "checkpoints" / "step-00000003.pt").is_file()
    with pytest.raises(FileExistsError, match="--resume"):
        train(part, progress=False)
    resumed = train(part, resume=True, progress=False)
    assert resumed.step == 6
    a, b = trainable(full.final_tokenizer), trainable(resumed.final_tokenizer)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    ca = torch.load(Path(full.out_dir) / "checkpoints" / "step-00000006.pt", weights_only=True)
    cb = torch.load(Path(resumed.out_dir) / "checkpoints" / "step-00000006.pt", weights_only=True)
    for k in ca["disc"]:
        assert torch.equal(ca["disc"][k], cb["disc"][k]), k
    for k in ca["trainable"]:
        assert torch.equal(ca["trainable"][k], cb["trainable"][k]), k


def test_empty_or_unreadable_data_fails_before_model(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images found"):
        train(small_config(tmp_path, data=[str(empty)]), progress=False)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_text("not an image")
    (broken / "b.jpg").write_bytes(b"")
    with pytest.raises(ValueError, match="none of the first 2 images could be read.*not an image"):
        train(small_config(tmp_path, data=[str(broken)]), progress=False)
    assert not (tmp_path / "run" / "init_tokenizer").exists()


def test_corrupt_images_are_skipped_and_counted(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    for p in sorted((ROOT / "assets").glob("*.png"))[:3]:
        (data / p.name).write_bytes(p.read_bytes())
    jpg = (ROOT / "assets" / "rocket.jpg").read_bytes()
    (data / "zz_truncated.jpg").write_bytes(jpg[: len(jpg) // 3])
    result = train(small_config(tmp_path, data=[str(data)], steps=4, holdout=0), progress=False)
    assert result.step == 4
    assert list(result.skipped_images) == [str(data / "zz_truncated.jpg")]
    assert "corrupt" in next(iter(result.skipped_images.values()))
    assert json.loads((Path(result.out_dir) / "skipped_images.json").read_text())


def test_non_finite_loss_names_step_and_checkpoint(tmp_path):
    cfg = small_config(tmp_path, steps=4, save_every=2)
    train(cfg, progress=False, stop_at=2)
    cfg.l1_weight = float("nan")
    with pytest.raises(TrainingDiverged, match=r"at step 2; last good checkpoint: .*step-00000002\.pt"):
        train(cfg, resume=True, progress=False)


def test_cli_config_file_and_overrides(tmp_path):
    from libra_cli.tok import main

    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(f"steps: 2\nbatch_size: 2\nperceptual_weight: 0\ndisc_start: -1\nnum_workers: 0\n"
                        f"holdout: 1\nout_dir: {tmp_path / 'cli-run'}\ndevice: cpu\n")
    runner = CliRunner()
    res = runner.invoke(main, ["train", str(ROOT / "assets"), "--config", str(cfg_file), "--steps", "3",
                               "--betas", "0.4,0.8", "--no-flip", "--tokenizer", "{pad_mode: crop}"])
    assert res.exit_code == 0, res.output
    assert "trained 3 steps" in res.output
    saved = json.loads((tmp_path / "cli-run" / "train_config.json").read_text())
    assert saved["steps"] == 3 and saved["betas"] == [0.4, 0.8] and saved["flip"] is False
    assert saved["tokenizer"] == {"pad_mode": "crop"} and saved["batch_size"] == 2
    res = runner.invoke(main, ["train", "--out-dir", str(tmp_path / "cli-run"), "--resume", "--steps", "4"])
    assert res.exit_code == 0, res.output
    assert "trained 4 steps" in res.output
    res = runner.invoke(main, ["train", str(tmp_path), "--steps", "x"])
    assert res.exit_code == 2 and "x" in res.output


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tmp_path):
    """2 gloo processes x 2 images give the same update as 1 process x 4 images (same samples,
    averaged gradients, LFQ batch entropy all-reduced)."""
    common = ["--preset", "tiny", "--steps", "3", "--lr", "1e-3", "--warmup-steps", "1", "--perceptual-weight", "0",
              "--disc-start", "-1", "--holdout", "0", "--num-workers", "0", "--ema-decay", "0", "--device", "cpu",
              "--no-flip", "--cache-images", "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", "-m", "libra_cli.tok", "train", str(ROOT / "assets"),
                          "--out-dir", str(tmp_path / "ddp"), "--batch-size", "2", *common],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    single = subprocess.run([sys.executable, "-m", "libra_cli.tok", "train", str(ROOT / "assets"), "--out-dir",
                             str(tmp_path / "one"), "--batch-size", "4", *common],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout + single.stderr
    losses = [[json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
              for run in ("ddp", "one")]
    assert len(losses[0]) == 3 and losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    # Adam turns rounding noise on near-zero gradients (conv biases before a GroupNorm) into
    # steps of up to lr, so single elements may differ by at most the summed lr; a real mismatch
    # (other samples, an unreduced entropy term) would move almost every weight.
    a, b = trainable(tmp_path / "ddp" / "final"), trainable(tmp_path / "one" / "final")
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a if k.startswith(("quantizer.", "decoder."))])
    assert diff.max() <= 1e-3 + 5.5e-4 + 1e-4 + 1e-6
    assert diff.median() < 1e-6
    init = trainable(tmp_path / "one" / "init_tokenizer")
    assert not torch.equal(init["decoder.conv_out.weight"], b["decoder.conv_out.weight"])


def test_missing_lpips_weights_fail_before_any_model(tmp_path):
    from libra_tok.metrics import MissingWeightsError

    cfg = small_config(tmp_path, perceptual_weight=1.0, weights_dir=str(tmp_path / "no-weights"))
    with pytest.raises(MissingWeightsError, match=r"vgg16-397923af\.pth.*--weights-dir"):
        train(cfg, progress=False)
    assert not (tmp_path / "run" / "init_tokenizer").exists()


# ---- run folders: checkpoints, metrics, options -----------------------------------------------------
def test_checkpoints_load_without_unpickling_objects(tmp_path):
    """Checkpoints hold tensors and plain values only (weights_only=True loads them), and the
    RNG states round trip."""
    import random

    import numpy as np

    from libra_tok.run import rng_state, set_rng_state

    result = train(small_config(tmp_path, steps=2, disc_start=1, save_every=2), progress=False)
    state = torch.load(Path(result.out_dir) / "checkpoints" / "step-00000002.pt", weights_only=True)
    assert state["step"] == 2 and {"disc", "ema", "opt", "opt_d", "rng"} <= set(state)

    def draw():
        return random.random(), random.gauss(0, 1), float(np.random.rand()), np.random.normal(), float(torch.rand(1))

    random.seed(1), np.random.seed(1), torch.manual_seed(1)
    random.gauss(0, 1), np.random.normal()  # a cached Gaussian in both states
    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    expected = draw()
    random.seed(2), np.random.seed(2), torch.manual_seed(2)
    set_rng_state(torch.load(path, weights_only=True))
    assert draw() == expected


def test_resume_refuses_a_pickled_payload(tmp_path):
    """A checkpoint that asks the unpickler to call a function is refused with one line naming
    the file; the function never runs."""
    from libra_cli.tok import main

    cfg = small_config(tmp_path, steps=4, save_every=2)
    train(cfg, progress=False, stop_at=2)
    marker = tmp_path / "payload-ran"
    evil = Path(cfg.out_dir) / "checkpoints" / "step-00000004.pt"
    torch.save({"step": 4, "batches_seen": 4, "hook": MarkerPayload(marker)}, evil)
    point_latest_at(cfg.out_dir, 4)
    res = CliRunner().invoke(main, ["train", "--out-dir", cfg.out_dir, "--resume"])
    error = cli_error(res)
    assert not marker.exists()
    assert error.startswith(f"Error: {evil} is refused: it holds Python objects besides tensors (builtins.open") \
        or error.startswith(f"Error: {evil} is refused: it holds Python objects besides tensors (io.open"), error
    assert error.endswith(f"{Path(cfg.out_dir) / 'checkpoints' / 'step-00000002.pt'} is intact: delete "
                          f"{evil.name} to resume from it"), error


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_damaged_checkpoint_names_the_intact_one(tmp_path, caplog, damage):
    from libra_cli.tok import main

    cfg = small_config(tmp_path, steps=6, save_every=2)
    train(cfg, progress=False, stop_at=4)
    last = Path(cfg.out_dir) / "checkpoints" / "step-00000004.pt"
    data = last.read_bytes()
    last.write_bytes({"truncated": data[: len(data) // 2], "garbage": os.urandom(4096), "empty": b""}[damage])
    check_damaged_checkpoint_flow(main, cfg, train, [str(ROOT / "assets"), "--steps", "6"], caplog)


def test_damaged_checkpoint_without_an_intact_one(tmp_path):
    from libra_cli.tok import main

    cfg = small_config(tmp_path, steps=4, save_every=2)
    train(cfg, progress=False, stop_at=2)
    only = Path(cfg.out_dir) / "checkpoints" / "step-00000002.pt"
    only.write_bytes(b"PK\x03\x04 not really a zip")
    error = cli_error(CliRunner().invoke(main, ["train", "--out-dir", cfg.out_dir, "--resume"]))
    assert error.startswith(f"Error: {only} is damaged (")
    assert error.endswith(f"); no intact checkpoint is left: delete {only.parent} to start the run over"), error


def test_resume_drops_repeated_and_partial_metric_rows(tmp_path):
    """A run killed after step 5 (last checkpoint at 4, a half-written metrics line) resumes
    with exactly one row per step, the rows of an uninterrupted run."""
    from libra_tok.run import read_metrics

    kw = dict(steps=6, save_every=2, disc_start=2)
    full = train(small_config(tmp_path / "a", **kw), progress=False)
    cfg = small_config(tmp_path / "b", **kw)
    train(cfg, progress=False, stop_at=5)
    (Path(cfg.out_dir) / "checkpoints" / "step-00000005.pt").unlink()
    point_latest_at(cfg.out_dir, 4)
    log_file = Path(cfg.out_dir) / "metrics.jsonl"
    with open(log_file, "a") as fh:
        fh.write('{"step": 6, "l1": 0.12')  # killed mid-write
    assert [r["step"] for r in read_metrics(log_file)] == [1, 2, 3, 4, 5]  # the partial line is skipped
    train(cfg, resume=True, progress=False)
    rows = [json.loads(line) for line in log_file.read_text().splitlines()]  # every line is whole
    strip = lambda rows: [{k: v for k, v in r.items() if k != "images_per_s"} for r in rows]  # noqa: E731
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert strip(rows) == strip(read_metrics(Path(full.out_dir) / "metrics.jsonl"))


def test_a_fresh_run_starts_a_fresh_metrics_log(tmp_path):
    """Rows of a run killed before its first checkpoint do not mix with those of its rerun."""
    cfg = small_config(tmp_path, steps=2)
    log_file = Path(cfg.out_dir) / "metrics.jsonl"
    log_file.parent.mkdir(parents=True)
    log_file.write_text('{"step": 1, "loss": 9.0}\n{"step": 2, "loss": 8.0}\n{"step": 3, "lo')
    train(cfg, progress=False)
    rows = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2] and rows[0]["loss"] != 9.0


def test_resume_from_a_checkpoint_with_numpy_rng_state(tmp_path):
    """Checkpoints written before the RNG states were stored as tensors still resume."""
    import random

    import numpy as np

    cfg = small_config(tmp_path, steps=4, save_every=2)
    train(cfg, progress=False, stop_at=2)
    path = Path(cfg.out_dir) / "checkpoints" / "step-00000002.pt"
    state = torch.load(path, weights_only=True)
    state["rng"] = {"torch": state["rng"]["torch"], "python": random.getstate(), "numpy": np.random.get_state()}
    torch.save(state, path)
    assert train(cfg, resume=True, progress=False).step == 4


def test_trust_pickle_reaches_the_loader_and_is_not_saved(tmp_path, monkeypatch):
    """--trust-pickle is passed to the loader of --init-from, and a resumed run does not
    inherit it from the saved options."""
    from libra_cli.tok import main

    assert TrainConfig().trust_pickle is False
    calls = []
    real = ImageTokenizer.from_pretrained.__func__

    def spy(cls, path, device=None, *, trust_pickle=False):
        calls.append((Path(path).name, trust_pickle))
        if Path(path).name == "official.ckpt":
            torch.manual_seed(0)
            return ImageTokenizer("tiny")
        return real(cls, path, device, trust_pickle=trust_pickle)

    monkeypatch.setattr(ImageTokenizer, "from_pretrained", classmethod(spy))
    official = tmp_path / "official.ckpt"
    official.write_bytes(b"stand-in")
    out = tmp_path / "run"
    args = ["train", str(ROOT / "assets"), "--out-dir", str(out), "--init-from", str(official), "--steps", "2",
            "--batch-size", "2", "--perceptual-weight", "0", "--disc-start", "-1", "--num-workers", "0",
            "--holdout", "1", "--device", "cpu", "--save-every", "1"]
    runner = CliRunner()
    res = runner.invoke(main, args + ["--trust-pickle"])
    assert res.exit_code == 0, res.output
    assert calls == [("official.ckpt", True)]
    assert json.loads((out / "train_config.json").read_text()).get("trust_pickle", False) is False
    res = runner.invoke(main, ["train", "--out-dir", str(out), "--resume", "--steps", "3"])
    assert res.exit_code == 0, res.output
    assert calls[1:] == [("init_tokenizer", False)]


def test_inputs_skipped_while_listing_are_counted_and_listed(tmp_path):
    """A dangling link and a truncated tar (its intact member is kept) are listed in
    skipped_images.json with their reason, like unreadable images."""
    import tarfile

    data = tmp_path / "data"
    data.mkdir()
    for p in sorted((ROOT / "assets").glob("*.png"))[:3]:
        (data / p.name).write_bytes(p.read_bytes())
    (data / "zz_gone.png").symlink_to(tmp_path / "missing.png")
    tar = tmp_path / "shard.tar"
    with tarfile.open(tar, "w") as tf:
        for name in ("coffee.png", "rocket.jpg"):
            tf.add(ROOT / "assets" / name, arcname=name)
    with tarfile.open(tar) as tf:
        cut = tf.getmembers()[1].offset + 100
    tar.write_bytes(tar.read_bytes()[:cut])  # cut inside the second member's header
    result = train(small_config(tmp_path, data=[str(data), str(tar)], steps=2, holdout=0), progress=False)
    skipped = json.loads((Path(result.out_dir) / "skipped_images.json").read_text())
    assert set(skipped) == {str(data / "zz_gone.png"), str(tar)}, skipped
    assert all(reason for reason in skipped.values())
    assert result.skipped_images == skipped
    rows = [json.loads(line) for line in (Path(result.out_dir) / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["skipped_images"] == 2


def test_trust_pickle_reaches_the_clip_weights_loader(tmp_path):
    """--clip-weights naming a pickle with a Python object trains only with --trust-pickle."""
    pytest.importorskip("transformers")
    from libra_cli.tok import main

    clip = tmp_path / "clip.ckpt"
    torch.save({"state_dict": {"vision_model." + k: v for k, v in hf_vision_state(hf_tiny_clip()).items()},
                "callbacks": Opaque()}, clip)
    args = ["train", str(ROOT / "assets"), "--clip-weights", str(clip), "--steps", "1", "--batch-size", "2",
            "--perceptual-weight", "0", "--disc-start", "-1", "--num-workers", "0", "--holdout", "1", "--device", "cpu"]
    runner = CliRunner()
    error = cli_error(runner.invoke(main, args + ["--out-dir", str(tmp_path / "a")]))
    assert str(clip) in error and "Python objects" in error, error
    res = runner.invoke(main, args + ["--out-dir", str(tmp_path / "b"), "--trust-pickle"])
    assert res.exit_code == 0, res.output
