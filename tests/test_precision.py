"""Precision names and their autocast (libra_tok.precision)."""

import pytest
import torch

from libra_tok.precision import PRECISIONS, autocast_for, resolve_precision


def test_resolve_precision():
    assert resolve_precision(torch.device("cpu"), "auto") == "fp32"
    assert resolve_precision(torch.device("cuda"), "auto") == "bf16"
    assert [resolve_precision(torch.device("cpu"), p) for p in PRECISIONS[1:]] == ["fp32", "bf16", "fp16"]
    with pytest.raises(ValueError, match="precision must be one of"):
        resolve_precision(torch.device("cpu"), "fp8")


def test_autocast_for():
    x = torch.randn(4, 4)
    with autocast_for(torch.device("cpu"), "bf16"):
        assert (x @ x).dtype == torch.bfloat16
    with autocast_for(torch.device("cpu"), "auto"):
        assert (x @ x).dtype == torch.float32
