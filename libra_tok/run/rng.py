"""The random-number generators' states (torch, CUDA, Python, numpy) as a checkpoint keeps them:
tensors and plain values only, so checkpoints load with weights_only=True."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def rng_state() -> dict[str, Any]:
    """The RNG states as tensors and plain values (numpy's key array as a tensor: as an ndarray
    it would need the unpickler to build one)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` returned (or an older checkpoint's numpy ndarray state)."""
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((int(version), tuple(int(x) for x in internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if isinstance(keys, torch.Tensor) else np.asarray(keys)  # ndarray in older checkpoints
    np.random.set_state((str(kind), keys.astype(np.uint32), int(pos), int(has_gauss), float(cached)))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def legacy_rng_globals() -> list:
    """What checkpoints written before `rng_state` stored numpy's state as a tensor need: the
    ndarray of that state. These build arrays only; nothing else is allowed."""
    multiarray = np._core.multiarray if hasattr(np, "_core") else np.core.multiarray
    return [np.ndarray, np.dtype, type(np.dtype(np.uint32)), multiarray._reconstruct]


__all__ = ["rng_state", "set_rng_state", "legacy_rng_globals"]
