"""LM training: the loss falls, the frozen LLM stays frozen, resume is exact, packing equals
padding, DDP/FSDP equal one process, SFT trains answers only, failures are explained."""

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from PIL import Image
from safetensors.torch import load_file

from builders import (
    CAPTIONS,
    MIXED,
    ROOT,
    TINY,
    MarkerPayload,
    Opaque,
    check_damaged_checkpoint_flow,
    cli_error,
    free_port,
    hf_llama,
    mixed_batch,
    point_latest_at,
    randomize_,
)
from libra_lm import LibraForCausalLM
from libra_lm.data import Collator, InstructionDataset, PretrainDataset, ShardImages, collate
from libra_lm.train import (
    STAGE_DEFAULTS,
    TrainConfig,
    Trainer,
    label_loss_terms,
    param_groups,
    sample_losses,
    train,
)
from libra_tok.run import TrainingDiverged, lr_lambda

pytestmark = pytest.mark.usefixtures("one_thread")


def config(tmp_path, shards, tokenizer_model, **kw):
    base = dict(stage="pretrain", data=[str(shards)], preset="tiny", text_tokenizer=str(tokenizer_model),
                out_dir=str(tmp_path / "run"), steps=4, batch_size=3, grad_accum=1, lr=3e-3, num_workers=0,
                log_every=1, save_every=100, val_every=100, gradient_checkpointing=False, seed=0, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def metrics(out_dir):
    return [json.loads(line) for line in (Path(out_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def llava_json(tmp_path_factory):
    records = [{"id": name, "image": f"imgs/{name}", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": caption.lower()}]}
        for name, caption in list(CAPTIONS.items())[:5]]
    records.append({"id": "text", "conversations": [{"from": "human", "value": "Say hello."},
                                                    {"from": "gpt", "value": "hello"}]})
    path = tmp_path_factory.mktemp("llava") / "llava.json"
    path.write_text(json.dumps(records))
    return path


# ---- the loss ------------------------------------------------------------------------------------------
def test_label_loss_terms_are_the_official_loss_split_by_label_kind():
    torch.manual_seed(0)
    model = randomize_(LibraForCausalLM(TINY), seed=1, scale=0.2)
    ids, feats = mixed_batch(TINY, MIXED, seed=3)
    labels = ids.clone()
    boi = ids[..., 0] == TINY.boi_token_id
    after_eoi = torch.zeros_like(boi)
    after_eoi[:, 1:] = ids[:, :-1, 0] == TINY.eoi_token_id
    labels[boi | after_eoi] = -100  # cross-modal predictions, masked as the data pipeline does
    labels[0, :2] = -100
    out = model(ids, feats, labels=labels)
    per, valid, image = label_loss_terms(out, labels, TINY)
    assert torch.allclose(per[valid].sum() / valid.sum(), out.loss, rtol=1e-6)
    # Independent check of one image label: the mean over codebooks of each head's cross-entropy.
    b, t = image.nonzero()[0].tolist()
    target = labels[b, t + 1] - TINY.text_vocab_size
    logp = out.vision_logits[b, t].log_softmax(-1)
    assert per[b, t].item() == pytest.approx(-(logp[0, target[0]] + logp[1, target[1]]).item() / 2, rel=1e-5)
    assert not per[~valid].any() and image.any() and (valid & ~image).any()


def test_packed_sequences_give_the_per_sample_losses_of_padded_ones(shard_dirs, sp, llava_json):
    torch.manual_seed(0)
    model = randomize_(LibraForCausalLM(TINY), seed=2, scale=0.2)
    images = ShardImages([shard_dirs[0]])
    pre = PretrainDataset(images, sp, TINY)
    sft = InstructionDataset([llava_json], images, sp, TINY)
    examples = [pre[0], sft[5], pre[3], sft[1], sft[5]]  # 102, 165, 100, 263, 165 tokens (sft[5]: text only)
    losses = []
    for kw in ({}, dict(pack=True, pack_length=400)):
        batch = collate(examples, TINY, **kw)
        with torch.no_grad():
            out = model(batch.input_ids, batch.clip_features, batch.attention_mask, batch.labels,
                        segment_ids=batch.segment_ids)
        per, valid, _ = label_loss_terms(out, batch.labels, TINY)
        losses.append(sample_losses(batch, per, valid))
        if kw:
            assert batch.input_ids.shape[0] < len(examples)  # really packed
    assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-5)
    assert len(set(round(x, 4) for x in losses[0][:4])) == 4


# ---- pretraining ---------------------------------------------------------------------------------------
def test_pretraining_loss_falls_and_the_llm_stays_frozen(tmp_path, shard_dirs, sp):
    cfg = config(tmp_path, shard_dirs[0], sp, steps=24, batch_size=9, lr=4e-3, log_every=1, val_holdout=0)
    trainer = Trainer(cfg, progress=False)
    opt_names = {n for n, p in trainer.model.named_parameters() if any(p is q for g in trainer.opt.param_groups
                                                                        for q in g["params"])}
    assert opt_names == {n for n, _ in trainer.model.named_parameters() if "vision" in n}
    result = trainer.run()
    rows = metrics(cfg.out_dir)
    loss = [r["loss"] for r in rows]
    assert np.mean(loss[-4:]) < 0.85 * np.mean(loss[:4]), loss
    assert rows[-1]["loss_image"] < rows[0]["loss_image"]
    assert {"loss_image", "loss_text", "lr", "grad_norm", "tokens_per_s", "epoch"} <= set(rows[0])
    # Frozen parameters: bit-identical to the starting weights; every vision part moved.
    torch.manual_seed(0)
    start = LibraForCausalLM(TINY).state_dict()
    final = load_file(result.final_model / "model.safetensors")
    frozen = [k for k in start if "vision" not in k]
    assert frozen and all(torch.equal(start[k], final[k]) for k in frozen)
    assert all(not torch.equal(start[k], final[k]) for k in start if "vision" in k and "bridge" not in k)
    # Checkpoints hold only what trains, and optimizer state only for it.
    ckpt = torch.load(Path(cfg.out_dir) / "checkpoints" / "step-00000024.pt", weights_only=True)
    assert set(ckpt["trainable"]) == set(ckpt["optimizer"]["state"]) == {k for k in start if "vision" in k}
    assert (result.final_model / "tokenizer.model").read_bytes() == Path(sp).read_bytes()
    with Image.open(result.plot) as im:
        assert im.format == "PNG" and im.width > 400 and im.info["Software"].startswith("Matplotlib")


def test_pretraining_from_an_hf_llama_folder(tmp_path, shard_dirs, sp):
    """The LLaMA weights load and stay frozen; the image sizes of the LM come from the shards;
    the text tokenizer defaults to the folder's tokenizer.model."""
    pytest.importorskip("transformers")
    llama = hf_llama(seed=4)
    llama.save_pretrained(tmp_path / "llama")
    shutil.copy(sp, tmp_path / "llama" / "tokenizer.model")
    cfg = config(tmp_path, shard_dirs[0], sp, text_tokenizer=None, init_from=str(tmp_path / "llama"), steps=2,
                 preset="libra-7b")  # the preset is not used with init_from
    result = train(cfg, progress=False)
    final = LibraForCausalLM.from_pretrained(result.final_model)
    assert (final.config.contiguous_signal_size, final.config.num_image_tokens) == (192, 64)
    state = final.state_dict()
    for name, tensor in llama.state_dict().items():
        if name in state:
            assert torch.equal(state[name], tensor), name
    assert sum(name in state for name in llama.state_dict()) == len(llama.state_dict())


def test_resume_is_bitwise_exact(tmp_path, shard_dirs, sp):
    """Stop at step 3, resume, and reach exactly the state of an uninterrupted run (with
    validation, warm-up, gradient accumulation and the data order crossing epochs)."""
    kw = dict(steps=6, save_every=3, batch_size=2, grad_accum=2, val_holdout=2, val_every=2)
    full = train(config(tmp_path / "a", shard_dirs[0], sp, **kw), progress=False)
    part = config(tmp_path / "b", shard_dirs[0], sp, **kw)
    first = train(part, progress=False, stop_at=3)
    assert first.step == 3
    with pytest.raises(FileExistsError, match="--resume"):
        train(part, progress=False)
    resumed = train(part, resume=True, progress=False)
    assert resumed.step == 6
    a, b = load_file(full.final_model / "model.safetensors"), load_file(resumed.final_model / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ca = torch.load(Path(full.out_dir) / "checkpoints" / "step-00000006.pt", weights_only=True)
    cb = torch.load(Path(resumed.out_dir) / "checkpoints" / "step-00000006.pt", weights_only=True)
    for name, state in ca["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, cb["optimizer"]["state"][name][key]), (name, key)
    ra, rb = metrics(full.out_dir), metrics(resumed.out_dir)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(ra) == strip(rb) and any("val_loss" in r for r in ra)


def test_resume_refuses_another_starting_point(tmp_path, shard_dirs, sp):
    cfg = config(tmp_path, shard_dirs[0], sp, steps=4, save_every=2)
    train(cfg, progress=False, stop_at=2)
    with pytest.raises(ValueError, match="frozen weights differ .*--seed"):
        train(config(tmp_path, shard_dirs[0], sp, steps=4, save_every=2, seed=1), resume=True, progress=False)
    with pytest.raises(ValueError, match="other trainable parameters"):
        train(config(tmp_path, shard_dirs[0], sp, steps=4, frozen_llm=False), resume=True, progress=False)


def test_gradient_accumulation_and_checkpointing_change_nothing(tmp_path, shard_dirs, sp):
    """4 sequences in one micro-batch = 2 x 2 accumulated (token-mean loss); recomputing the
    layers in the backward pass gives the same steps."""
    runs = {name: train(config(tmp_path / name, shard_dirs[0], sp, steps=3, **kw), progress=False)
            for name, kw in (("one", dict(batch_size=4)), ("accum", dict(batch_size=2, grad_accum=2)),
                             ("ckpt", dict(batch_size=4, gradient_checkpointing=True)))}
    losses = {name: [r["loss"] for r in metrics(run.out_dir)] for name, run in runs.items()}
    assert losses["accum"] == pytest.approx(losses["one"], rel=1e-5)
    assert losses["ckpt"] == losses["one"]
    a = load_file(runs["one"].final_model / "model.safetensors")
    c = load_file(runs["ckpt"].final_model / "model.safetensors")
    assert all(torch.equal(a[k], c[k]) for k in a)


@pytest.mark.filterwarnings("ignore:Seems like `optimizer.step\\(\\)` has been overridden")
@pytest.mark.parametrize("reduction", ["tokens", "official"])
def test_loss_reduction_over_micro_batches(tmp_path, shard_dirs, sp, reduction):
    """tokens: gradient of (sum of every label's loss) / (labels of the step); official (HF
    Trainer): gradient of the mean over micro-batches of each micro-batch's mean."""
    trainer = Trainer(config(tmp_path, shard_dirs[0], sp, batch_size=2, grad_accum=2, loss_reduction=reduction,
                             grad_clip=0.0), progress=False)
    batches = trainer._loader()
    micro = [next(batches), next(batches)]
    grads = {}
    trainer.opt.step = lambda: grads.update({n: p.grad.clone() for n, p in trainer.model.named_parameters()
                                             if p.grad is not None})
    trainer.train_step(micro)
    outs = [trainer.model(b.input_ids, trainer.features(b), b.attention_mask, b.labels) for b in micro]
    counts = [b.num_labels for b in micro]
    assert counts[0] != counts[1]  # captions differ in length: the two reductions differ
    if reduction == "tokens":
        loss = sum(o.loss * c for o, c in zip(outs, counts, strict=True)) / sum(counts)
    else:
        loss = sum(o.loss for o in outs) / 2
    trainer.model.zero_grad()
    loss.backward()
    assert grads and all(torch.allclose(grads[n], p.grad, rtol=1e-4, atol=1e-7)
                         for n, p in trainer.model.named_parameters() if p.grad is not None)


def test_recomputed_features_equal_the_stored_ones(tmp_path, shard_dirs, sp):
    with_feats, without = shard_dirs
    stored = Trainer(config(tmp_path / "a", with_feats, sp), progress=False)
    recomputed = Trainer(config(tmp_path / "b", without, sp), progress=False)
    assert stored.image_tok is None and recomputed.image_tok is not None
    keys = [(0, 0), (4, 0), (7, 0)]
    a = Collator(TINY)([stored.train_data[k] for k in keys])
    b = Collator(TINY)([recomputed.train_data[k] for k in keys])
    assert a.pixels is None and b.pixels.shape == (3, 3, 112, 112) and b.clip_features is None
    fa, fb = stored.features(a), recomputed.features(b)
    assert torch.equal(a.input_ids, b.input_ids)
    # Stored features are the float16 of the same CLIP features.
    assert torch.allclose(fa, fb.half().float(), rtol=2e-3, atol=2e-3)
    assert fb[:, :2].eq(0).all() and fb.abs().sum() > 0
    # Validation shards without features need the encoder even when the training shards have them.
    mixed = Trainer(config(tmp_path / "d", with_feats, sp, val_data=[str(without)]), progress=False)
    assert mixed.image_tok is not None and mixed.validate()["val_samples"] == 9
    held = Trainer(config(tmp_path / "e", with_feats, sp, val_holdout=3), progress=False)
    train_pos, val_pos = set(held.train_data.positions.tolist()), set(held.val_data.positions.tolist())
    assert len(val_pos) == 3 and not train_pos & val_pos and train_pos | val_pos == set(range(9))
    discrete = Trainer(config(tmp_path / "c", with_feats, sp, input="discrete"), progress=False)
    batch = Collator(TINY)([discrete.train_data[k] for k in keys])
    assert discrete.features(batch) is None  # the model then uses zero features


def test_a_different_image_tokenizer_is_refused(tmp_path, shard_dirs, sp):
    from libra_tok import ImageTokenizer

    torch.manual_seed(123)
    ImageTokenizer("tiny").save_pretrained(tmp_path / "other")
    with pytest.raises(ValueError, match="differs from the one of the shards"):
        Trainer(config(tmp_path, shard_dirs[1], sp, image_tokenizer=str(tmp_path / "other")), progress=False)


# ---- instruction tuning --------------------------------------------------------------------------------
def test_sft_trains_every_parameter_on_answers_only(tmp_path, shard_dirs, sp, llava_json):
    pre = train(config(tmp_path / "pre", shard_dirs[0], sp, steps=2), progress=False)
    cfg = TrainConfig(stage="sft", data=[str(llava_json)], image_shards=[str(shard_dirs[1])],
                      init_from=str(pre.final_model),
                      out_dir=str(tmp_path / "sft"), steps=3, batch_size=3, grad_accum=1, lr=1e-3, num_workers=0,
                      log_every=1, gradient_checkpointing=False, seed=0, device="cpu")
    assert (cfg.frozen_llm, cfg.max_length) == (False, 2048)
    trainer = Trainer(cfg, progress=False)  # text tokenizer: the one saved beside the pretrained model
    assert sum(len(g["params"]) for g in trainer.opt.param_groups) == len(list(trainer.model.parameters()))
    result = trainer.run()
    rows = metrics(cfg.out_dir)
    # Images are masked: every trained label is text (the answers and their EOS).
    assert all("loss_image" not in r and r["loss_text"] == pytest.approx(r["loss"], rel=1e-5) for r in rows)
    a = load_file(pre.final_model / "model.safetensors")
    b = load_file(result.final_model / "model.safetensors")
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], b["model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(a["lm_head.weight"], b["lm_head.weight"])


# ---- options, schedule, errors --------------------------------------------------------------------------
def test_stage_defaults_are_the_official_hyper_parameters():
    pre, sft = TrainConfig(stage="pretrain"), TrainConfig(stage="sft")
    assert (pre.lr, pre.batch_size, pre.grad_accum, pre.max_length, pre.steps, pre.frozen_llm) == \
        (1e-4, 8, 4, 700, 40_000, True)
    assert (sft.lr, sft.batch_size, sft.grad_accum, sft.max_length, sft.steps, sft.frozen_llm) == \
        (2e-5, 2, 8, 2048, None, False)
    assert (pre.betas, pre.eps, pre.weight_decay, pre.warmup_ratio, pre.grad_clip) == \
        ((0.9, 0.99), 1e-8, 0.01, 0.05, 1.0)
    assert TrainConfig(stage="sft", lr=1e-3).lr == 1e-3 and STAGE_DEFAULTS["pretrain"]["lr"] == 1e-4
    with pytest.raises(ValueError, match="stage must be one of"):
        TrainConfig(stage="finetune")
    with pytest.raises(ValueError, match="input must be one of"):
        TrainConfig(input="pixels")
    # Cosine with 5 % warm-up to 0 (HF get_cosine_schedule_with_warmup, warm-up counted from 1).
    warmup = math.ceil(40_000 * 0.05)
    assert lr_lambda(warmup - 1, warmup, 40_000, 0.0) == 1.0
    assert lr_lambda(21_000, warmup, 40_000, 0.0) == pytest.approx(0.5)
    assert lr_lambda(40_000, warmup, 40_000, 0.0) == pytest.approx(0.0)


def test_weight_decay_spares_norms_and_frozen_parameters():
    model = LibraForCausalLM(TINY)
    model.frozen_llm = True
    decay, plain = param_groups(model, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    plain_names = {names[id(p)] for p in plain["params"]}
    assert plain["weight_decay"] == 0.0 and decay["weight_decay"] == 0.01
    assert plain_names == {n for n, _ in model.named_parameters() if "vision" in n and "norm" in n}
    assert all("vision" in names[id(p)] and "norm" not in names[id(p)] for p in decay["params"])


def test_non_finite_loss_names_step_and_checkpoint(tmp_path, shard_dirs, sp):
    cfg = config(tmp_path, shard_dirs[0], sp, steps=6, save_every=2)
    train(cfg, progress=False, stop_at=2)
    # The same shards with NaN features: the first step after resuming has a NaN loss.
    broken = tmp_path / "nan-shards"
    shutil.copytree(shard_dirs[0], broken)
    for path in broken.glob("shard-*/features.f16"):
        path.write_bytes(np.full(path.stat().st_size // 2, np.nan, dtype="<f2").tobytes())
    cfg.data = [str(broken)]
    with pytest.raises(TrainingDiverged, match=r"at step 2; last good checkpoint: .*step-00000002\.pt"):
        train(cfg, resume=True, progress=False)


def test_data_errors_come_before_the_model(tmp_path, shard_dirs, sp):
    with pytest.raises(ValueError, match="no text tokenizer: pass --text-tokenizer"):
        Trainer(config(tmp_path, shard_dirs[0], sp, text_tokenizer=None), progress=False)
    with pytest.raises(ValueError, match="the shards do not fit the LM: 64 patches per image in the shards, "
                                         "num_image_tokens 576"):
        Trainer(config(tmp_path, shard_dirs[0], sp, preset="libra-7b"), progress=False)
    with pytest.raises(FileNotFoundError, match="holds no shards"):
        Trainer(config(tmp_path, tmp_path, sp), progress=False)
    assert not (tmp_path / "run").exists()


def test_cli_config_file_overrides_and_resume(tmp_path, shard_dirs, sp):
    from libra_cli.lm import main

    cfg_file = tmp_path / "train.yaml"
    cfg_file.write_text(f"steps: 2\nbatch_size: 3\ngrad_accum: 1\nnum_workers: 0\ngradient_checkpointing: false\n"
                        f"out_dir: {tmp_path / 'cli-run'}\ndevice: cpu\ntext_tokenizer: {sp}\nlr: 0.001\n")
    runner = CliRunner()
    res = runner.invoke(main, ["train", str(shard_dirs[0]), "--config", str(cfg_file), "--steps", "3",
                               "--betas", "0.8,0.95", "--lm", "{num_hidden_layers: 1}", "--val-holdout", "2",
                               "--val-every", "1"])
    assert res.exit_code == 0, res.output
    assert "trained 3 steps" in res.output and "loss.png" in res.output
    saved = json.loads((tmp_path / "cli-run" / "train_config.json").read_text())
    assert saved["steps"] == 3 and saved["betas"] == [0.8, 0.95] and saved["lm"] == {"num_hidden_layers": 1}
    assert saved["lr"] == 0.001 and saved["frozen_llm"] is True and saved["data"] == [str(shard_dirs[0])]
    assert any("val_loss" in r for r in metrics(tmp_path / "cli-run"))
    res = runner.invoke(main, ["train", "--out-dir", str(tmp_path / "cli-run"), "--resume", "--steps", "4"])
    assert res.exit_code == 0, res.output
    assert "trained 4 steps" in res.output
    res = runner.invoke(main, ["train", str(shard_dirs[0]), "--out-dir", str(tmp_path / "x"), "--stage", "finetune"])
    assert res.exit_code == 1 and "Error: stage must be one of" in res.output and "Traceback" not in res.output
    res = runner.invoke(main, ["train", str(shard_dirs[0]), "--out-dir", str(tmp_path / "x"), "--device", "cpu"])
    assert res.exit_code == 1 and "Error: no text tokenizer" in res.output


@pytest.mark.cuda
def test_cuda_bf16_steps_follow_fp32_cpu(tmp_path, shard_dirs, sp):
    """On a GPU the default precision is bf16 autocast (features recomputed on the GPU too);
    its first losses stay close to the fp32 CPU run's."""
    kw = dict(steps=3, batch_size=4, gradient_checkpointing=True)
    cpu = train(config(tmp_path / "cpu", shard_dirs[1], sp, **kw), progress=False)
    gpu = train(config(tmp_path / "gpu", shard_dirs[1], sp, device="cuda", **kw), progress=False)
    a, b = [r["loss"] for r in metrics(cpu.out_dir)], [r["loss"] for r in metrics(gpu.out_dir)]
    assert b == pytest.approx(a, rel=2e-2)
    assert LibraForCausalLM.from_pretrained(gpu.final_model).dtype == torch.float32  # fp32 master weights


# ---- several processes ---------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("parallel, stage", [("ddp", "pretrain"), ("fsdp", "pretrain"), ("fsdp", "sft")])
def test_two_processes_equal_one_process(tmp_path, shard_dirs, sp, llava_json, parallel, stage):
    """2 gloo processes give the same steps as 1 process with the same global batch (same
    samples, token-mean loss over both processes); FSDP2 shards the weights and gets the same,
    also when one process draws a text-only sample (sft, 1 sequence per process)."""
    common = ["--steps", "3", "--lr", "3e-3", "--num-workers", "0", "--log-every", "1", "--seed", "0",
              "--device", "cpu",
              "--val-holdout", "2", "--val-every", "3"]
    if stage == "pretrain":
        data = [str(shard_dirs[1]), "--preset", "tiny", "--text-tokenizer", str(sp), "--grad-accum", "1"]
        per_process = 2
    else:
        pre = train(config(tmp_path / "pre", shard_dirs[0], sp, steps=1), progress=False)
        data = ["--stage", "sft", str(llava_json), "--image-shards", str(shard_dirs[1]), "--init-from",
                str(pre.final_model), "--grad-accum", "2"]
        per_process = 1
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            f"--master_port={free_port()}", "-m", "libra_cli.lm", "train", *data, "--out-dir",
                            str(tmp_path / "multi"), "--batch-size", str(per_process), "--parallel", parallel, *common],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stdout + multi.stderr
    assert multi.stdout.count("trained 3 steps") == 1
    one = subprocess.run([sys.executable, "-m", "libra_cli.lm", "train", *data, "--out-dir", str(tmp_path / "one"),
                          "--batch-size", str(2 * per_process), *common],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout + one.stderr
    rows = [metrics(tmp_path / run) for run in ("multi", "one")]
    for key in ("loss", "loss_image", "loss_text", "val_loss"):
        a = [r[key] for r in rows[0] if key in r]
        b = [r[key] for r in rows[1] if key in r]
        assert len(a) == len(b) and a == pytest.approx(b, rel=1e-5), key
        assert a or (stage == "sft" and key == "loss_image")
    a = LibraForCausalLM.from_pretrained(tmp_path / "multi" / "final").state_dict()  # fsdp: sharded files
    b = load_file(tmp_path / "one" / "final" / "model.safetensors")
    # Adam turns rounding noise on near-zero gradients into steps of up to lr (3e-3) on single
    # elements; other samples or an unscaled loss would move almost every weight by ~lr.
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diff.max() < 1e-4 and diff.median() < 1e-7
    if parallel == "ddp":  # one file written by rank 0
        ckpt = torch.load(tmp_path / "multi" / "checkpoints" / "step-00000003.pt", weights_only=True)
        in_optimizer = set(ckpt["optimizer"]["state"])
    else:  # a DCP folder (tests/test_lm_sharding.py)
        from libra_tok.run import sharded_tensor_keys

        keys = sharded_tensor_keys(tmp_path / "multi" / "checkpoints" / "step-00000003")
        in_optimizer = {k.split(".", 2)[2].rsplit(".", 1)[0] for k in keys if k.startswith("optimizer.state.")}
    if stage == "pretrain":
        assert all(torch.equal(a[k], b[k]) for k in a if "vision" not in k)  # frozen
        assert in_optimizer == {k for k in a if "vision" in k}
    else:
        assert in_optimizer == set(a)


# ---- run folders: checkpoints, metrics, the image tokenizer, options -------------------------------------
def test_resume_refuses_a_pickled_payload_and_damaged_files(tmp_path, shard_dirs, sp, caplog):
    from libra_cli.lm import main

    cfg = config(tmp_path, shard_dirs[0], sp, steps=6, save_every=2)
    train(cfg, progress=False, stop_at=4)
    ckpt = Path(cfg.out_dir) / "checkpoints"
    last, good = ckpt / "step-00000004.pt", ckpt / "step-00000002.pt"
    runner = CliRunner()
    # A payload: refused, never run.
    original = last.read_bytes()
    marker = tmp_path / "payload-ran"
    torch.save({"format": "libra-lm-train", "step": 4, "hook": MarkerPayload(marker)}, last)
    error = cli_error(runner.invoke(main, ["train", "--out-dir", cfg.out_dir, "--resume"]))
    assert not marker.exists()
    assert error.startswith(f"Error: {last} is refused: it holds Python objects besides tensors ("), error
    assert error.endswith(f"; {good} is intact: delete {last.name} to resume from it"), error
    # A truncated file: named, with the intact one; then the rest of the story (builders).
    last.write_bytes(original[: len(original) // 2])
    rerun = [str(shard_dirs[0]), "--text-tokenizer", str(sp), "--device", "cpu"]
    check_damaged_checkpoint_flow(main, cfg, train, rerun, caplog)


def test_resume_drops_repeated_and_partial_metric_rows(tmp_path, shard_dirs, sp):
    """A run killed after step 5 (last checkpoint at 4, a half-written metrics line) resumes
    with exactly one row per step, the rows of an uninterrupted run; the plot is drawn."""
    kw = dict(steps=6, save_every=2, val_holdout=2, val_every=2)
    full = train(config(tmp_path / "a", shard_dirs[0], sp, **kw), progress=False)
    cfg = config(tmp_path / "b", shard_dirs[0], sp, **kw)
    train(cfg, progress=False, stop_at=5)
    (Path(cfg.out_dir) / "checkpoints" / "step-00000005.pt").unlink()
    point_latest_at(cfg.out_dir, 4)
    with open(Path(cfg.out_dir) / "metrics.jsonl", "a") as fh:
        fh.write('{"loss": 5.25, "loss_image": 6.')  # killed mid-write
    result = train(cfg, resume=True, progress=False)
    rows = metrics(cfg.out_dir)  # every line is whole
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(rows) == strip(metrics(full.out_dir))
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5, 6]
    assert result.plot.is_file()


def other_tokenizer_shards(tmp_path, image_folder):
    """The captioned images encoded by another tiny tokenizer (other random weights)."""
    from libra_tok import ImageTokenizer
    from libra_tok.pipeline import encode_to_shards, load_tokenizer

    torch.manual_seed(123)
    ImageTokenizer("tiny").save_pretrained(tmp_path / "other-tokenizer")
    tok = load_tokenizer(tmp_path / "other-tokenizer", device="cpu")
    encode_to_shards([image_folder], tmp_path / "other-shards", tok, batch_size=5, shard_size=10, num_workers=0,
                     progress=False, tokenizer_source=str(tmp_path / "other-tokenizer"))
    return tmp_path / "other-shards"


def test_the_image_tokenizer_of_the_shards_is_recorded_and_checked(tmp_path, shard_dirs, sp, image_folder):
    from libra_lm.checkpoint import recorded_image_tokenizer

    pre = train(config(tmp_path / "pre", shard_dirs[0], sp, steps=1), progress=False)
    recorded = recorded_image_tokenizer(pre.final_model)
    assert recorded == ShardImages([shard_dirs[0]]).tokenizer
    assert {"config", "architecture_hash", "weights_sha256", "source"} <= set(recorded)
    other = other_tokenizer_shards(tmp_path, image_folder)
    identity = ShardImages([other]).tokenizer
    sft = dict(stage="sft", init_from=str(pre.final_model), steps=1, batch_size=2, grad_accum=1, num_workers=0,
               gradient_checkpointing=False, device="cpu")
    llava = tmp_path / "llava.json"
    llava.write_text(json.dumps([{"image": "imgs/chelsea.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat is it?"}, {"from": "gpt", "value": "a cat"}]}]))
    expected = (f"the shards in {other} were encoded by another image tokenizer "
                f"({tmp_path / 'other-tokenizer'}, weights {identity['weights_sha256'][:12]}) "
                f"than the one {pre.final_model} was trained with "
                f"({recorded['source'] or 'source not recorded'}, weights {recorded['weights_sha256'][:12]})")
    runs = [TrainConfig(data=[str(llava)], image_shards=[str(other)], out_dir=str(tmp_path / "sft"), **sft),
            TrainConfig(data=[str(other)], init_from=str(pre.final_model), out_dir=str(tmp_path / "more"), steps=1,
                        batch_size=2, grad_accum=1, num_workers=0, device="cpu"),
            TrainConfig(data=[str(shard_dirs[0])], val_data=[str(other)], init_from=str(pre.final_model),
                        out_dir=str(tmp_path / "val"), steps=1, batch_size=2, grad_accum=1, num_workers=0,
                        device="cpu")]
    for cfg in runs[:2]:
        with pytest.raises(ValueError) as err:
            Trainer(cfg, progress=False)
        assert str(err.value).startswith(expected), str(err.value)
        assert str(err.value).endswith("re-encode the images with that tokenizer or start from a model trained on "
                                       "these shards"), str(err.value)
    with pytest.raises(ValueError, match="encoded by another image tokenizer"):
        Trainer(runs[2], progress=False)
    # A text-only SFT run keeps the record of its starting point.
    text_only = tmp_path / "text.json"
    text_only.write_text(json.dumps([{"conversations": [{"from": "human", "value": "Say hello."},
                                                         {"from": "gpt", "value": "hello"}]}] * 3))
    result = train(TrainConfig(data=[str(text_only)], out_dir=str(tmp_path / "text"), **sft), progress=False)
    assert recorded_image_tokenizer(result.final_model) == recorded
    # A folder without a record (older, official or HF LLaMA) accepts any shards, and then records theirs.
    LibraForCausalLM.from_pretrained(pre.final_model).save_pretrained(tmp_path / "plain")
    shutil.copy(sp, tmp_path / "plain" / "tokenizer.model")
    sft["init_from"] = str(tmp_path / "plain")
    result = train(TrainConfig(data=[str(llava)], image_shards=[str(other)], out_dir=str(tmp_path / "sft2"), **sft),
                   progress=False)
    assert recorded_image_tokenizer(result.final_model) == identity


def test_trust_pickle_reaches_the_loader_and_is_not_saved(tmp_path, shard_dirs, sp):
    """A pytorch_model.bin with a Python object loads only with --trust-pickle, and a resumed run
    does not inherit the permission from the saved options."""
    pytest.importorskip("transformers")
    from libra_cli.lm import main

    assert TrainConfig().trust_pickle is False
    llama = hf_llama(seed=4)
    folder = tmp_path / "llama"
    folder.mkdir()
    llama.config.save_pretrained(folder)
    torch.save({**llama.state_dict(), "extra": Opaque()}, folder / "pytorch_model.bin")
    shutil.copy(sp, folder / "tokenizer.model")
    out = tmp_path / "run"
    args = ["train", str(shard_dirs[0]), "--init-from", str(folder), "--out-dir", str(out), "--steps", "2",
            "--save-every", "1", "--batch-size", "2", "--grad-accum", "1", "--num-workers", "0", "--device", "cpu",
            "--no-gradient-checkpointing"]
    runner = CliRunner()
    error = cli_error(runner.invoke(main, args))
    assert str(folder / "pytorch_model.bin") in error
    res = runner.invoke(main, args + ["--trust-pickle", "--steps", "1"])
    assert res.exit_code == 0, res.output
    assert json.loads((out / "train_config.json").read_text()).get("trust_pickle", False) is False
    # Resuming rebuilds the frozen weights from the folder: the permission must be given again.
    error = cli_error(runner.invoke(main, ["train", "--out-dir", str(out), "--resume", "--steps", "2"]))
    assert str(folder / "pytorch_model.bin") in error
    res = runner.invoke(main, ["train", "--out-dir", str(out), "--resume", "--steps", "2", "--trust-pickle"])
    assert res.exit_code == 0, res.output
    assert "trained 2 steps" in res.output
