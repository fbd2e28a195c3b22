"""The fused kernels' CUDA sources, run on the CPU by the emulator (libra_lm.kernels.emulator):
forward and backward against the fp64 oracle with the GPU tests' tolerances and nothing
reported (races, out-of-bounds or misaligned accesses, reads of unwritten shared memory,
unwritten outputs, divergent barriers); every tile configuration, on an emulated device with
the shared memory it is meant for; the warp primitives against the PTX ISA's fragment tables;
and mutants of the sources (a removed __syncthreads, a wrong fragment offset, an early
cp.async wait, an off-by-one bound) that the emulator must catch."""

import os

import pytest
import torch

from builders import BRIDGED_LAYOUTS, bridged_layout, bridged_oracle, max_err, random_qkv, rel_err
from libra_lm.kernels import emulator, ops, tiles
from libra_lm.kernels.partition import Plan, make_plan
from libra_lm.kernels.reference import _segment_uniform, tiled_backward, tiled_forward

pytestmark = pytest.mark.usefixtures("one_thread")

SMEM_99K = 99 * 1024  # opt-in shared memory per block of sm_86 / sm_89 / sm_120
SMEM_163K = 163 * 1024  # sm_80


@pytest.fixture(scope="module")
def emu_cache(tmp_path_factory):
    return tmp_path_factory.mktemp("emulator")


def _build(cache, mutations=None):
    try:
        return emulator.build(mutations, cache_dir=cache)
    except emulator.EmulatorUnavailable as e:
        if os.environ.get("LIBRA_REQUIRE_NVCC"):  # CI has the toolkit: the emulator must run there
            pytest.fail(f"LIBRA_REQUIRE_NVCC is set but the emulator cannot be built: {e}")
        pytest.skip(str(e))


@pytest.fixture(scope="module")
def harness(emu_cache):
    return _build(emu_cache)


def _tolerance(dtype):
    # As the GPU tests (tests/test_lm_kernels.py): the oracle runs in fp64 on the same rounded inputs.
    return (1e-2, 2e-2, 2e-2) if dtype == torch.bfloat16 else (2e-3, 4e-3, 4e-3)  # out, grads, max


def _inputs(layout, dtype, d, n, b, h, seed):
    gen = torch.Generator().manual_seed(seed)
    is_vision, segment_ids = bridged_layout(layout, b, n, gen)
    inputs = random_qkv(b, h, n, d, dtype=dtype, seed=seed + 1)
    dout = torch.randn(b, h, n, d, generator=gen).to(dtype)
    grad_lse = torch.randn(b, h, n, generator=gen)
    return inputs, is_vision, segment_ids, dout, grad_lse


def check_case(binary, layout, dtype, d, n, b=2, h=2, variant=0, smem_optin=None, seed=30):
    """Run forward + backward in the emulator and hold it to the GPU tests' standard."""
    inputs, is_vision, segment_ids, dout, grad_lse = _inputs(layout, dtype, d, n, b, h, seed)
    result = emulator.run(*inputs, is_vision, segment_ids, dout=dout, grad_lse=grad_lse, variant=variant,
                          smem_optin=smem_optin, binary=binary)
    result.check_clean()
    assert torch.isfinite(result.out).all() and torch.isfinite(result.lse).all()
    ref = [t.double().requires_grad_() for t in inputs]
    ref_out, ref_lse = bridged_oracle(*ref, is_vision, segment_ids)
    ref_grads = torch.autograd.grad((ref_out * dout.double()).sum() + (ref_lse * grad_lse.double()).sum(), ref)
    tol_out, tol_grad, tol_max = _tolerance(dtype)
    assert rel_err(result.out, ref_out) < tol_out and max_err(result.out, ref_out) < tol_max
    assert (result.lse.double() - ref_lse).abs().max() < 1e-3
    for name, g, e in zip(("dq", "dk", "dv", "dk_x", "dv_x"), result.grads, ref_grads, strict=True):
        assert torch.isfinite(g).all(), name
        assert rel_err(g, e) < tol_grad and max_err(g, e) < tol_max, name
    # As accurate as the algorithm it implements (the reference at the same tiles and roundings).
    t_out, t_lse = tiled_forward(*inputs, is_vision, segment_ids, variant=variant)
    t_grads = tiled_backward(dout, *inputs, is_vision, segment_ids, t_out, t_lse, grad_lse, variant=variant)
    assert rel_err(result.out, ref_out) <= 1.5 * rel_err(t_out, ref_out) + 1e-4
    for g, tg, e in zip(result.grads, t_grads, ref_grads, strict=True):
        assert rel_err(g, e) <= 1.5 * rel_err(tg, e) + 1e-4
    return result


# ----------------------------------------------------------------------------- the kernels as they are

# A few cases for every CI run: both dtypes and head dims, both d = 128 configurations (the small
# one on the 99 KiB device it exists for), packed segments, whole blocks inside one segment (the
# unmasked path), N not a multiple of any tile, N = 1.
CI_CASES = [
    ("packed", torch.bfloat16, 128, 300, 0, None),
    ("interleaved", torch.float16, 64, 257, 0, SMEM_99K),
    ("images", torch.bfloat16, 128, 200, 1, SMEM_99K),
    ("long_segments", torch.float16, 128, 384, 0, SMEM_163K),
    ("all_vision", torch.bfloat16, 64, 1, 0, None),
]


@pytest.mark.parametrize("layout,dtype,d,n,variant,smem", CI_CASES,
                         ids=[f"{c[0]}-{str(c[1])[6:]}-d{c[2]}-n{c[3]}-v{c[4]}" for c in CI_CASES])
def test_emulated_kernels_match_oracle(harness, layout, dtype, d, n, variant, smem):
    check_case(harness, layout, dtype, d, n, variant=variant, smem_optin=smem)


FULL_CASES = [(layout, dtype, config.head_dim, config.variant)
              for layout in BRIDGED_LAYOUTS for dtype in (torch.bfloat16, torch.float16)
              for configs in tiles.CONFIGS.values() for config in configs]


@pytest.mark.slow
@pytest.mark.parametrize("layout,dtype,d,variant", FULL_CASES,
                         ids=[f"{c[0]}-{str(c[1])[6:]}-d{c[2]}-v{c[3]}" for c in FULL_CASES])
def test_emulated_kernels_match_oracle_every_layout_and_configuration(harness, layout, dtype, d, variant):
    check_case(harness, layout, dtype, d, 150 if d == 128 else 290, b=2, h=1, variant=variant, seed=40)


def test_unmasked_segment_path_is_exercised():
    """long_segments has query tiles and key blocks inside one segment below the diagonal, where
    the kernels skip the mask (so the CI case above runs that path), and packed has none."""

    def unmasked_steps(layout, n):
        is_vision, segment_ids = bridged_layout(layout, 1, n, torch.Generator().manual_seed(30))
        plan = make_plan(is_vision, segment_ids, tiles.PLAN_BLOCK_M)
        count = 0
        for t, (q_start, q_end, key_lo, _) in enumerate(plan.tiles[0].tolist()):
            if q_start == q_end:
                continue
            min_pos = int(plan.perm[0, q_start])
            for j0 in range(key_lo // 64 * 64, min_pos - 63, 64):
                count += _segment_uniform(plan, 0, t, j0, 64)
        return count

    assert unmasked_steps("long_segments", 384) > 0
    assert unmasked_steps("packed", 300) == 0


def test_launches_use_the_configured_shared_memory(harness):
    """Each configuration launches with the shared memory tiles.py computes (what cuda_status
    checks against the device), the grid the plan implies, and fits the device it is for."""
    inputs, is_vision, segment_ids, dout, grad_lse = _inputs("images", torch.bfloat16, 128, 130, 1, 1, 50)
    for config in tiles.CONFIGS[128]:
        result = emulator.run(*inputs, is_vision, segment_ids, dout=dout, variant=config.variant, binary=harness)
        result.check_clean()
        (fwd_grid, fwd_threads, fwd_smem), (_, _, delta_smem), (bwd_grid, bwd_threads, bwd_smem) = result.launches
        assert (fwd_threads, fwd_smem) == (32 * config.fwd_warps, config.fwd_smem)
        assert (bwd_threads, bwd_smem, delta_smem) == (32 * config.bwd_warps, config.bwd_smem, 0)
        assert fwd_grid == (-(-130 // tiles.PLAN_BLOCK_M) + 1, 1, 1)  # the plan's tile slots
        assert bwd_grid == (-(-130 // config.bwd_block_n), 1, 1)
    assert tiles.choose(128, SMEM_99K).variant == 1 and tiles.choose(128, SMEM_163K).variant == 0
    assert tiles.config_for(128, 1).smem <= SMEM_99K < tiles.config_for(128, 0).smem


def test_large_configuration_fails_to_launch_on_a_99k_device(harness):
    """What happened on sm_86/89/120 before the small configuration: the launch is refused
    (cudaFuncSetAttribute), reported as an error, and nothing runs."""
    inputs, is_vision, segment_ids, dout, _ = _inputs("images", torch.bfloat16, 128, 64, 1, 1, 51)
    result = emulator.run(*inputs, is_vision, segment_ids, dout=dout, variant=0, smem_optin=SMEM_99K, binary=harness)
    assert result.errors == ["forward: invalid argument"]
    assert result.launches == [] and result.grads is None


def test_warp_primitives_follow_the_ptx_fragment_tables(harness):
    """ldmatrix .x4 (plain and .trans) and mma.m16n8k16 of the emulator against the fragment
    layouts of the PTX ISA ("Warp-level matrix load instruction: ldmatrix", "Matrix fragments
    for mma.m16n8k16 with floating point type"), written out here independently."""
    result = emulator.selftest(binary=harness)
    mats = result["matrices"]  # (4, 8, 8) int: the four 8x8 b16 matrices in shared memory
    for lane in range(32):
        for i in range(4):
            row, col = lane // 4, 2 * (lane % 4)
            assert result["ldmatrix"][lane][i] == (mats[i][row][col], mats[i][row][col + 1]), (lane, i)
            assert result["ldmatrix_trans"][lane][i] == (mats[i][col][row], mats[i][col + 1][row]), (lane, i)
    # A (16 x 16), B (16 x 8), C (16 x 8) placed in the lanes' registers by the tables; D = A B + C.
    a, b, c = result["a"], result["b"], result["c"]
    expected = a.double() @ b.double() + c.double()
    d = torch.zeros(16, 8, dtype=torch.float64)
    for lane in range(32):
        g, t = lane // 4, lane % 4
        for i in range(4):
            d[g + 8 * (i // 2), 2 * t + i % 2] = result["d"][lane][i]
    torch.testing.assert_close(d, expected, rtol=1e-6, atol=1e-6)


def test_op_cuda_path_with_the_emulator_as_extension(harness, monkeypatch):
    """The op's CUDA implementations (ops._fwd_cuda, ops._bwd_cuda) with the emulator standing in
    for the compiled extension, on an emulated 99 KiB device: the plan, the variant the device
    gets and the argument order reach the kernels as bridged_attn.cpp passes them, and every
    poisoned output is written."""
    from types import SimpleNamespace

    calls = []

    def plan_of(perm, tiles_, n_text, segment, tile_segment, key_segment):
        return Plan(perm=perm, tiles=tiles_, n_text=n_text, segment=segment, block_m=tiles.PLAN_BLOCK_M,
                    tile_segment=tile_segment, key_segment=key_segment)

    def forward(q, k, v, kx, vx, is_vision, perm, tiles_, n_text, segment, tile_segment, key_segment, variant, out,
                lse):
        calls.append(("forward", variant))
        r = emulator.run(q, k, v, kx, vx, is_vision, mode="fwd", variant=variant, smem_optin=SMEM_99K,
                         plan=plan_of(perm, tiles_, n_text, segment, tile_segment, key_segment), binary=harness)
        r.check_clean()
        out.copy_(r.out)
        lse.copy_(r.lse)

    def backward(dout, q, k, v, kx, vx, is_vision, perm, tiles_, n_text, segment, tile_segment, key_segment, variant,
                 out, lse, grad_lse, *grads):
        calls.append(("backward", variant))
        r = emulator.run(q, k, v, kx, vx, is_vision, dout=dout, grad_lse=grad_lse, out=out, lse=lse, mode="bwd",
                         variant=variant, smem_optin=SMEM_99K,
                         plan=plan_of(perm, tiles_, n_text, segment, tile_segment, key_segment), binary=harness)
        r.check_clean()
        for g, e in zip(grads, r.grads, strict=True):
            g.copy_(e)

    monkeypatch.setattr(ops, "_extension", lambda q: SimpleNamespace(forward=forward, backward=backward))
    monkeypatch.setattr(ops, "device_smem_optin", lambda device: SMEM_99K)
    inputs, is_vision, segment_ids, dout, grad_lse = _inputs("packed", torch.bfloat16, 128, 150, 1, 2, 70)
    plan = make_plan(is_vision, segment_ids, tiles.PLAN_BLOCK_M).tensors()
    with ops.poison_outputs():
        out, lse = ops._fwd_cuda(*inputs, is_vision, *plan)
        grads = ops._bwd_cuda(dout, *inputs, is_vision, *plan, out, lse, grad_lse)
    assert calls == [("forward", 1), ("backward", 1)]  # the small configuration on a 99 KiB device
    ref = [t.double().requires_grad_() for t in inputs]
    ref_out, ref_lse = bridged_oracle(*ref, is_vision, segment_ids)
    ref_grads = torch.autograd.grad((ref_out * dout.double()).sum() + (ref_lse * grad_lse.double()).sum(), ref)
    assert rel_err(out, ref_out) < 1e-2 and (lse.double() - ref_lse).abs().max() < 1e-3
    for g, e in zip(grads, ref_grads, strict=True):
        assert torch.isfinite(g).all() and rel_err(g, e) < 2e-2


# ----------------------------------------------------------------------------- mutants

def _mutant_case(cache, mutations, layout="interleaved", n=140, d=64):
    binary = _build(cache, mutations)
    inputs, is_vision, segment_ids, dout, _ = _inputs(layout, torch.bfloat16, d, n, 1, 2, 60)
    result = emulator.run(*inputs, is_vision, segment_ids, dout=dout, binary=binary)
    ref = [t.double().requires_grad_() for t in inputs]
    ref_out, _ = bridged_oracle(*ref, is_vision, segment_ids)
    ref_grads = torch.autograd.grad((ref_out * dout.double()).sum(), ref)
    errors = [rel_err(result.out, ref_out)] + [rel_err(g, e) for g, e in zip(result.grads, ref_grads, strict=True)]
    return result, errors


def test_mutant_without_the_forward_loop_barrier_is_caught(emu_cache):
    """The forward's closing barrier keeps the next prefetch off the buffer warps still read.
    Run one block after another the results even stay right: only the race report shows it."""
    result, _ = _mutant_case(emu_cache, {"bridged_attn_fwd.cu": [
        ("    __syncthreads();  // the buffer is refilled two steps later\n", "\n")]})
    assert result.counts.get("shared-race", 0) > 0
    assert any("bridged_attn_fwd.cu" in m and "read-write" in m for m in result.messages)


def test_mutant_without_the_backward_ds_barrier_is_caught(emu_cache):
    result, _ = _mutant_case(emu_cache, {"bridged_attn_bwd.cu": [("      __syncthreads();  // dS^T complete\n", "\n")]})
    assert result.counts.get("shared-race", 0) > 0
    assert any("write-read" in m for m in result.messages)


def test_mutant_with_a_wrong_fragment_offset_is_caught(emu_cache):
    """B fragments of a [n][k] tile with the two 8-row/8-column halves swapped: runs clean, but
    every product that uses it is wrong."""
    result, errors = _mutant_case(emu_cache, {"bridged_attn_common.cuh": [(
        "return tile + (n0 + (lane & 7) + (lane >> 4) * 8) * ld + k0 + ((lane >> 3) & 1) * 8;",
        "return tile + (n0 + (lane & 7) + ((lane >> 3) & 1) * 8) * ld + k0 + (lane >> 4) * 8;")]})
    assert result.problems() == {}
    assert min(errors) > 0.1  # the output and all five gradients, far outside the 1e-2 tolerance


def test_mutant_waiting_for_too_few_copies_is_caught(emu_cache):
    """wait_group 2 instead of 1 leaves the current step's keys in flight while they are read."""
    result, _ = _mutant_case(emu_cache, {"bridged_attn_fwd.cu": [
        ("      cp_async_commit();\n      cp_async_wait<1>();",
         "      cp_async_commit();\n      cp_async_wait<2>();")]})
    assert result.counts.get("cp-async-hazard", 0) > 0 and result.counts.get("shared-race", 0) > 0
    assert any("cp.async to it is in flight" in m for m in result.messages)


def test_mutant_reading_one_key_past_the_sequence_is_caught(emu_cache):
    result, _ = _mutant_case(emu_cache, {"bridged_attn_fwd.cu": [
        ("      const bool ok = j < N;\n      const int jj = ok ? j : 0;",
         "      const bool ok = j <= N;\n      const int jj = ok ? j : 0;")]},
        layout="all_text", n=100)
    assert result.counts.get("global-out-of-bounds", 0) > 0
    assert any("reads 16 bytes" in m and "global-out-of-bounds" in m for m in result.messages)
