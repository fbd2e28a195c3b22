"""Fused bridged attention (libra_lm.kernels): the query-partition algorithm, the custom op,
the flex backend and, on a GPU, the CUDA kernels, all against a dense oracle written here."""

import os
import subprocess
import sys

import pytest
import torch

import libra_lm.kernels as kernels
from builders import BRIDGED_LAYOUTS, ROOT, bridged_layout, bridged_oracle, max_err, random_qkv, rel_err
from libra_lm.kernels import build, ops, partition, tiles
from libra_lm.kernels.partition import make_plan, segment_first_position
from libra_lm.kernels.reference import tiled_backward, tiled_forward

# The tile loops run thousands of tiny ops: one intra-op thread (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


# The oracle, layouts and error measures are shared with tests/test_kernels_emulator.py.
oracle = bridged_oracle
make_layout = bridged_layout
random_inputs = random_qkv
LAYOUTS = BRIDGED_LAYOUTS


# ----------------------------------------------------------------------------- plan

@pytest.mark.parametrize("layout", [*LAYOUTS, "long_segments"])
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
            if segment_ids is not None:  # the label all the tile's queries share, else -1
                labels = seg_first[b, rows].unique()
                assert int(plan.tile_segment[b, t]) == (int(labels[0]) if labels.numel() == 1 else -1)
            covered += list(range(q_start, q_end))
        assert covered == list(range(n))
        if segment_ids is not None:  # the label all keys of a whole group share, else -1
            for group, label in enumerate(plan.key_segment[b].tolist()):
                keys = seg_first[b, group * tiles.KEY_GROUP:(group + 1) * tiles.KEY_GROUP]
                whole = keys.numel() == tiles.KEY_GROUP
                assert label == (int(keys[0]) if whole and keys.unique().numel() == 1 else -1)


def test_segment_first_position_labels_any_ids():
    ids = torch.tensor([[7, 7, -3, 7, 10**12, -3], [0, 1, 2, 2, 1, 0]])
    expected = torch.tensor([[0, 0, 2, 0, 4, 2], [0, 1, 2, 2, 1, 0]])
    assert torch.equal(segment_first_position(ids), expected)


# ----------------------------------------------------------------------------- reference algorithm

# Every layout at one tile shape, and the mixed layouts at unequal query/key tiles.
TILE_CASES = [(layout, (16, 16)) for layout in LAYOUTS] + [("interleaved", (32, 16)), ("packed", (16, 32)),
                                                           ("long_segments", (32, 32))]


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


@pytest.mark.parametrize("layout", ["packed", "long_segments"])
def test_tiled_backward_in_steps_of_a_tile_matches_oracle(layout):
    """The backward walks each plan tile in steps of fewer queries (as the kernel: 64 or 32 of
    the plan's 128), with masks skipped on whole blocks inside one segment below the diagonal."""
    gen = torch.Generator().manual_seed(4)
    is_vision, segment_ids = make_layout(layout, 2, 150, gen)
    inputs = [t.requires_grad_() for t in random_inputs(2, 2, 150, 8, seed=5)]
    ref_out, ref_lse = oracle(*inputs, is_vision, segment_ids)
    grad_out = torch.randn_like(ref_out)
    expected = torch.autograd.grad((ref_out * grad_out).sum(), inputs)
    got = tiled_backward(grad_out, *(t.detach() for t in inputs), is_vision, segment_ids, ref_out.detach(),
                         ref_lse.detach(), block_m=64, step_m=16, block_n=32)
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
    plan = make_plan(is_vision, segment_ids, tiles.PLAN_BLOCK_M).tensors()
    torch.library.opcheck(torch.ops.libra.bridged_attention_fwd, (*inputs, is_vision, *plan))
    out, lse = torch.ops.libra.bridged_attention_fwd(*inputs, is_vision, *plan)
    detached = [t.detach() for t in inputs]
    torch.library.opcheck(torch.ops.libra.bridged_attention_bwd,
                          (torch.randn_like(out), *detached, is_vision, *plan, out.detach(), lse.detach(), None))


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
        plan = make_plan(is_vision, None, tiles.PLAN_BLOCK_M).tensors()
        out, lse = torch.ops.libra.bridged_attention_fwd(q, q, q, q, q, is_vision, *plan)
        grads = torch.ops.libra.bridged_attention_bwd(out, q, q, q, q, q, is_vision, *plan, out, lse, None)
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


def test_plan_is_built_once_per_batch_and_reused_by_the_backward(monkeypatch):
    """Every layer of a forward pass gets the same is_vision / segment_ids tensors: one plan for
    all of them, and their backward uses the plans saved by the forward."""
    calls = []
    real = partition.make_plan
    monkeypatch.setattr(partition, "make_plan", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(partition, "_plans", partition.LastLayout())
    inputs, is_vision, segment_ids = _small_op_inputs()
    x = inputs[0]
    for _ in range(3):  # three layers
        x = kernels.cuda_bridged_attention(x, *inputs[1:], is_vision, segment_ids)
    assert len(calls) == 1
    torch.autograd.grad(x.sum(), inputs)
    assert len(calls) == 1
    kernels.cuda_bridged_attention(*inputs, is_vision.clone(), segment_ids)  # the next batch
    assert len(calls) == 2


def _fake_cuda_inputs(d=128, dtype=torch.bfloat16):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        return torch.empty(1, 2, 64, d, dtype=dtype, device="cuda")


def _mock_device(monkeypatch, capability, smem_optin):
    """Device properties as torch reports them for a GPU of this capability and opt-in shared
    memory per block; building the extension is mocked away."""
    from types import SimpleNamespace

    props = SimpleNamespace(major=capability[0], minor=capability[1], shared_memory_per_block_optin=smem_optin,
                            name="mocked")
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(build, "load_extension", lambda verbose=False: object())


@pytest.mark.parametrize("capability,smem,d,variant", [
    ((9, 0), 227 * 1024, 128, 0), ((8, 0), 163 * 1024, 128, 0), ((8, 6), 99 * 1024, 128, 1),
    ((8, 9), 99 * 1024, 128, 1), ((12, 0), 99 * 1024, 128, 1), ((8, 6), 99 * 1024, 64, 0)])
def test_cuda_status_checks_the_devices_shared_memory(monkeypatch, capability, smem, d, variant):
    _mock_device(monkeypatch, capability, smem)
    q = _fake_cuda_inputs(d)
    assert kernels.cuda_status(q) == (True, "")
    assert ops.tile_config(q).variant == variant


def test_cuda_status_refuses_a_device_without_enough_shared_memory(monkeypatch):
    _mock_device(monkeypatch, (8, 6), 48 * 1024)
    ok, reason = kernels.cuda_status(_fake_cuda_inputs(128))
    assert not ok
    assert reason == ("the fused kernel needs 74 KiB of shared memory per block for head dim 128, "
                      "the device allows 48 KiB")


def test_auto_skips_a_kernel_the_device_cannot_run(monkeypatch):
    """With the fused kernel refused (too little shared memory) auto takes flex, without raising;
    asking for cuda explicitly says why it cannot run."""
    from libra_lm import attention

    _mock_device(monkeypatch, (8, 6), 48 * 1024)
    q = _fake_cuda_inputs(128)
    assert attention.select_backend("auto", q, q.shape[2]) == "flex"
    with pytest.raises(attention.BackendUnavailableError, match="needs 74 KiB of shared memory per block"):
        attention.select_backend("cuda", q, q.shape[2])


def test_auto_falls_back_when_a_kernel_fails_at_run_time(monkeypatch):
    """A kernel that passed its status check but fails when run (a launch the device refuses)
    is dropped by auto, which computes the result with the next backend; an explicit backend
    still raises."""
    from libra_lm import attention

    def refused(*args, **kwargs):
        raise RuntimeError("bridged attention forward failed to launch: invalid argument")

    kernels_table = {"cuda": (refused, lambda q: (True, "")), "flex": (refused, lambda q: (True, ""))}
    monkeypatch.setattr(attention, "_kernels_cache", kernels_table)
    monkeypatch.setattr(attention, "_failed", {})
    inputs, is_vision, segment_ids = _small_op_inputs(requires_grad=False)
    expected = attention.bridged_attention(*inputs, is_vision, segment_ids=segment_ids, backend="sdpa")
    cache = {("backend", "auto"): "cuda"}  # as auto would choose on a GPU
    out = attention.bridged_attention(*inputs, is_vision, segment_ids=segment_ids, layout_cache=cache)
    torch.testing.assert_close(out, expected)
    assert set(attention._failed) == {"cuda"} and cache[("backend", "auto")] == "sdpa"
    with pytest.raises(RuntimeError, match="failed to launch"):
        attention.bridged_attention(*inputs, is_vision, segment_ids=segment_ids, backend="flex",
                                    layout_cache={("backend", "flex"): "flex"})


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


def test_tile_table_matches_the_header():
    """tiles.py mirrors KernelConfig, kPlanBlockM, kKeyGroup and the list of compiled
    configurations of csrc/bridged_attn.h (the emulator tests check the shared memory each
    launch asks for, and the extension checks its own table when it loads)."""
    import re

    header = (build.CSRC / "bridged_attn.h").read_text()
    assert int(re.search(r"kPlanBlockM = (\d+);", header).group(1)) == tiles.PLAN_BLOCK_M
    assert int(re.search(r"kKeyGroup = (\d+);", header).group(1)) == tiles.KEY_GROUP
    compiled = re.search(r"#define LIBRA_FOR_EACH_CONFIG\(X\) (.*)", header).group(1)
    listed = [(int(d), int(v)) for d, v in re.findall(r"X\((\d+), (\d+)\)", compiled)]
    assert listed == [(c.head_dim, c.variant) for configs in tiles.CONFIGS.values() for c in configs]
    for body_d, body_v, body in re.findall(r"struct KernelConfig<(\d+), (\d+)> {(.*?)};", header, re.S):
        config = tiles.config_for(int(body_d), int(body_v))

        def constant(name, body=body):
            return int(re.search(rf"{name} = (\d+);", body).group(1))

        assert (constant("kFwdBlockN"), constant("kFwdWarps"), constant("kBwdBlockM"), constant("kBwdBlockN")) == (
            config.fwd_block_n, config.fwd_warps, config.bwd_block_m, config.bwd_block_n)


def test_tile_configurations_fit_the_gpus_they_are_for():
    """d = 128 runs the fast configuration where the backward's 156 KiB fit (sm_80: 163 KiB,
    sm_90: 227 KiB) and the small one on 99 KiB parts (sm_86, sm_89, sm_120); d = 64 fits all."""
    kib = 1024
    assert tiles.config_for(128, 0).fwd_smem == 102 * kib and tiles.config_for(128, 0).bwd_smem == 156 * kib
    assert tiles.choose(128, 227 * kib).variant == 0 and tiles.choose(128, 163 * kib).variant == 0
    assert tiles.choose(128, 99 * kib) == tiles.config_for(128, 1)
    assert tiles.config_for(128, 1).smem <= 99 * kib
    assert tiles.choose(64, 99 * kib).variant == 0
    assert tiles.choose(128, 48 * kib) is None and tiles.choose(96, 227 * kib) is None


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


def test_ptxas_table_reads_the_resource_report():
    report = """ptxas info    : Compiling entry function '_ZN5libra52_GLOBAL__N__efe15d4a_19_bridged_attn_fwd_cu_43c1276c23bridged_attn_fwd_kernelI13__nv_bfloat16Li128ELi128ELi64ELi4EEEvNS_17BridgedAttnParamsE' for 'sm_90'
ptxas info    : Function properties for _ZN5libra52_GLOBAL__N__efe15d4a_19_bridged_attn_fwd_cu_43c1276c23bridged_attn_fwd_kernelI13__nv_bfloat16Li128ELi128ELi64ELi4EEEvNS_17BridgedAttnParamsE
    40 bytes stack frame, 12 bytes spill stores, 8 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 40 bytes cumulative stack size
ptxas info    : Compiling entry function '_ZN5libra52_GLOBAL__N__74701f5c_19_bridged_attn_bwd_cu_cbcfeb2c29bridged_attn_bwd_delta_kernelI6__halfLi64EEEvNS_17BridgedAttnParamsE' for 'sm_80'
ptxas info    : Function properties for _ZN5libra52_GLOBAL__N__74701f5c_19_bridged_attn_bwd_cu_cbcfeb2c29bridged_attn_bwd_delta_kernelI6__halfLi64EEEvNS_17BridgedAttnParamsE
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 28 registers, used 0 barriers
"""  # noqa: E501
    assert build.ptxas_table(report) == [
        {"arch": "sm_90", "kernel": "fwd", "dtype": "bf16", "head_dim": 128, "tile": "128x64x4", "registers": 255,
         "spill_stores": 12, "spill_loads": 8},
        {"arch": "sm_80", "kernel": "bwd_delta", "dtype": "fp16", "head_dim": 64, "tile": "-", "registers": 28,
         "spill_stores": 0, "spill_loads": 0},
    ]


def test_gpu_check_script_parses():
    """bench/gpu_check.sh must run unedited on a GPU machine: at least it parses, and the steps
    it runs name files that exist."""
    script = ROOT / "bench" / "gpu_check.sh"
    assert subprocess.run(["bash", "-n", str(script)], capture_output=True).returncode == 0
    text = script.read_text()
    for path in ("tests/test_lm_kernels.py", "bench/attention.py", "bench/encode.py", "bench/lm_step.py"):
        assert path in text and (ROOT / path).exists()


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


CUDA_CONFIGS = [(c.head_dim, c.variant) for configs in tiles.CONFIGS.values() for c in configs]


@pytest.mark.cuda
@pytest.mark.parametrize("layout", [*LAYOUTS, "long_segments"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
@pytest.mark.parametrize("d,variant", CUDA_CONFIGS, ids=[f"d{d}-v{v}" for d, v in CUDA_CONFIGS])
def test_cuda_forward_and_backward_match_oracle(layout, dtype, d, variant):
    build.load_extension()  # a build failure must fail here, not skip
    inputs, is_vision, segment_ids = _cuda_case(layout, dtype, d)
    inputs = [t.requires_grad_() for t in inputs]
    if tiles.config_for(d, variant).smem > ops.device_smem_optin(inputs[0].device):
        pytest.skip(f"configuration {variant} of d={d} does not fit this GPU's shared memory")
    with ops.poison_outputs(), ops.use_variant(variant):
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
        t_out, t_lse = tiled_forward(*(t.detach() for t in inputs), is_vision, segment_ids, variant=variant)
        t_grads = tiled_backward(grad_out, *(t.detach() for t in inputs), is_vision, segment_ids, t_out, t_lse,
                                 grad_lse, variant=variant)
    assert rel_err(out, ref_out) <= 1.5 * rel_err(t_out, ref_out) + 1e-4
    for g, tg, e in zip(grads, t_grads, ref_grads, strict=True):
        assert rel_err(g, e) <= 1.5 * rel_err(tg, e) + 1e-4


@pytest.mark.cuda
def test_bench_one_case_runs_and_checks():
    """The case bench/gpu_check.sh gives compute-sanitizer."""
    proc = subprocess.run([sys.executable, "bench/attention.py", "--one-case", "256"], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "relative errors" in proc.stdout


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
    plan = make_plan(is_vision, segment_ids, tiles.PLAN_BLOCK_M).tensors()
    torch.library.opcheck(torch.ops.libra.bridged_attention_fwd, (*inputs, is_vision, *plan))

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
    assert ops.device_smem_optin(torch.device("cuda")) >= 99 * 1024
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
