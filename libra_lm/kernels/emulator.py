"""The fused kernels' CUDA sources, run on the CPU: a test backend that needs no GPU.

`build()` compiles csrc/bridged_attn_fwd.cu and csrc/bridged_attn_bwd.cu unmodified with the host
C++ compiler against the emulation layer in emu/ (cuda_emu.h, emu_runtime.cpp: one fiber per
CUDA thread, block barriers, warp collectives with the PTX fragment layouts, cp.async landing at
its wait_group, shadow memory for races and bounds) and links the harness (emu/harness.cpp).
`run()` executes the kernels' host entry points on torch tensors through that binary, with the
same query-partition plan as the CUDA op, and returns the outputs with everything the emulator
reported. `mutations` builds a variant of the sources with text replaced (the tests' mutants).

Needs GCC (for its -fsanitize=kernel-address instrumentation) and the CUDA toolkit's headers
(cuda_runtime.h, cuda_bf16.h, cuda_fp16.h; no GPU, no nvcc run). Binaries are cached by the
hash of everything that goes into them in $LIBRA_EMULATOR_CACHE (default
~/.cache/libra/emulator). See the "Emulator" section of libra_lm/kernels/README.md.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

from . import tiles
from .build import CSRC, CUDA_SOURCES, HEADERS, find_cuda_home
from .partition import make_plan

EMU = Path(__file__).resolve().parent / "emu"
EMU_SOURCES = ("emu_runtime.cpp", "harness.cpp")
EMU_KERNEL_SOURCES = ("selftest.cpp",)  # instrumented like the kernels
EMU_HEADERS = ("cuda_emu.h", "emu_runtime.h")
CACHE_ENV = "LIBRA_EMULATOR_CACHE"

COMMON_FLAGS = ["-std=c++20", "-O2", "-g1", "-fno-strict-aliasing", "-DLIBRA_EMULATION", "-Wall",
                "-Wno-unknown-pragmas"]
# Every load and store of the kernel sources becomes a call of emu_runtime.cpp's checks.
SANITIZE_FLAGS = ["-fsanitize=kernel-address", "--param", "asan-instrumentation-with-call-threshold=0",
                  "--param", "asan-stack=0", "--param", "asan-globals=0", "-fno-sanitize-address-use-after-scope"]

# Problems the emulator reports (report.txt "count" lines); any of them fails `check_clean`.
PROBLEM_KINDS = (
    "shared-race", "shared-uninitialized", "shared-out-of-bounds", "misaligned-shared", "cp-async-hazard",
    "cp-async-unwaited", "cp-async-not-shared", "misaligned-cp-async", "ldmatrix-not-shared", "global-race",
    "global-out-of-bounds", "misaligned-global", "write-to-input", "warp-divergence", "barrier-divergence",
    "barrier-after-exit", "partial-warp", "deadlock", "launch-error",
)


class EmulatorUnavailable(RuntimeError):
    """No host compiler with the needed instrumentation, or no CUDA headers."""


def _compiler() -> str:
    cxx = os.environ.get("CXX") or shutil.which("g++")
    if not cxx:
        raise EmulatorUnavailable("the kernel emulator needs g++ (GCC >= 10): install it or set CXX")
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    if "clang" in version.lower() or not version:
        raise EmulatorUnavailable(f"the kernel emulator needs GCC (its kernel-address instrumentation); {cxx} is not")
    return cxx


def _cuda_include() -> Path:
    home = find_cuda_home()
    include = Path(home) / "include" if home else None
    if include is None or not (include / "cuda_bf16.h").exists():
        raise EmulatorUnavailable("the kernel emulator needs the CUDA toolkit's headers (cuda_runtime.h, cuda_bf16.h): "
                                  "install the toolkit or set CUDA_HOME to it")
    return include


def _apply_mutations(src: Path, mutations: dict[str, list[tuple[str, str]]]) -> None:
    for name, edits in mutations.items():
        path = src / name
        text = path.read_text()
        for old, new in edits:
            count = text.count(old)
            if count != 1:
                raise ValueError(f"mutation of {name}: {old!r} occurs {count} times, expected exactly once")
            text = text.replace(old, new)
        path.write_text(text)


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for part in parts:
        h.update(part if isinstance(part, bytes) else str(part).encode())
        h.update(b"\0")
    return h.hexdigest()[:20]


def _install(path: Path, dest: Path) -> None:
    """Copy into the cache under a temporary name, then rename: a reader never sees half a file."""
    partial = dest.with_name(f".{dest.name}.{os.getpid()}.tmp")
    shutil.copy2(path, partial)
    os.replace(partial, dest)


def build(mutations: dict[str, list[tuple[str, str]]] | None = None, cache_dir: str | Path | None = None,
          verbose: bool = False) -> Path:
    """Compile the harness (or a mutant of the sources) and return its path. Objects and
    binaries are cached by the hash of what goes into them, so a mutant recompiles only the
    files it changes (all of them when it changes a header)."""
    cxx = _compiler()
    include = _cuda_include()
    cache = Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "libra" / "emulator")
    cache.mkdir(parents=True, exist_ok=True)
    compiler_id = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    with tempfile.TemporaryDirectory(prefix="libra_emu_") as tmp:
        tmp = Path(tmp)
        src = tmp / "csrc"
        src.mkdir()
        for name in (*CUDA_SOURCES, *HEADERS):
            shutil.copy(CSRC / name, src / name)
        _apply_mutations(src, mutations or {})
        headers = b"".join([*((src / n).read_bytes() for n in HEADERS), *((EMU / n).read_bytes() for n in EMU_HEADERS)])
        # Source paths in the debug info (the reports' call sites) name the package's folders.
        flags = [*COMMON_FLAGS, f"-fdebug-prefix-map={src}={CSRC}", f"-I{src}", f"-I{EMU}", f"-I{include}"]
        units = [(src / n, True) for n in CUDA_SOURCES] + [(EMU / n, True) for n in EMU_KERNEL_SOURCES]
        units += [(EMU / n, False) for n in EMU_SOURCES]
        objects, commands = [], []
        for path, instrumented in units:
            extra = [*SANITIZE_FLAGS, "-x", "c++"] if instrumented else []
            key = _digest(compiler_id, include, extra, COMMON_FLAGS, path.read_bytes(), headers)
            obj = cache / f"{path.name}-{key}.o"
            objects.append(obj)
            if not obj.exists():
                commands.append((obj, [cxx, *flags, *extra, "-c", str(path), "-o", str(tmp / obj.name)]))
        binary = cache / f"harness-{_digest(*(o.name for o in objects))}"
        if binary.exists():
            return binary
        with ThreadPoolExecutor(max_workers=max(1, min(len(commands), os.cpu_count() or 1))) as pool:
            results = list(pool.map(lambda c: subprocess.run(c[1], capture_output=True, text=True), commands))
        for (obj, cmd), proc in zip(commands, results, strict=True):
            if proc.returncode != 0:
                raise RuntimeError(f"compiling {Path(cmd[-3]).name} for the emulator failed:\n{proc.stderr}")
            if verbose and proc.stderr:
                print(proc.stderr)
            _install(tmp / obj.name, obj)
        exe = tmp / "harness"
        proc = subprocess.run([cxx, "-no-pie", *map(str, objects), "-o", str(exe)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"linking the emulator failed:\n{proc.stderr}")
        _install(exe, binary)
    return binary


@dataclass
class EmulatorResult:
    """Outputs of one run and what the emulator reported. `counts`: occurrences per problem
    kind; `messages`: one line per kind and call site (symbolized); `unwritten`: bytes of each
    output no kernel wrote; `errors`: launch errors returned by the host entry points;
    `launches`: (grid, threads, dynamic shared memory bytes) of every launch that ran."""

    out: torch.Tensor | None = None
    lse: torch.Tensor | None = None
    grads: tuple[torch.Tensor, ...] | None = None  # dq, dk, dv, dk_x, dv_x
    counts: dict[str, int] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    unwritten: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    launches: list[tuple[tuple[int, int, int], int, int]] = field(default_factory=list)

    def problems(self) -> dict[str, int]:
        found = {k: n for k, n in self.counts.items() if k in PROBLEM_KINDS and n}
        found.update({f"unwritten {k}": n for k, n in self.unwritten.items() if n})
        found.update({f"error {e}": 1 for e in self.errors})
        return found

    def check_clean(self) -> None:
        """Raise AssertionError listing every problem when there is one."""
        problems = self.problems()
        if problems:
            raise AssertionError(f"emulator reported {problems}:\n" + "\n".join(self.messages))


def _write(t: torch.Tensor, path: Path) -> None:
    t = t.detach().cpu().contiguous()
    if t.dtype in (torch.bfloat16, torch.float16):
        t = t.view(torch.int16)
    elif t.dtype == torch.bool:
        t = t.to(torch.uint8)
    path.write_bytes(t.numpy().tobytes())


def _read(path: Path, dtype: torch.dtype, shape) -> torch.Tensor:
    data = bytearray(path.read_bytes())
    raw_dtype = torch.int16 if dtype in (torch.bfloat16, torch.float16) else dtype
    return torch.frombuffer(data, dtype=raw_dtype).view(dtype).reshape(shape).clone()


def _symbolize(binary: Path, messages: list[str]) -> list[str]:
    """Replace each "at 0x..." call site with the source location (addr2line, when present)."""
    addr2line = shutil.which("addr2line")
    if not addr2line or not messages:
        return messages
    out = []
    for m in messages:
        head, sep, rest = m.partition(" at 0x")
        if not sep:
            out.append(m)
            continue
        addr, _, body = rest.partition(":")
        try:
            pc = int(addr, 16) - 1  # a return address: the call is just before it
        except ValueError:
            out.append(m)
            continue
        proc = subprocess.run([addr2line, "-e", str(binary), "-f", "-C", "-i", "-p", hex(pc)], capture_output=True,
                              text=True)
        where = " <- ".join(line.split(" at ")[-1].replace("(inlined by) ", "").strip()
                            for line in proc.stdout.strip().splitlines()) or hex(pc)
        out.append(f"{head} at {where}:{body}")
    return out


def _execute(binary: Path, folder: Path, timeout: float) -> EmulatorResult:
    """Run the harness on a prepared folder and read its report."""
    proc = subprocess.run([str(binary), str(folder)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"the emulator failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    result = EmulatorResult()
    messages = []
    for line in (folder / "report.txt").read_text().splitlines():
        kind, _, rest = line.partition(" ")
        if kind == "count":
            name, _, count = rest.rpartition(" ")
            result.counts[name] = int(count)
        elif kind == "unwritten":
            name, _, count = rest.rpartition(" ")
            result.unwritten[name] = int(count)
        elif kind == "message":
            messages.append(rest)
        elif kind == "error":
            result.errors.append(rest)
        elif kind == "launch":
            gx, gy, gz, threads, smem = (int(x) for x in rest.split())
            result.launches.append(((gx, gy, gz), threads, smem))
    result.messages = _symbolize(binary, messages)
    return result


def selftest(binary: Path | None = None, seed: int = 0) -> dict:
    """Run emu/selftest.cpp (one warp: ldmatrix .x4, .x4.trans, one bf16 mma.m16n8k16) on random
    inputs. Returns the inputs and what each lane received: "matrices" [4][8][8] (the b16 bits in
    shared memory), "ldmatrix" / "ldmatrix_trans" [lane][register] = (low, high) 16-bit halves,
    "a" (16, 16), "b" (16, 8), "c" (16, 8) and "d" [lane][i]: the mma operands, placed in the
    lanes' registers by the PTX ISA tables for m16n8k16, and the lanes' results."""
    binary = binary or build()
    gen = torch.Generator().manual_seed(seed)
    mats = torch.randint(0, 2**16, (4, 8, 8), generator=gen, dtype=torch.int32)
    a = torch.randn(16, 16, generator=gen).to(torch.bfloat16).float()
    b = torch.randn(16, 8, generator=gen).to(torch.bfloat16).float()
    c = torch.randn(16, 8, generator=gen)
    bits = lambda x: int(torch.tensor([x], dtype=torch.bfloat16).view(torch.int16).item()) & 0xFFFF  # noqa: E731
    a_regs, b_regs, c_regs = [], [], []
    for lane in range(32):
        g, t = lane // 4, lane % 4
        # A: register r holds rows g (+8 for r = 1, 3), columns 2t, 2t+1 (+8 for r = 2, 3).
        for r in range(4):
            row, col = g + 8 * (r % 2), 2 * t + 8 * (r // 2)
            a_regs.append(bits(a[row, col]) | bits(a[row, col + 1]) << 16)
        # B: register r holds rows (k) 2t, 2t+1 (+8 for r = 1), column g.
        for r in range(2):
            k = 2 * t + 8 * r
            b_regs.append(bits(b[k, g]) | bits(b[k + 1, g]) << 16)
        # C: c0, c1 row g, columns 2t, 2t+1; c2, c3 row g+8.
        c_regs += [float(c[g + 8 * (i // 2), 2 * t + i % 2]) for i in range(4)]
    with tempfile.TemporaryDirectory(prefix="libra_emu_selftest_") as tmp:
        tmp = Path(tmp)
        (tmp / "meta.txt").write_text("mode selftest\n")
        (tmp / "mats.bin").write_bytes(mats.to(torch.int32).numpy().astype("<u2").tobytes())
        (tmp / "a.bin").write_bytes(torch.tensor(a_regs, dtype=torch.int64).numpy().astype("<u4").tobytes())
        (tmp / "b.bin").write_bytes(torch.tensor(b_regs, dtype=torch.int64).numpy().astype("<u4").tobytes())
        (tmp / "c.bin").write_bytes(torch.tensor(c_regs, dtype=torch.float32).numpy().tobytes())
        result = _execute(binary, tmp, timeout=120)
        result.check_clean()
        ld = [int(x) for x in _read(tmp / "ld.bin", torch.int32, (128,)).tolist()]
        ldt = [int(x) for x in _read(tmp / "ldt.bin", torch.int32, (128,)).tolist()]
        d = _read(tmp / "d.bin", torch.float32, (32, 4))

    def halves(words):
        return [[((w & 0xFFFF), (w >> 16) & 0xFFFF) for w in words[4 * lane:4 * lane + 4]] for lane in range(32)]

    return {"matrices": mats.tolist(), "ldmatrix": halves(ld), "ldmatrix_trans": halves(ldt), "a": a, "b": b, "c": c,
            "d": d.tolist()}


def run(q, k, v, k_x, v_x, is_vision, segment_ids=None, *, dout=None, grad_lse=None, out=None, lse=None,
        mode: str = "fwdbwd", variant: int = 0, smem_optin: int | None = None, binary: Path | None = None,
        plan=None, timeout: float = 900) -> EmulatorResult:
    """Run the emulated kernels. q..v_x (B, H, N, d) bf16 or fp16, is_vision (B, N) bool,
    segment_ids (B, N) ints or None. mode "fwd" (out, lse), "bwd" (needs out, lse, dout) or
    "fwdbwd" (the forward's out and lse feed the backward, as in the op; needs dout).
    variant: the tile configuration (tiles.py); smem_optin: the emulated device's opt-in
    shared memory per block in bytes (default sm_90's 227 KiB); plan: a partition.Plan to use
    instead of building one from is_vision and segment_ids."""
    if mode not in ("fwd", "bwd", "fwdbwd"):
        raise ValueError(f"mode must be fwd, bwd or fwdbwd, got {mode!r}")
    if q.dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"the kernels take bfloat16 or float16, got {q.dtype}")
    if mode != "fwd" and dout is None:
        raise ValueError("the backward needs dout")
    if mode == "bwd" and (out is None or lse is None):
        raise ValueError("mode 'bwd' needs the forward's out and lse")
    binary = binary or build()
    b, h, n, d = q.shape
    if plan is None:
        seg = None if segment_ids is None else segment_ids.cpu()
        plan = make_plan(is_vision.cpu().bool(), seg, tiles.PLAN_BLOCK_M)
    meta = {"dtype": "bf16" if q.dtype == torch.bfloat16 else "fp16", "head_dim": d, "variant": variant, "B": b,
            "H": h, "N": n, "T": plan.num_tiles, "mode": mode, "segment": int(plan.segment is not None)}
    if smem_optin is not None:
        meta["smem_optin"] = int(smem_optin)
    with tempfile.TemporaryDirectory(prefix="libra_emu_run_") as tmp:
        tmp = Path(tmp)
        (tmp / "meta.txt").write_text("".join(f"{key} {value}\n" for key, value in meta.items()))
        for name, t in (("q", q), ("k", k), ("v", v), ("kx", k_x), ("vx", v_x), ("is_vision", is_vision),
                        ("perm", plan.perm), ("tiles", plan.tiles), ("n_text", plan.n_text)):
            _write(t, tmp / f"{name}.bin")
        if plan.segment is not None:
            for name in ("segment", "tile_segment", "key_segment"):
                _write(getattr(plan, name), tmp / f"{name}.bin")
        if mode != "fwd":
            _write(dout.to(q.dtype), tmp / "dout.bin")
            if grad_lse is not None:
                _write(grad_lse.float(), tmp / "grad_lse.bin")
        if mode == "bwd":
            _write(out.to(q.dtype), tmp / "out.bin")
            _write(lse.float(), tmp / "lse.bin")
        result = _execute(binary, tmp, timeout)
        if mode != "bwd" and (tmp / "out.bin").exists():
            result.out = _read(tmp / "out.bin", q.dtype, q.shape)
            result.lse = _read(tmp / "lse.bin", torch.float32, q.shape[:3])
        if mode != "fwd" and (tmp / "dq.bin").exists():
            names = ("dq", "dk", "dv", "dkx", "dvx")
            result.grads = tuple(_read(tmp / f"{name}.bin", q.dtype, q.shape) for name in names)
    return result
