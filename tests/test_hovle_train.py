"""HoVLE's three stages on the LM trainer: stage 1 lowers the distillation loss and trains the
module only, stage 2 keeps the LLM bit-identical, stage 3 trains everything, resume is exact,
the teacher is the Libra model's input projection when one is given."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from builders import CAPTIONS
from libra_lm.hovle import HoVLEForCausalLM
from libra_lm.hovle.stages import HOVLE_STAGE_DEFAULTS
from libra_lm.hovle.trainer import train
from libra_lm.train import TrainConfig
from libra_lm.train import train as train_libra

pytestmark = pytest.mark.usefixtures("one_thread")


def config(tmp_path, data, sp, name="run", **kw):
    base = dict(arch="hovle", stage="distill", data=[str(d) for d in data], preset="tiny", text_tokenizer=str(sp),
                out_dir=str(tmp_path / name), steps=6, batch_size=4, grad_accum=1, lr=3e-3, num_workers=0,
                log_every=1, save_every=100, val_every=100, gradient_checkpointing=False, seed=0, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def losses(result, key="loss"):
    return [row[key] for row in result.history if key in row]


def weights(folder) -> dict[str, torch.Tensor]:
    return load_file(str(Path(folder) / "model.safetensors"))


@pytest.fixture(scope="module")
def llava_json(tmp_path_factory):
    records = [{"id": name, "image": f"imgs/{name}", "conversations": [
        {"from": "human", "value": "<image>\nWhat is in the image?"}, {"from": "gpt", "value": caption.lower()}]}
        for name, caption in list(CAPTIONS.items())[:5]]
    path = tmp_path_factory.mktemp("llava") / "llava.json"
    path.write_text(json.dumps(records))
    return path


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, shard_dirs, sp):
    """A stage-1 run from a fresh tiny HoVLE (seed 0)."""
    tmp = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    result = train(config(tmp, [shard_dirs[0]], sp, steps=8), progress=False)
    return result


def test_stage_options_and_defaults():
    cfg = TrainConfig(arch="hovle", stage="distill")
    assert cfg.frozen_llm is True and cfg.lr == HOVLE_STAGE_DEFAULTS["distill"]["lr"]
    assert TrainConfig(arch="hovle", stage="align").frozen_llm is True
    assert TrainConfig(arch="hovle", stage="sft").frozen_llm is False
    with pytest.raises(ValueError, match=r"stage must be one of \('distill', 'align', 'sft'\) for arch hovle"):
        TrainConfig(arch="hovle", stage="pretrain")
    with pytest.raises(ValueError, match="arch must be one of"):
        TrainConfig(arch="llava")


def test_distillation_loss_falls_and_only_the_module_trains(distilled, shard_dirs):
    values = losses(distilled)
    assert len(values) == 8 and values[-1] < 0.8 * values[0]
    assert losses(distilled, "loss_image") and losses(distilled, "loss_text")
    saved = json.loads((distilled.out_dir / "train_config.json").read_text())
    assert saved["teacher"] == "linear"  # no Libra model given: a trainable linear map, recorded
    # The fresh model of the same seed: the LLM is bit-identical after training, the module moved.
    torch.manual_seed(0)
    start = HoVLEForCausalLM("hovle-tiny").state_dict()
    after = weights(distilled.final_model)
    llm = [k for k in start if k.startswith("language_model.")]
    module = [k for k in start if k.startswith("embedding_model.")]
    assert llm and all(torch.equal(start[k], after[k]) for k in llm)
    assert all(not torch.equal(start[k], after[k]) for k in module if "embed_tokens" not in k and "boundaries" not in k)


def test_alignment_keeps_the_llm_bit_identical(tmp_path, distilled, shard_dirs, sp):
    result = train(config(tmp_path, [shard_dirs[1]], sp, stage="align", init_from=str(distilled.final_model),
                          steps=8), progress=False)
    values = losses(result)
    assert values[-1] < values[0]
    before, after = weights(distilled.final_model), weights(result.final_model)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("language_model."))
    changed = [k for k in before if k.startswith("embedding_model.") and not torch.equal(before[k], after[k])]
    assert "embedding_model.patch_embed.proj.weight" in changed
    assert "embedding_model.layers.0.mlp.up_proj.weight" in changed
    # The folder runs: loads as HoVLE and names the shards' image tokenizer.
    model = HoVLEForCausalLM.from_pretrained(result.final_model)
    assert model.config.num_embedding_layers == 1
    meta = json.loads((result.final_model / "config.json").read_text())
    assert meta["format"] == "libra-hovle" and meta["image_tokenizer"]["weights_sha256"]


def test_instruction_tuning_trains_everything(tmp_path, distilled, shard_dirs, sp, llava_json):
    result = train(config(tmp_path, [llava_json], sp, stage="sft", image_shards=[str(shard_dirs[1])],
                          init_from=str(distilled.final_model), steps=3, lr=1e-3), progress=False)
    before, after = weights(distilled.final_model), weights(result.final_model)
    for prefix in ("language_model.model.layers.0.", "embedding_model.layers.0.", "language_model.lm_head"):
        assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix)), prefix


def test_resume_is_exact(tmp_path, shard_dirs, sp):
    whole = train(config(tmp_path, [shard_dirs[0]], sp, name="whole", steps=4, save_every=2), progress=False)
    cfg = config(tmp_path, [shard_dirs[0]], sp, name="split", steps=4, save_every=2)
    train(cfg, progress=False, stop_at=2)
    resumed = train(cfg, resume=True, progress=False)
    assert losses(resumed) == losses(whole)[2:]
    a, b = weights(whole.final_model), weights(resumed.final_model)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_the_teacher_is_the_libra_input_projection(tmp_path, shard_dirs, sp):
    """Distilling on a Libra folder: the LLM is its LLaMA (the same text weights), the teacher its
    trained hybrid-input projection, frozen (and recorded)."""
    libra = train_libra(TrainConfig(stage="pretrain", data=[str(shard_dirs[0])], preset="tiny", text_tokenizer=str(sp),
                                    out_dir=str(tmp_path / "libra"), steps=2, batch_size=4, grad_accum=1, lr=3e-3,
                                    num_workers=0, save_every=100, gradient_checkpointing=False, device="cpu"),
                        progress=False)
    result = train(config(tmp_path, [shard_dirs[0]], sp, init_from=str(libra.final_model), steps=2), progress=False)
    saved = json.loads((result.out_dir / "train_config.json").read_text())
    assert saved["teacher"] == str(libra.final_model)
    lib, hov = weights(libra.final_model), weights(result.final_model)
    layer = "model.layers.1.mlp.down_proj.weight"
    assert torch.equal(hov[f"language_model.{layer}"], lib[layer])
    assert torch.equal(hov["language_model.lm_head.weight"], lib["lm_head.weight"])
    with pytest.raises(ValueError, match="has no hybrid-input projection"):
        from libra_lm.hovle.checkpoint import load_libra_teacher

        hf = tmp_path / "hf"
        from builders import hf_llama

        hf_llama().save_pretrained(hf)
        load_libra_teacher(hf, 64)


def test_distillation_needs_stored_features(tmp_path, shard_dirs, sp):
    with pytest.raises(ValueError, match="libra-tok encode --save-features"):
        train(config(tmp_path, [shard_dirs[1]], sp), progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_equal_one_process(tmp_path, shard_dirs, sp, parallel):
    """Stage 2 on 2 gloo processes (DDP, or FSDP2 sharding both stacks' layers) gives the steps
    of one process with the same global batch, and the same trained module."""
    import os
    import subprocess
    import sys

    from builders import ROOT, free_port

    common = ["--arch", "hovle", "--stage", "align", str(shard_dirs[1]), "--preset", "tiny", "--text-tokenizer",
              str(sp), "--steps", "3", "--lr", "3e-3", "--num-workers", "0", "--log-every", "1", "--seed", "0",
              "--device", "cpu", "--grad-accum", "1", "--val-holdout", "2", "--val-every", "3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    multi = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                            f"--master_port={free_port()}", "-m", "libra_cli.lm", "train", *common, "--out-dir",
                            str(tmp_path / "multi"), "--batch-size", "2", "--parallel", parallel],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert multi.returncode == 0, multi.stdout + multi.stderr
    one = subprocess.run([sys.executable, "-m", "libra_cli.lm", "train", *common, "--out-dir", str(tmp_path / "one"),
                          "--batch-size", "4"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert one.returncode == 0, one.stdout + one.stderr
    rows = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
            for run in ("multi", "one")]
    for key in ("loss", "val_loss"):
        a, b = ([r[key] for r in run if key in r] for run in rows)
        assert a and len(a) == len(b) and a == pytest.approx(b, rel=1e-5), key
    a, b = weights(tmp_path / "multi" / "final"), weights(tmp_path / "one" / "final")
    assert a.keys() == b.keys()
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in a])
    assert diff.max() < 1e-4 and diff.median() < 1e-7  # Adam: rounding noise on near-zero gradients
    assert all(torch.equal(a[k], b[k]) for k in a if k.startswith("language_model."))  # frozen in stage 2
