"""Fused bridged attention (libra_lm.kernels): the query-partition algorithm, the custom op,
the flex backend and, on a GPU, the CUDA kernels, all against a dense oracle written here."""

import math
import os
import subprocess
import sys

import pytest
import torch

import libra_lm.kernels as kernels
from builders import ROOT
from libra_lm.kernels import build, ops
from libra_lm.kernels.partition import make_plan, segment_first_position
from libra_lm.kernels.reference import tiled_backward, tiled_forward

# The tile loops run thousands of tiny ops: one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- oracle

def oracle(q, k, v, k_x, v_x, is_vision, segment_ids=None):
    """The official two-view math (`attn_with_bridge`, libra/models/libra/modeling_libra.py), dense:
    both score matrices, rows picked by query modality, one softmax per query. Returns (out, lse)."""
    n, d = q.shape[-2:]
    same = (is_vision[:, :, None] == is_vision[:, None, :])[:, None]  # (B, 1, N, N)
    scores = torch.where(same, q @ k.transpose(-1, -2), q @ k_x.transpose(-1, -2)) / math.sqrt(d)
    i = torch.arange(n, device=q.device)
    allowed = (i[None, :] <= i[:, None])[None, None]
    if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])[:, None]
    scores = scores.masked_fill(~allowed, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    out = (p * same) @ v + (p * ~same) @ v_x
    return out, torch.logsumexp(scores, dim=-1)


def make_layout(kind: str, b: int, n: int, gen: torch.Generator):
    """is_vision (B, N) and segment_ids (B, N) or None for a named sequence layout."""
    if kind == "interleaved":  # modality flips at random: every tile boundary case
        return torch.rand(b, n, generator=gen) < 0.5, None
    if kind in ("images", "packed"):
        is_vision = torch.zeros(b, n, dtype=torch.bool)
        segment = torch.zeros(b, n, dtype=torch.long)
        for row in range(b):
            pos, seg = 0, 0
            while pos < n:
                text = int(torch.randint(3, max(4, n // 8), (1,), generator=gen))
                image = int(torch.randint(5, max(6, n // 4), (1,), generator=gen))
                segment[row, pos:] = seg
                pos += text
                is_vision[row, pos:pos + image] = True
                pos += image
                if kind == "packed" and torch.rand(1, generator=gen) < 0.6:
                    seg += 1  # the next text starts a new packed sample
        return is_vision, (segment if kind == "packed" else None)
    if kind == "all_text":
        return torch.zeros(b, n, dtype=torch.bool), None
    if kind == "all_vision":
        return torch.ones(b, n, dtype=torch.bool), None
    raise ValueError(kind)


LAYOUTS = ["interleaved", "images", "packed", "all_text", "all_vision"]


def random_inputs(b, h, n, d, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(b, h, n, d, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)
            for _ in range(5)]


def max_err(x, ref):
    """Largest elementwise error over the largest magnitude: catches one wrong row or tile
    that a norm would average away."""
    return ((x.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def rel_err(x, ref):
    """||x - ref|| / ||ref||; a gradient that must be zero (no query of that view) must be 0."""
    return ((x.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


# ----------------------------------------------------------------------------- plan

@pytest.mark.parametrize("layout", LAYOUTS)
def test_plan_tiles_are_single_modality_and_cover_every_query(layout):
    gen = torch.Generator().manual_seed(1)
    is_vision, segment_ids = make_layout(layout, 3, 150, gen)
    block_m = 16
    plan = make_plan(is_vision, segment_ids, block_m)
    n = is_vision.shape[1]
    if segment_ids is None:
        seg_first = torch.zeros_like(is_vision, dtype=torch.long)
    else:
        seg_first = segment_first_position(segment_ids)
    for b in range(3):
        perm = plan.perm[b].long()
        assert sorted(perm.tolist()) == list(range(n))
        n_text = int((~is_vision[b]).sum())
        assert int(plan.n_text[b]) == n_text
        covered = []
        for t, (q_start, q_end, key_lo, key_hi) in enumerate(plan.tiles[b].tolist()):
            if q_start == q_end:
                continue
            rows = perm[q_start:q_end]
            assert 0 < q_end - q_start <= block_m
            assert (t < -(-n_text // block_m)) == (q_start < n_text)  # text tiles first
            assert is_vision[b, rows].unique().numel() == 1
            assert torch.all(rows[1:] > rows[:-1])  # positions ascend inside a tile
            assert key_hi == int(rows.max()) + 1
            assert key_lo == int(seg_first[b, rows].min())
            covered += list(range(q_start, q_end))
        assert covered == list(range(n))


def test_segment_first_position_labels_any_ids():
    ids = torch.tensor([[7, 7, -3, 7, 10**12, -3], [0, 1, 2, 2, 1, 0]])
    expected = torch.tensor([[0, 0, 2, 0, 4, 2], [0, 1, 2, 2, 1, 0]])
    assert torch.equal(segment_first_position(ids), expected)


# ----------------------------------------------------------------------------- reference algorithm

# Every layout at one tile shape, and the mixed layouts at unequal query/key tiles.
TILE_CASES = [(layout, (16, 16)) for layout in LAYOUTS] + [("interleaved", (32, 16)), ("packed", (16, 32))]


@pytest.mark.parametrize("layout,blocks", TILE_CASES)
def test_tiled_forward_matches_oracle(layout, blocks):
    gen = torch.Generator().manual_seed(2)
    is_vision, segment_ids = make_layout(layout, 2, 75, gen)  # 75: no tile size divides it
    q, k, v, k_x, v_x = random_inputs(2, 3, 75, 8, seed=3)
    out, lse = tiled_forward(q, k, v, k_x, v_x, is_vision, segment_ids, block_m=blocks[0], block_n=blocks[1])
    ref_out, ref_lse = oracle(q, k, v, k_x, v_x, is_vision, segment_ids)
    torch.testing.assert_close(out, ref_out, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("layout,blocks", TILE_CASES)
def test_tiled_backward_matches_oracle_gradients(layout, blocks):
    gen = torch.Generator().manual_seed(4)
    is_vision, segment_ids = make_layout(layout, 2, 75, gen)
    inputs = [t.requires_grad_() for t in random_inputs(2, 2, 75, 8, seed=5)]
    ref_out, ref_lse = oracle(*inputs, is_vision, segment_ids)
    grad_out = torch.randn_like(ref_out)
    grad_lse = torch.randn_like(ref_lse)  # the lse output is differentiable too
    expected = torch.autograd.grad((ref_out * grad_out).sum() + (ref_lse * grad_lse).sum(), inputs)
    got = tiled_backward(grad_out, *(t.detach() for t in inputs), is_vision, segment_ids, ref_out.detach(),
                         ref_lse.detach(), grad_lse, block_m=blocks[0], block_n=blocks[1])
    for name, g, e in zip(("dq", "dk", "dv", "dk_x", "dv_x"), got, expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-9, atol=1e-10, msg=name)


def test_tiled_reference_at_kernel_tile_sizes_in_bf16():
    """The kernel's own tiles (128x64 forward, 64x128 backward) and its bf16 roundings stay
    within bf16 error of the fp64 oracle."""
    gen = torch.Generator().manual_seed(6)
    is_vision, segment_ids = make_layout("packed", 2, 300, gen)
    inputs = random_inputs(2, 2, 300, 64, dtype=torch.bfloat16, seed=7)
    out, lse = tiled_forward(*inputs, is_vision, segment_ids)
    ref = [t.double().requires_grad_() for t in inputs]
    ref_out, ref_lse = oracle(*ref, is_vision, segment_ids)
    assert rel_err(out, ref_out) < 1e-2
    assert (lse.double() - ref_lse).abs().max() < 1e-4
    grad_out = torch.randn(ref_out.shape, generator=gen).to(torch.bfloat16)
    expected = torch.autograd.grad((ref_out * grad_out.double()).sum(), ref)
    got = tiled_backward(grad_out, *inputs, is_vision, segment_ids, out, lse)
    for g, e in zip(got, expected, strict=True):
        assert g.dtype == torch.bfloat16 and torch.isfinite(g).all()
        assert rel_err(g, e) < 2e-2


def test_matches_attention_eager_backend():
    attention = pytest.importorskip("libra_lm.attention")
    if not hasattr(attention, "bridged_attention"):
        pytest.skip("libra_lm.attention.bridged_attention is not there yet")
    gen = torch.Generator().manual_seed(8)
    is_vision, segment_ids = make_layout("packed", 2, 90, gen)
    inputs = random_inputs(2, 2, 90, 16, dtype=torch.float32, seed=9)
    eager = attention.bridged_attention(*inputs, is_vision, segment_ids=segment_ids, backend="eager")
    out, _ = tiled_forward(*inputs, is_vision, segment_ids, block_m=32, block_n=16)
    torch.testing.assert_close(out, eager, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- custom op (CPU)

def _small_op_inputs(dtype=torch.float32, n=24, d=8, requires_grad=True):
    gen = torch.Generator().manual_seed(10)
    is_vision, segment_ids = make_layout("packed", 2, n, gen)
    inputs = [t.requires_grad_(requires_grad) for t in random_inputs(2, 2, n, d, dtype=dtype, seed=11)]
    return inputs, is_vision, segment_ids


def test_op_opcheck_cpu():
    inputs, is_vision, segment_ids = _small_op_inputs()
    torch.library.opcheck(torch.ops.libra.bridged_attention_fwd, (*inputs, is_vision, segment_ids))
    out, lse = torch.ops.libra.bridged_attention_fwd(*inputs, is_vision, segment_ids)
    detached = [t.detach() for t in inputs]
    torch.library.opcheck(torch.ops.libra.bridged_attention_bwd,
                          (torch.randn_like(out), *detached, is_vision, segment_ids, out.detach(), lse.detach(), None))


def test_op_gradcheck_cpu():
    gen = torch.Generator().manual_seed(12)
    is_vision, segment_ids = make_layout("packed", 1, 10, gen)
    inputs = [t.requires_grad_() for t in random_inputs(1, 1, 10, 4, seed=13)]
    assert torch.autograd.gradcheck(
        lambda *x: kernels.cuda_bridged_attention_with_lse(*x, is_vision, segment_ids), inputs)


def test_op_matches_oracle_forward_and_backward_cpu():
    inputs, is_vision, segment_ids = _small_op_inputs(torch.float64, n=40)
    out, lse = kernels.cuda_bridged_attention_with_lse(*inputs, is_vision, segment_ids)
    ref_out, ref_lse = oracle(*inputs, is_vision, segment_ids)
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(lse, ref_lse)
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad((out * grad_out).sum(), inputs)
    expected = torch.autograd.grad((ref_out * grad_out).sum(), inputs)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_op_fake_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(2, 3, 50, 64, dtype=torch.bfloat16)
        is_vision = torch.empty(2, 50, dtype=torch.bool)
        out, lse = torch.ops.libra.bridged_attention_fwd(q, q, q, q, q, is_vision, None)
        grads = torch.ops.libra.bridged_attention_bwd(out, q, q, q, q, q, is_vision, None, out, lse, None)
    assert out.shape == (2, 3, 50, 64) and out.dtype == torch.bfloat16
    assert lse.shape == (2, 3, 50) and lse.dtype == torch.float32
    assert [g.shape for g in grads] == [q.shape] * 5


def test_op_under_compile_and_checkpoint_cpu():
    inputs, is_vision, segment_ids = _small_op_inputs()

    def loss_fn(q, k, v, k_x, v_x):
        out = kernels.cuda_bridged_attention(q, k, v, k_x, v_x, is_vision, segment_ids)
        return (out.sin() * torch.arange(out.shape[-1])).sum()

    expected = torch.autograd.grad(loss_fn(*inputs), inputs)
    compiled = torch.compile(loss_fn, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(*inputs), inputs)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)
    checkpointed = torch.utils.checkpoint.checkpoint(loss_fn, *inputs, use_reentrant=False)
    got = torch.autograd.grad(checkpointed, inputs)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e)


def test_input_errors_say_what_is_expected():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"k must have q's shape \(1, 2, 8, 16\)"):
        kernels.cuda_bridged_attention(q, q[:, :1], q, q, q, torch.zeros(1, 8, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"is_vision must be a bool tensor of shape \(1, 8\)"):
        kernels.cuda_bridged_attention(q, q, q, q, q, torch.zeros(1, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="segment_ids must be an integer tensor"):
        kernels.cuda_bridged_attention(q, q, q, q, q, torch.zeros(1, 8, dtype=torch.bool), torch.zeros(1, 8))


def test_status_on_cpu_builds_nothing():
    q = torch.randn(1, 2, 8, 64, dtype=torch.bfloat16)
    ok, reason = kernels.cuda_status(q)
    assert not ok and "CUDA" in reason and "cpu" in reason
    q.requires_grad_()
    ok, reason = kernels.flex_status(q)
    assert not ok and "no backward on CPU" in reason
    with torch.no_grad():
        assert kernels.flex_status(q) == (True, "")
    # Asking for status on CPU did not try to build.
    assert build._module is None and build._error is None


@pytest.mark.slow
def test_import_loads_no_build_machinery():
    code = "import libra_lm.kernels, sys; sys.exit('torch.utils.cpp_extension' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_status_reports_a_failed_build(monkeypatch):
    monkeypatch.setattr(build, "_module", None)
    monkeypatch.setattr(build, "_error", "the bridged-attention CUDA extension failed to build: nvcc exploded")
    with pytest.raises(RuntimeError, match="nvcc exploded"):
        build.load_extension()
    monkeypatch.setenv(kernels.DISABLE_ENV, "1")
    expected = (False, f"the fused kernel is disabled by {kernels.DISABLE_ENV}")
    assert kernels.cuda_status(torch.randn(1, 1, 4, 64)) == expected


def test_reference_uses_the_kernel_tile_shapes():
    """reference.KERNEL_BLOCKS mirrors FwdTile/BwdTile of the CUDA header (the GPU tests compare
    the kernel with the reference at these shapes)."""
    import re

    from libra_lm.kernels.reference import KERNEL_BLOCKS

    header = (build.CSRC / "bridged_attn.h").read_text()

    def constant(struct, name):
        body = re.search(rf"struct {struct} {{(.*?)}};", header, re.S).group(1)
        return int(re.search(rf"{name} = (\d+);", body).group(1))

    expected = (constant("FwdTile", "kBlockM"), constant("FwdTile", "kBlockN"),
                constant("BwdTile", "kBlockM"), constant("BwdTile", "kBlockN"))
    assert KERNEL_BLOCKS == {64: expected, 128: expected}


def test_arch_flags():
    assert build._arch_gencode("8.0;9.0+PTX") == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_90,code=sm_90",
        "-gencode=arch=compute_90,code=compute_90",
    ]
    with pytest.raises(ValueError, match="bad CUDA arch 'sm90'"):
        build._arch_gencode("sm90")


# ----------------------------------------------------------------------------- flex (CPU forward)

@pytest.mark.parametrize("layout", ["interleaved", "packed"])
def test_flex_forward_cpu_matches_oracle(layout):
    gen = torch.Generator().manual_seed(14)
    is_vision, segment_ids = make_layout(layout, 2, 150, gen)  # spans two flex blocks
    inputs = random_inputs(2, 2, 150, 16, dtype=torch.float32, seed=15)
    with torch.no_grad():
        out = kernels.flex_bridged_attention(*inputs, is_vision, segment_ids, compiled=False)
    ref_out, _ = oracle(*(t.double() for t in inputs), is_vision, segment_ids)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)


def test_flex_block_mask_built_once_per_batch():
    gen = torch.Generator().manual_seed(16)
    is_vision, segment_ids = make_layout("packed", 1, 40, gen)
    from libra_lm.kernels import flex

    first = flex._cached_block_mask(is_vision, segment_ids)
    assert flex._cached_block_mask(is_vision, segment_ids) is first  # next layer, same batch
    assert flex._cached_block_mask(is_vision.clone(), segment_ids) is not first  # next batch
    is_vision[0, 0] = ~is_vision[0, 0]  # modified in place: not reused
    assert flex._cached_block_mask(is_vision, segment_ids) is not first


@pytest.mark.slow
def test_flex_compiled_cpu_inference_matches_oracle():
    gen = torch.Generator().manual_seed(17)
    is_vision, segment_ids = make_layout("images", 1, 140, gen)
    inputs = random_inputs(1, 2, 140, 16, dtype=torch.float32, seed=18)
    with torch.no_grad():
        out = kernels.flex_bridged_attention(*inputs, is_vision, segment_ids)
    ref_out, _ = oracle(*(t.double() for t in inputs), is_vision, segment_ids)
    torch.testing.assert_close(out.double(), ref_out, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------------------- build and bench

@pytest.mark.slow
def test_compile_only_build_for_sm80_and_sm90(tmp_path):
    if build.find_cuda_home() is None:
        if os.environ.get("LIBRA_REQUIRE_NVCC"):  # CI: the compile check must not silently skip
            pytest.fail("LIBRA_REQUIRE_NVCC is set but no CUDA toolkit (nvcc) was found")
        pytest.skip("no CUDA toolkit (nvcc) on this machine")
    proc = subprocess.run(
        [sys.executable, "-m", "libra_lm.kernels.build", "--compile-only", "--arch", "8.0;9.0", "--werror",
         "--build-dir", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert sorted(p.name for p in tmp_path.glob("*.o")) == [
        "bridged_attn.cpp.o", "bridged_attn_bwd.cu.o", "bridged_attn_fwd.cu.o"]


@pytest.mark.slow
def test_bench_smoke_runs():
    proc = subprocess.run([sys.executable, "bench/attention.py", "--smoke"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "eager" in proc.stdout and "TFLOP/s" in proc.stdout


# ----------------------------------------------------------------------------- CUDA kernels

def assert_matches_oracle(attention, inputs, is_vision, segment_ids, out_tol=1e-2, grad_tol=2e-2):
    """Output and the five input gradients of `attention` against the fp64 oracle (bf16 margins)."""
    out = attention(*inputs, is_vision, segment_ids)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, inputs, grad_out)
    ref = [t.detach().double().requires_grad_() for t in inputs]
    ref_out, _ = oracle(*ref, is_vision, segment_ids)
    ref_grads = torch.autograd.grad(ref_out, ref, grad_out.double())
    assert rel_err(out, ref_out) < out_tol
    for g, e in zip(grads, ref_grads, strict=True):
        assert rel_err(g, e) < grad_tol


def _cuda_case(layout, dtype, d, n=1000, b=2, h=3, seed=20):
    gen = torch.Generator().manual_seed(seed)
    is_vision, segment_ids = make_layout(layout, b, n, gen)
    inputs = random_inputs(b, h, n, d, dtype=dtype, device="cuda", seed=seed + 1)
    seg = segment_ids.cuda() if segment_ids is not None else None
    return inputs, is_vision.cuda(), seg


def _tolerance(dtype):
    # The oracle runs in fp64 on the same (rounded) inputs: this is the kernel's own error.
    return (1e-2, 2e-2) if dtype == torch.bfloat16 else (2e-3, 4e-3)  # (out, grads) relative


@pytest.mark.cuda
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d", [64, 128])
def test_cuda_forward_and_backward_match_oracle(layout, dtype, d):
    build.load_extension()  # a build failure must fail here, not skip
    inputs, is_vision, segment_ids = _cuda_case(layout, dtype, d)
    inputs = [t.requires_grad_() for t in inputs]
    with ops.poison_outputs():
        out, lse = kernels.cuda_bridged_attention_with_lse(*inputs, is_vision, segment_ids)
        grad_out = torch.randn_like(out)
        grad_lse = torch.randn_like(lse)
        grads = torch.autograd.grad((out.float() * grad_out.float()).sum() + (lse * grad_lse).sum(), inputs)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    ref = [t.detach().double().requires_grad_() for t in inputs]
    ref_out, ref_lse = oracle(*ref, is_vision, segment_ids)
    ref_grads = torch.autograd.grad((ref_out * grad_out.double()).sum() + (ref_lse * grad_lse.double()).sum(), ref)
    tol_out, tol_grad = _tolerance(dtype)
    tol_max = 2e-2 if dtype == torch.bfloat16 else 4e-3
    assert rel_err(out, ref_out) < tol_out and max_err(out, ref_out) < tol_max
    assert (lse - ref_lse).abs().max() < 1e-3
    for name, g, e in zip(("dq", "dk", "dv", "dk_x", "dv_x"), grads, ref_grads, strict=True):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, e) < tol_grad and max_err(g, e) < tol_max, name
    # As accurate as the algorithm it implements (the reference, same tiles and roundings).
    with torch.no_grad():
        t_out, t_lse = tiled_forward(*(t.detach() for t in inputs), is_vision, segment_ids)
        t_grads = tiled_backward(grad_out, *(t.detach() for t in inputs), is_vision, segment_ids, t_out, t_lse,
                                 grad_lse)
    assert rel_err(out, ref_out) <= 1.5 * rel_err(t_out, ref_out) + 1e-4
    for g, tg, e in zip(grads, t_grads, ref_grads, strict=True):
        assert rel_err(g, e) <= 1.5 * rel_err(tg, e) + 1e-4


@pytest.mark.cuda
def test_cuda_noncontiguous_inputs_and_no_grad_lse():
    build.load_extension()
    inputs, is_vision, segment_ids = _cuda_case("images", torch.bfloat16, 128, n=333)
    # (B, N, H, d) projections viewed as (B, H, N, d), as a model produces them.
    strided = [t.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in inputs]
    with ops.poison_outputs():
        assert_matches_oracle(kernels.cuda_bridged_attention, strided, is_vision, segment_ids)


@pytest.mark.cuda
def test_cuda_opcheck_compile_and_checkpoint():
    build.load_extension()
    inputs, is_vision, segment_ids = _cuda_case("packed", torch.bfloat16, 64, n=200, b=1, h=2)
    inputs = [t.requires_grad_() for t in inputs]
    torch.library.opcheck(torch.ops.libra.bridged_attention_fwd, (*inputs, is_vision, segment_ids))

    def loss_fn(*x):
        return kernels.cuda_bridged_attention(*x, is_vision, segment_ids).float().square().sum()

    expected = torch.autograd.grad(loss_fn(*inputs), inputs)
    got = torch.autograd.grad(torch.compile(loss_fn, fullgraph=True)(*inputs), inputs)
    got_ckpt = torch.autograd.grad(torch.utils.checkpoint.checkpoint(loss_fn, *inputs, use_reentrant=False), inputs)
    for g, c, e in zip(got, got_ckpt, expected, strict=True):
        assert rel_err(g, e) < 1e-2 and rel_err(c, e) < 1e-2


@pytest.mark.cuda
def test_cuda_status_rejects_what_the_kernel_cannot_take():
    assert kernels.cuda_status(torch.randn(1, 1, 8, 64, device="cuda", dtype=torch.bfloat16)) == (True, "")
    ok, reason = kernels.cuda_status(torch.randn(1, 1, 8, 64, device="cuda"))
    assert not ok and "bfloat16 or float16" in reason
    ok, reason = kernels.cuda_status(torch.randn(1, 1, 8, 96, device="cuda", dtype=torch.bfloat16))
    assert not ok and "head dims" in reason


@pytest.mark.cuda
@pytest.mark.parametrize("layout", ["interleaved", "packed"])
def test_flex_cuda_forward_and_backward_match_oracle(layout):
    inputs, is_vision, segment_ids = _cuda_case(layout, torch.bfloat16, 64, n=700)
    inputs = [t.requires_grad_() for t in inputs]
    assert kernels.flex_status(inputs[0]) == (True, "")
    assert_matches_oracle(kernels.flex_bridged_attention, inputs, is_vision, segment_ids)


def test_oracle_is_plain_attention_for_one_modality():
    """The oracle itself: with a single modality the bridge is inactive, so it is causal SDPA."""
    q, k, v, k_x, v_x = random_inputs(1, 2, 30, 8, dtype=torch.float32, seed=19)
    out, _ = oracle(q, k, v, k_x, v_x, torch.zeros(1, 30, dtype=torch.bool))
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    torch.testing.assert_close(out, sdpa, rtol=1e-5, atol=1e-5)
