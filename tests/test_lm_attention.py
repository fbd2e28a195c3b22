"""bridged_attention: eager vs a per-pair loop, sdpa vs eager, KV cache, padding, dispatch."""

import logging
import math
from types import SimpleNamespace

import pytest
import torch

from libra_lm import attention
from libra_lm.attention import BackendUnavailableError, bridged_attention, select_backend


def pair_loop(q, k, v, k_x, v_x, is_vision, segment_ids=None):
    """The contract written out: for query i and key j <= i (same segment), key/value are
    k[j], v[j] when the modalities match, else k_x[j], v_x[j]; one softmax, scale 1/sqrt(d)."""
    b, h, nq, d = q.shape
    nk = k.shape[2]
    out = torch.zeros(b, h, nq, d, dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for a in range(nq):
                i = nk - nq + a
                scores, values = [], []
                for j in range(i + 1):
                    if segment_ids is not None and segment_ids[bi, i] != segment_ids[bi, j]:
                        continue
                    same = bool(is_vision[bi, i]) == bool(is_vision[bi, j])
                    key = (k if same else k_x)[bi, hi, j].double()
                    scores.append(float(q[bi, hi, a].double() @ key) / math.sqrt(d))
                    values.append((v if same else v_x)[bi, hi, j].double())
                weights = torch.softmax(torch.tensor(scores, dtype=torch.float64), 0)
                out[bi, hi, a] = sum(w * val for w, val in zip(weights, values, strict=True))
    return out


def random_inputs(b=2, h=2, n=13, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q, k, v, k_x, v_x = (torch.randn(b, h, n, d, generator=g, dtype=dtype) for _ in range(5))
    return q, k, v, k_x, v_x


def mixed_layout(n, images, b=2):
    """is_vision for b rows with images at the given (start, length) spans per row."""
    is_vision = torch.zeros(b, n, dtype=torch.bool)
    for row, spans in enumerate(images):
        for start, length in spans:
            is_vision[row, start:start + length] = True
    return is_vision


def test_eager_equals_pair_loop():
    q, k, v, k_x, v_x = random_inputs(n=13)
    is_vision = mixed_layout(13, [[(1, 4), (8, 3)], [(0, 2), (5, 6)]])
    segments = torch.tensor([[0] * 7 + [1] * 6, [0] * 13])
    for seg in (None, segments):
        out = bridged_attention(q, k, v, k_x, v_x, is_vision, segment_ids=seg, backend="eager")
        torch.testing.assert_close(out.double(), pair_loop(q, k, v, k_x, v_x, is_vision, seg), rtol=1e-5, atol=1e-5)


def test_bridge_views_matter():
    # k_x / v_x must be used exactly for cross-modal pairs: changing them moves only
    # queries that see a key of the other modality.
    q, k, v, k_x, v_x = random_inputs(b=1, n=9)
    is_vision = mixed_layout(9, [[(3, 4)]], b=1)  # text 0-2, vision 3-6, text 7-8
    base = bridged_attention(q, k, v, k_x, v_x, is_vision, backend="eager")
    moved = bridged_attention(q, k, v, k_x + 1.0, v_x + 1.0, is_vision, backend="eager")
    changed = (moved - base).abs().amax(dim=(0, 1, 3)) > 1e-6
    assert changed.tolist() == [False, False, False, True, True, True, True, True, True]


@pytest.mark.parametrize(
    "n, images, segments",
    [
        (37, [[(1, 10), (20, 10)], [(0, 3), (5, 5), (30, 7)]], None),  # several images, N not round
        (37, [[(1, 10), (20, 10)], [(4, 30)]], [[0] * 15 + [1] * 22, [0] * 10 + [1] * 10 + [2] * 17]),
        (23, [[], []], None),  # text only: the single-view fast path
        (23, [[(0, 23)], [(0, 23)]], None),  # vision only
        (23, [[], [(0, 23)]], [[0] * 11 + [1] * 12, [0] * 23]),  # one row each, with segments
        (29, [[(i, 1) for i in range(0, 29, 2)], [(i, 1) for i in range(1, 29, 3)]], None),  # interleaved
    ],
)
def test_sdpa_equals_eager(n, images, segments):
    q, k, v, k_x, v_x = random_inputs(n=n, seed=n)
    for t in (q, k, v, k_x, v_x):
        t.requires_grad_(True)
    is_vision = mixed_layout(n, images)
    seg = torch.tensor(segments) if segments is not None else None
    ref = bridged_attention(q, k, v, k_x, v_x, is_vision, segment_ids=seg, backend="eager")
    out = bridged_attention(q, k, v, k_x, v_x, is_vision, segment_ids=seg, backend="sdpa")
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    grad = torch.randn_like(ref)
    g_ref = torch.autograd.grad(ref, (q, k, v, k_x, v_x), grad)
    g_out = torch.autograd.grad(out, (q, k, v, k_x, v_x), grad)
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
@pytest.mark.parametrize("nq", [1, 4])
def test_fewer_queries_are_the_last_positions(backend, nq):
    q, k, v, k_x, v_x = random_inputs(n=17, seed=3)
    is_vision = mixed_layout(17, [[(2, 8)], [(10, 6)]])
    full = bridged_attention(q, k, v, k_x, v_x, is_vision, backend="eager")
    tail = bridged_attention(q[:, :, -nq:], k, v, k_x, v_x, is_vision, backend=backend)
    torch.testing.assert_close(tail, full[:, :, -nq:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tail.double(), pair_loop(q[:, :, -nq:], k, v, k_x, v_x, is_vision), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["eager", "sdpa"])
def test_key_padding_equals_unpadded(backend):
    # Row 1 is row 0 left-padded by 5 (garbage at the padding): real outputs must not change.
    q, k, v, k_x, v_x = random_inputs(b=1, n=12, seed=5)
    is_vision = mixed_layout(12, [[(2, 6)]], b=1)
    ref = bridged_attention(q, k, v, k_x, v_x, is_vision, backend="eager")

    def pad(t):
        return torch.cat([torch.randn(*t.shape[:2], 5, t.shape[3]) * 10, t], 2)

    mask = torch.tensor([[False] * 5 + [True] * 12])
    padded_vision = torch.cat([torch.tensor([[True, False, True, False, False]]), is_vision], 1)
    out = bridged_attention(*(pad(t) for t in (q, k, v, k_x, v_x)), padded_vision, key_padding_mask=mask,
                            backend=backend)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[:, :, 5:], ref, rtol=1e-5, atol=1e-5)
    # Segments and padding together: padding is its own segment.
    seg = torch.tensor([[0] * 5 + [0] * 6 + [1] * 6])
    out = bridged_attention(*(pad(t) for t in (q, k, v, k_x, v_x)), padded_vision, key_padding_mask=mask,
                            segment_ids=seg, backend=backend)
    ref = bridged_attention(q, k, v, k_x, v_x, is_vision, segment_ids=seg[:, 5:], backend="eager")
    torch.testing.assert_close(out[:, :, 5:], ref, rtol=1e-5, atol=1e-5)


def test_contract_errors():
    q, k, v, k_x, v_x = random_inputs(n=6)
    is_vision = torch.zeros(2, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match=r"k_x must be \(B, H, Nk, d\)"):
        bridged_attention(q, k, v, k_x[:, :, :5], v_x, is_vision)
    with pytest.raises(ValueError, match="is_vision must be a bool tensor"):
        bridged_attention(q, k, v, k_x, v_x, is_vision.long())
    with pytest.raises(ValueError, match="queries must be the last positions"):
        bridged_attention(torch.cat([q, q], 2), k, v, k_x, v_x, is_vision)
    with pytest.raises(ValueError, match="segment_ids must have shape"):
        bridged_attention(q, k, v, k_x, v_x, is_vision, segment_ids=torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown attention backend 'fast'"):
        bridged_attention(q, k, v, k_x, v_x, is_vision, backend="fast")


# ---- dispatch -----------------------------------------------------------------------------------
@pytest.fixture
def fake_kernels(monkeypatch):
    """Replace the optional libra_lm.kernels with controllable fakes."""
    state = {"cuda": (False, "needs compute capability 8.0"), "flex": (True, ""), "calls": []}

    def make(name):
        def run(q, k, v, k_x, v_x, is_vision, segment_ids=None):
            state["calls"].append((name, segment_ids))
            return attention.eager_bridged_attention(q, k, v, k_x, v_x, is_vision, segment_ids)

        return run, (lambda q: state[name])

    kernels = {"cuda": make("cuda"), "flex": make("flex")}
    monkeypatch.setattr(attention, "_load_kernels", lambda: (kernels, None))
    monkeypatch.setattr(attention, "_logged", set())
    return state


def fake_cuda_query(n=8):
    return SimpleNamespace(device=torch.device("cuda"), shape=(1, 2, n, 16))


def test_auto_prefers_cuda_then_flex_then_sdpa(fake_kernels, caplog):
    q = fake_cuda_query()
    fake_kernels["cuda"] = (True, "")
    assert select_backend("auto", q, 8) == "cuda"
    fake_kernels["cuda"] = (False, "needs compute capability 8.0")
    with caplog.at_level(logging.WARNING, logger="libra_lm.attention"):
        assert select_backend("auto", q, 8) == "flex"
        assert select_backend("auto", q, 8) == "flex"
        fake_kernels["flex"] = (False, "head dim 96 unsupported")
        assert select_backend("auto", q, 8) == "sdpa"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("needs compute capability 8.0" in m for m in messages) == 1  # logged once
    assert sum("head dim 96 unsupported" in m for m in messages) == 1
    # KV-cache decoding (fewer queries than keys) and CPU tensors go to sdpa.
    fake_kernels["cuda"] = (True, "")
    assert select_backend("auto", q, 20) == "sdpa"
    assert select_backend("auto", torch.zeros(1, 2, 8, 16), 8) == "sdpa"


def test_explicit_backends(fake_kernels):
    q, k, v, k_x, v_x = random_inputs(n=9)
    is_vision = mixed_layout(9, [[(1, 4)], [(3, 3)]])
    with pytest.raises(BackendUnavailableError, match="'cuda' cannot run these inputs: needs compute capability 8.0"):
        bridged_attention(q, k, v, k_x, v_x, is_vision, backend="cuda")
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :2] = False
    out = bridged_attention(q, k, v, k_x, v_x, is_vision, backend="flex", key_padding_mask=mask)
    name, seg = fake_kernels["calls"][-1]
    assert name == "flex" and seg.tolist()[1][:3] == [-1, -1, 0]  # padding folded into segments
    torch.testing.assert_close(out[0], bridged_attention(q, k, v, k_x, v_x, is_vision, backend="sdpa")[0])
    with pytest.raises(ValueError, match="needs as many queries as keys"):
        bridged_attention(q[:, :, -1:], k, v, k_x, v_x, is_vision, backend="flex")


def test_missing_kernels_module(monkeypatch):
    monkeypatch.setattr(attention, "_kernels_cache", None)
    monkeypatch.setattr(attention, "_kernels_error", None)
    monkeypatch.setitem(__import__("sys").modules, "libra_lm.kernels", None)  # makes the import fail
    q, k, v, k_x, v_x = random_inputs(n=4)
    with pytest.raises(BackendUnavailableError,
                       match="'flex' cannot run these inputs: libra_lm.kernels could not be imported"):
        bridged_attention(q, k, v, k_x, v_x, torch.zeros(2, 4, dtype=torch.bool), backend="flex")


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_backends_equal_eager(dtype):
    q, k, v, k_x, v_x = (t.cuda().to(dtype) for t in random_inputs(b=2, h=4, n=301, d=64, seed=9))
    is_vision = mixed_layout(301, [[(1, 130), (200, 40)], [(10, 280)]]).cuda()
    seg = torch.tensor([[0] * 150 + [1] * 151, [0] * 301]).cuda()
    ref = bridged_attention(q.float(), k.float(), v.float(), k_x.float(), v_x.float(), is_vision,
                            segment_ids=seg, backend="eager")
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for backend in ("sdpa", "auto"):
        out = bridged_attention(q, k, v, k_x, v_x, is_vision, segment_ids=seg, backend=backend)
        torch.testing.assert_close(out.float(), ref, rtol=tol, atol=tol)


def test_layout_cache_is_reused_across_calls():
    # One plan per layout: a second call (another layer) with other q/k/v reuses it.
    is_vision = mixed_layout(11, [[(2, 5)], [(0, 3)]])
    mask = torch.ones(2, 11, dtype=torch.bool)
    mask[1, :1] = False
    cache = {}
    for seed in (1, 2):
        inputs = random_inputs(n=11, seed=seed)
        out = bridged_attention(*inputs, is_vision, key_padding_mask=mask, backend="sdpa", layout_cache=cache)
        ref = bridged_attention(*inputs, is_vision, key_padding_mask=mask, backend="eager")
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
        if seed == 1:
            plan = cache["sdpa"]
    assert cache["sdpa"] is plan and cache[("backend", "sdpa")] == "sdpa"
