"""Training at scale: the model built on the meta device and loaded shard by shard equals the
one a single process loads; 2 gloo processes under FSDP2 equal one process; DCP checkpoints
resume exactly, on fewer processes, and survive a kill while saving; export gives the trained
weights; frozen weights are bf16 and out of the optimizer; each process holds half the model."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner
from safetensors.torch import load_file

from builders import ROOT, TINY, free_port, hf_llama
from libra_lm import LibraConfig, LibraForCausalLM
from libra_lm.checkpoint import WeightSlices, open_folder
from libra_lm.sharding import build_sharded, initial_tensors
from libra_lm.train import TrainConfig, train

pytestmark = pytest.mark.usefixtures("one_thread")
CPU = torch.device("cpu")


def metrics(run):
    return [json.loads(line) for line in (Path(run) / "metrics.jsonl").read_text().splitlines()]


def train_options(shards, sp, init_from, **kw):
    return dict(stage="pretrain", data=[str(shards)], init_from=str(init_from), text_tokenizer=str(sp), steps=4,
                batch_size=2, grad_accum=1, lr=3e-3, num_workers=0, log_every=1, save_every=2, val_every=100,
                gradient_checkpointing=False, seed=0, device="cpu", **kw)


@pytest.fixture(scope="module")
def llama_shards(tmp_path_factory):
    """An HF LLaMA folder in 7 safetensors shards (image sizes given to the LM as overrides)."""
    pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("llama") / "llama"
    hf_llama(seed=4).save_pretrained(folder, max_shard_size="100KB")
    assert len(list(folder.glob("model-*.safetensors"))) > 2
    return folder


# ---- building on the meta device ----------------------------------------------------------------------
def test_a_fresh_preset_is_drawn_exactly_as_one_process_draws_it():
    torch.manual_seed(3)
    ref = LibraForCausalLM(TINY)
    after_ref = torch.get_rng_state()
    model = build_sharded(TINY, "preset", None, seed=3, frozen_llm=True, mesh=None, param_dtype=torch.float32,
                          device=CPU)
    assert torch.equal(after_ref, torch.get_rng_state())  # every draw replayed, none added
    a, b = ref.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_hf_llama_shards_load_as_from_pretrained_with_frozen_weights_in_bf16(llama_shards):
    sizes = dict(contiguous_signal_size=192, num_image_tokens=64)
    torch.manual_seed(5)
    ref = LibraForCausalLM.from_pretrained(llama_shards, **sizes)
    config, source = open_folder(llama_shards, **sizes)
    model = build_sharded(config, source.kind, source, seed=5, frozen_llm=True, mesh=None,
                          param_dtype=torch.bfloat16, device=CPU)
    for name, p in model.named_parameters():
        assert p.dtype == (torch.float32 if p.requires_grad else torch.bfloat16), name
        assert torch.equal(ref.state_dict()[name].to(p.dtype), p.detach()), name
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {n for n, _ in model.named_parameters()
                                                                           if "vision" in n}


def test_rows_are_read_from_safetensors_slices_and_mapped_torch_files(tmp_path):
    """A row range read from a safetensors shard or a zip-format .bin equals the full tensor's
    rows; the .bin is memory-mapped (the file is in this process's memory map), not read."""
    torch.manual_seed(0)
    state = LibraForCausalLM(TINY).state_dict()
    (tmp_path / "st").mkdir()
    LibraForCausalLM(TINY).save_pretrained(tmp_path / "st")
    shutil.copytree(tmp_path / "st", tmp_path / "bin")
    state = load_file(tmp_path / "st" / "model.safetensors")
    (tmp_path / "bin" / "model.safetensors").unlink()
    torch.save(state, tmp_path / "bin" / "pytorch_model.bin")
    key = "model.embed_tokens.weight"
    for folder in ("st", "bin"):
        source = WeightSlices(tmp_path / folder, "ours")
        assert torch.equal(source.read(key, 5, 9), state[key][5:9])
        assert torch.equal(source.read(key), state[key])
    maps = Path("/proc/self/maps").read_text()
    assert str(tmp_path / "bin" / "pytorch_model.bin") in maps
    source.close()


def test_initial_tensors_refuse_a_folder_that_does_not_fit(llama_shards):
    config, source = open_folder(llama_shards, contiguous_signal_size=192, num_image_tokens=64)
    with pytest.raises(ValueError, match="do not fit an HF LLaMA model with hidden_size 128"):
        next(initial_tensors(config.replace(hidden_size=128, num_attention_heads=4), source.kind, source))


# ---- two processes ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_processes(tmp_path_factory, shard_dirs, sp, llama_shards):
    """One launch of tests/sharded_driver.py on 2 gloo processes (see its docstring)."""
    out = tmp_path_factory.mktemp("sharded")
    big = LibraConfig.from_preset("tiny", hidden_size=256, intermediate_size=688, text_vocab_size=8000,
                                  num_hidden_layers=3)
    torch.manual_seed(0)
    LibraForCausalLM(big).save_pretrained(out / "big-single")
    _shard_folder(out / "big-single", out / "big", max_bytes=3 * 2**20)
    options = train_options(shard_dirs[0], sp, llama_shards)  # image sizes from the shards
    spec = out / "spec.json"
    spec.write_text(json.dumps({"out": str(out), "big_model": str(out / "big"), "train": options}))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                          f"--master_port={free_port()}", str(ROOT / "tests" / "sharded_driver.py"), str(spec)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-6000:]
    return out, options


def _shard_folder(single: Path, out: Path, max_bytes: int) -> None:
    """Our folder with its weights split into shards with an index (as export writes)."""
    from safetensors.torch import save_file

    out.mkdir()
    shutil.copy(single / "config.json", out / "config.json")
    state = load_file(single / "model.safetensors")
    shards, current, size = [], {}, 0
    for key, tensor in state.items():
        if current and size + tensor.numel() * 4 > max_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = tensor
        size += tensor.numel() * 4
    shards.append(current)
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / name)
        weight_map.update({k: name for k in shard})
    (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


@pytest.mark.slow
def test_each_process_holds_half_of_a_sharded_folder(two_processes):
    out, _ = two_processes
    total = sum(t.numel() * 4 for t in load_file(out / "big-single" / "model.safetensors").values())
    largest = max(t.numel() * 4 for t in load_file(out / "big-single" / "model.safetensors").values())
    for rank in (0, 1):
        m = json.loads((out / f"memory-{rank}.json").read_text())
        assert abs(m["local"] - total / 2) < 0.02 * total  # its shards: half of every tensor's rows
        # Its half, plus at most one tensor read at a time and a bounded overhead; never all of it.
        assert m["local"] * 0.9 < m["peak"] < m["local"] + largest + 24 * 2**20, (m, total)
        assert m["peak"] < 0.8 * total


@pytest.mark.slow
def test_fsdp_from_hf_llama_shards_equals_one_process(two_processes, tmp_path):
    """2 processes x 2 sequences under FSDP2 (meta-device build, each reading its slices) and
    1 process x 4 sequences loading the folder with from_pretrained: the same steps."""
    out, options = two_processes
    one = train(TrainConfig(**{**options, "batch_size": 4}, out_dir=str(tmp_path / "one")), progress=False)
    rows = metrics(out / "full"), metrics(one.out_dir)
    for key in ("loss", "loss_image", "loss_text", "grad_norm"):
        assert [r[key] for r in rows[0]] == pytest.approx([r[key] for r in rows[1]], rel=1e-5), key
    a = LibraForCausalLM.from_pretrained(out / "full" / "final").state_dict()
    b = load_file(one.final_model / "model.safetensors")
    diff = torch.cat([(a[k] - b[k]).abs().flatten() for k in b])
    assert diff.max() < 1e-4 and diff.median() < 1e-7
    assert all(torch.equal(a[k], b[k]) for k in b if "vision" not in k)  # frozen: exactly the LLaMA's


@pytest.mark.slow
def test_dcp_checkpoints_resume_exactly_and_export_the_trained_weights(two_processes, tmp_path):
    out, _ = two_processes
    ckpt = out / "full" / "checkpoints"
    assert json.loads((ckpt / "latest.json").read_text())["file"] == "step-00000004"
    files = sorted(p.name for p in (ckpt / "step-00000004").iterdir())
    assert files == [".metadata", "__0_0.distcp", "__1_0.distcp", "meta.json", "rng-0.pt", "rng-1.pt"]
    # Stopped at step 2 and resumed on the same 2 processes: bitwise the uninterrupted run.
    full = LibraForCausalLM.from_pretrained(out / "full" / "final").state_dict()
    part = LibraForCausalLM.from_pretrained(out / "part" / "final").state_dict()
    assert all(torch.equal(full[k], part[k]) for k in full)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "tokens_per_s"} for r in rows]  # noqa: E731
    assert strip(metrics(out / "full")) == strip(metrics(out / "part"))
    # The exported folder holds exactly the trained tensors of the checkpoint.
    trained = {k: v for k, v in full.items() if "vision" in k}
    stored = {f"model.{k}": torch.empty_like(v) for k, v in trained.items()}
    dcp.load(stored, checkpoint_id=str(ckpt / "step-00000004"), no_dist=True)
    assert all(torch.equal(stored[f"model.{k}"], v) for k, v in trained.items())
    # `libra-lm export` with small shards gives the same weights, in several files with an index.
    from libra_cli.lm import main

    res = CliRunner().invoke(main, ["export", str(out / "full"), str(tmp_path / "exported"), "--max-shard-size",
                                    "0.0002"])
    assert res.exit_code == 0, res.output
    index = json.loads((tmp_path / "exported" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 3 and (tmp_path / "exported" / "tokenizer.model").is_file()
    exported = LibraForCausalLM.from_pretrained(tmp_path / "exported").state_dict()
    assert all(torch.equal(full[k], exported[k]) for k in full)
    res = CliRunner().invoke(main, ["export", str(out / "full"), str(tmp_path / "exported")])
    assert res.exit_code == 1 and "already exists" in res.output


@pytest.mark.slow
def test_a_run_of_two_processes_resumes_on_one(two_processes, tmp_path):
    """The step-2 checkpoint of 2 processes x 2 sequences, resumed by 1 process x 4: the same
    samples per step, so the steps of the uninterrupted 2-process run (to rounding)."""
    out, options = two_processes
    run = tmp_path / "resumed"
    shutil.copytree(out / "part-at-2", run)
    resumed = train(TrainConfig(**{**options, "parallel": "fsdp", "batch_size": 4}, out_dir=str(run)), resume=True,
                    progress=False)
    assert resumed.step == 4
    a, b = metrics(out / "full"), metrics(run)
    assert [r["loss"] for r in a] == pytest.approx([r["loss"] for r in b], rel=1e-5)
    full = LibraForCausalLM.from_pretrained(out / "full" / "final").state_dict()
    mine = LibraForCausalLM.from_pretrained(resumed.final_model).state_dict()
    assert max(float((full[k] - mine[k]).abs().max()) for k in full) < 1e-4


@pytest.mark.slow
def test_frozen_parameters_are_bf16_and_out_of_the_optimizer(two_processes):
    out, _ = two_processes
    for rank in (0, 1):
        params = json.loads((out / f"bf16-{rank}.json").read_text())
        for name, p in params.items():
            if "vision" in name:  # the official trainable set of pretraining
                assert (p["dtype"], p["trains"], p["in_optimizer"]) == ("torch.float32", True, True), name
                assert p["optimizer_state"] == ["exp_avg", "exp_avg_sq", "step"], name
            else:
                assert (p["dtype"], p["trains"], p["in_optimizer"], p["optimizer_state"]) == \
                    ("torch.bfloat16", False, False, []), name


# ---- a kill while saving --------------------------------------------------------------------------------
KILLER = """
import os, sys, json
import torch.distributed.checkpoint as dcp
from libra_lm.train import TrainConfig, train

save = dcp.save
def save_then_die(state, checkpoint_id):
    save(state, checkpoint_id=checkpoint_id)
    if "step-00000004" in str(checkpoint_id):
        os._exit(9)  # killed after the shards were written, before the checkpoint was complete
dcp.save = save_then_die
train(TrainConfig(**json.loads(sys.argv[1])), progress=False)
"""


def test_a_kill_while_saving_leaves_the_previous_checkpoint_latest(tmp_path, shard_dirs, sp):
    options = dict(stage="pretrain", data=[str(shard_dirs[0])], preset="tiny", text_tokenizer=str(sp), steps=6,
                   batch_size=3, grad_accum=1, lr=3e-3, num_workers=0, log_every=1, save_every=2, val_every=100,
                   gradient_checkpointing=False, seed=0, device="cpu", parallel="fsdp")
    killed = subprocess.run([sys.executable, "-c", KILLER, json.dumps({**options, "out_dir": str(tmp_path / "k")})],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    assert killed.returncode == 9, killed.stderr[-3000:]
    ckpt = tmp_path / "k" / "checkpoints"
    assert json.loads((ckpt / "latest.json").read_text())["file"] == "step-00000002"
    assert (ckpt / "step-00000004.partial").is_dir() and not (ckpt / "step-00000004").exists()
    resumed = train(TrainConfig(**options, out_dir=str(tmp_path / "k")), resume=True, progress=False)
    assert not (ckpt / "step-00000004.partial").exists()  # removed by the next save
    full = train(TrainConfig(**options, out_dir=str(tmp_path / "full")), progress=False)
    a = LibraForCausalLM.from_pretrained(resumed.final_model).state_dict()
    b = LibraForCausalLM.from_pretrained(full.final_model).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
