"""Tokenizer training: the loss falls, resume is exact, DDP works, failures are explained."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from PIL import Image

from libra_tok import ImageTokenizer
from libra_tok.train import KeyedBatches, Dist, TrainConfig, TrainingDiverged, lr_lambda, train

ROOT = Path(__file__).resolve().parents[1]


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


def test_clip_never_changes(tmp_path):
    result = train(small_config(tmp_path, steps=3, disc_start=1), progress=False)
    init = ImageTokenizer.from_pretrained(Path(result.out_dir) / "init_tokenizer")
    final = ImageTokenizer.from_pretrained(result.final_tokenizer)
    for (k, a), (_, b) in zip(init.state_dict().items(), final.state_dict().items()):
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
    ca = torch.load(Path(full.out_dir) / "checkpoints" / "step-00000006.pt", weights_only=False)
    cb = torch.load(Path(resumed.out_dir) / "checkpoints" / "step-00000006.pt", weights_only=False)
    for k in ca["disc"]:
        assert torch.equal(ca["disc"][k], cb["disc"][k]), k
    for k in ca["trainable"]:
        assert torch.equal(ca["trainable"][k], cb["trainable"][k]), k


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
    from cli.tok import main

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


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process(tmp_path):
    """2 gloo processes x 2 images give the same update as 1 process x 4 images (same samples,
    averaged gradients, LFQ batch entropy all-reduced)."""
    common = ["--preset", "tiny", "--steps", "3", "--lr", "1e-3", "--warmup-steps", "1", "--perceptual-weight", "0",
              "--disc-start", "-1", "--holdout", "0", "--num-workers", "0", "--ema-decay", "0", "--device", "cpu",
              "--no-flip", "--cache-images", "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={_free_port()}", "-m", "cli.tok", "train", str(ROOT / "assets"),
                          "--out-dir", str(tmp_path / "ddp"), "--batch-size", "2", *common],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    single = subprocess.run([sys.executable, "-m", "cli.tok", "train", str(ROOT / "assets"), "--out-dir",
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
