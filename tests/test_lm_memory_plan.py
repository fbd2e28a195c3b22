"""The start-up memory plan: parameter counts of the real model, the state each parallel mode
keeps, an activation estimate of the right size, and a run refused with the options that fit."""

import re

import pytest
import torch
from click.testing import CliRunner

from builders import TINY, mixed_batch
from libra_cli.lm import main as lm_cli
from libra_lm import LibraForCausalLM
from libra_lm.config import LibraConfig
from libra_lm.memory_plan import GIB, DoesNotFit, check_fits, parameter_counts, plan
from libra_lm.train import TrainConfig, Trainer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("frozen_llm", [True, False])
def test_parameter_counts_are_those_of_the_built_model(frozen_llm):
    torch.manual_seed(0)
    model = LibraForCausalLM(TINY)
    model.frozen_llm = frozen_llm
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in model.parameters() if not p.requires_grad)
    layer = sum(p.numel() for p in model.model.layers[0].parameters())
    assert parameter_counts(TINY, frozen_llm) == (trainable, frozen, layer)
    assert frozen > 0 if frozen_llm else frozen == 0


def test_each_mode_keeps_the_state_it_should():
    counts = (1000, 3000, 200)  # trainable, frozen, largest layer
    common = dict(frozen_llm=True, precision="bf16", batch_size=1, seq_len=1, checkpointing=True, counts=counts)
    one = plan(TINY, parallel="none", world=1, **common)
    # One process: fp32 weights, fp32 gradients of what trains, AdamW's two fp32 moments.
    assert (one.parameters, one.gradients, one.optimizer) == (4 * 4000, 4 * 1000, 8 * 1000)
    ddp = plan(TINY, parallel="ddp", world=4, **common)
    assert (ddp.parameters, ddp.optimizer) == (one.parameters, one.optimizer)  # a full copy per process
    assert ddp.gradients == 2 * one.gradients  # plus the communication buckets
    fsdp = plan(TINY, parallel="fsdp", world=4, **common)
    # Shards of fp32 masters and bf16 frozen weights, plus two bf16 layers gathered at a time.
    assert fsdp.parameters == (4 * 1000 + 2 * 3000) // 4 + 2 * 2 * 200
    assert (fsdp.gradients, fsdp.optimizer) == (4 * 1000 // 4, 8 * 1000 // 4)
    assert fsdp.activations == one.activations  # the batch each process runs is the same


def _saved_tensor_bytes(model, ids, feats) -> int:
    """Bytes the autograd graph keeps from a training forward (each storage once), weights
    (which matmuls save by reference) left out."""
    seen = {p.untyped_storage().data_ptr() for p in model.parameters()}
    total = 0

    def pack(t):
        nonlocal total
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        labels = ids.clone()
        labels[labels[..., 0] == model.config.boi_token_id] = -100  # official masking: BOI, and the
        after_eoi = torch.zeros_like(labels[..., 0], dtype=torch.bool)  # first text token after EOI
        after_eoi[:, 1:] = ids[:, :-1, 0] == model.config.eoi_token_id
        labels[after_eoi] = -100
        out = model(ids, feats, labels=labels)
    out.loss.backward()
    return total


@pytest.mark.parametrize("checkpointing", [False, True])
def test_activation_estimate_is_the_size_the_graph_keeps(checkpointing):
    # A model whose layers, not its logits, hold most activations, as at the real size.
    config = LibraConfig.from_preset("tiny", hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                     text_vocab_size=256)
    torch.manual_seed(0)
    model = LibraForCausalLM(config).train()
    model.gradient_checkpointing = checkpointing
    ids, feats = mixed_batch(config, [[("t", 40), ("i", 64), ("t", 40)]] * 2)
    tokens = ids.shape[0] * ids.shape[1]
    measured = _saved_tensor_bytes(model, ids, feats)
    p = plan(config, frozen_llm=False, parallel="none", world=1, precision="fp32", batch_size=1, seq_len=tokens,
             checkpointing=checkpointing)
    if not checkpointing:
        assert 0.5 < p.activations / measured < 2.0, (p.activations, measured)
    else:
        # What the forward keeps: layer inputs and logits; the estimate adds the working set of
        # the one layer recomputed at a time in the backward, which these hooks do not see.
        assert 1.0 < p.activations / measured < 3.0, (p.activations, measured)


def test_the_11b_model_fits_8_gpus_with_fsdp_but_not_ddp():
    config = LibraConfig.from_preset("libra-7b")
    fsdp = plan(config, frozen_llm=False, parallel="fsdp", world=8, precision="bf16", batch_size=2, seq_len=2048,
                checkpointing=True)
    check_fits(fsdp, config, 80 * GIB)
    ddp = plan(config, frozen_llm=False, parallel="ddp", world=8, precision="bf16", batch_size=2, seq_len=2048,
               checkpointing=True)
    with pytest.raises(DoesNotFit) as err:
        check_fits(ddp, config, 80 * GIB, "cuda:0")
    message = str(err.value)
    assert message.startswith(f"this run needs about {ddp.total / GIB:.1f} GiB per process")
    assert "but cuda:0 has 80.0 GiB (90 % usable); options that would fit: --parallel fsdp" in message


def test_memory_plan_command_prints_the_plan_and_refuses_what_cannot_fit():
    runner = CliRunner()
    ok = runner.invoke(lm_cli, ["memory-plan", "--stage", "sft", "--processes", "8"])
    assert ok.exit_code == 0, ok.output
    assert "memory plan per process: fsdp x 8, bf16, 2 x 2048 tokens, checkpointing on" in ok.output
    total = float(re.search(r"total\s+([\d.]+) GiB", ok.output).group(1))
    assert ok.output.strip().endswith(f"fits: {total:.1f} of 72.0 GiB usable (90 % of 80)")
    bad = runner.invoke(lm_cli, ["memory-plan", "--stage", "sft", "--parallel", "ddp", "--processes", "8"])
    assert bad.exit_code == 1
    assert "options that would fit: --parallel fsdp" in bad.output
    usage = runner.invoke(lm_cli, ["memory-plan", "--parallel", "none", "--processes", "2"])
    assert usage.exit_code == 2 and "--parallel none runs one process" in usage.output


def test_a_run_that_cannot_fit_stops_before_loading_weights(tmp_path, shard_dirs, sp):
    cfg = TrainConfig(stage="pretrain", data=[str(shard_dirs[0])], preset="tiny", text_tokenizer=str(sp),
                      out_dir=str(tmp_path / "run"), steps=2, batch_size=2, num_workers=0, device="cpu",
                      device_memory_gb=1e-4)
    with pytest.raises(DoesNotFit, match=r"this run needs about .* GiB per process .* but cpu has 0\.0 GiB"):
        Trainer(cfg, progress=False)
    assert not list((tmp_path / "run").glob("checkpoints/*"))
