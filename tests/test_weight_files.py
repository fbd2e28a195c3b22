"""Reading weight files by their content (libra_tok.weight_files). Files that are not weights,
damaged files and the pickle policy are also exercised through load_official in
tests/test_checkpoint.py."""

import pickle

import pytest
import torch

from libra_tok.weight_files import CheckpointError, describe_file, read_state_dict, weights_in_folder


def test_formats_are_recognised_whatever_the_name(tiny_tok, tmp_path):
    from safetensors.torch import save_file

    state = {k: v.contiguous() for k, v in tiny_tok.state_dict().items()}
    save_file(state, tmp_path / "weights.bin")
    loaded = read_state_dict(tmp_path / "weights.bin")
    assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state)
    torch.save(state, tmp_path / "pickled.safetensors")
    with pytest.raises(CheckpointError, match=r"pickled.safetensors: it looks like a torch checkpoint \(zip archive\), "
                                              r"not a safetensors file"):
        read_state_dict(tmp_path / "pickled.safetensors")


def test_state_dicts_are_unwrapped(tmp_path):
    weights = {"a.weight": torch.ones(2), "b.bias": torch.zeros(1)}
    torch.save({"state_dict": {"module." + k: v for k, v in weights.items()}, "epoch": 3}, tmp_path / "ddp.ckpt")
    assert read_state_dict(tmp_path / "ddp.ckpt").keys() == weights.keys()  # `state_dict`, then DDP's `module.`
    torch.save({"model": weights}, tmp_path / "model.pt")
    assert read_state_dict(tmp_path / "model.pt").keys() == weights.keys()
    torch.save({"state_dict": {"step": 3}}, tmp_path / "no_tensors.pt")
    with pytest.raises(CheckpointError, match="holds a dict without tensors"):
        read_state_dict(tmp_path / "no_tensors.pt")
    with pytest.raises(FileNotFoundError, match="weights file .*missing.pt does not exist"):
        read_state_dict(tmp_path / "missing.pt")


def test_describe_file(tmp_path):
    (tmp_path / "a.txt").write_text("hello\nworld")
    (tmp_path / "b.pkl").write_bytes(pickle.dumps([1, 2]))
    torch.save({"x": torch.ones(1)}, tmp_path / "c.pt")
    assert describe_file(tmp_path / "a.txt") == "text ('hello')"
    assert describe_file(tmp_path / "b.pkl") == "a Python pickle that torch.save did not write"
    assert describe_file(tmp_path / "c.pt") == "a torch checkpoint (zip archive)"


def test_weights_in_folder(tmp_path):
    assert weights_in_folder(tmp_path) is None
    (tmp_path / "open_clip_pytorch_model.bin").write_bytes(b"x")
    assert weights_in_folder(tmp_path).name == "open_clip_pytorch_model.bin"
    (tmp_path / "model.safetensors").write_bytes(b"x")
    assert weights_in_folder(tmp_path).name == "model.safetensors"  # HF's name first
