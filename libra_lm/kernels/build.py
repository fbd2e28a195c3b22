"""Build the bridged-attention CUDA extension.

- Just in time: `load_extension()` compiles on first use with torch.utils.cpp_extension.load
  (needs `ninja` and nvcc) and caches the result in the torch extensions directory
  ($TORCH_EXTENSIONS_DIR, default ~/.cache/torch_extensions); later processes load the cache.
- Ahead of time: `python -m libra_lm.kernels.build [--arch "8.0;9.0"]` runs the same build
  now, filling that cache (run it in the image or on the node before training).
- Compile only: `python -m libra_lm.kernels.build --compile-only --arch "8.0;9.0"` compiles
  every source with nvcc / the host compiler into object files and needs no GPU (CI);
  `--resources` prints ptxas' registers and spills per kernel as a table (the kernels README's).

A failed build never breaks the CPU path: the error is kept and reported by `cuda_status`.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click

EXTENSION_NAME = "libra_bridged_attn"
CSRC = Path(__file__).resolve().parent / "csrc"
CUDA_SOURCES = ("bridged_attn_fwd.cu", "bridged_attn_bwd.cu")
CPP_SOURCES = ("bridged_attn.cpp",)
HEADERS = ("bridged_attn.h", "bridged_attn_common.cuh")
# The language standard is torch's choice (C++20 for torch >= 2.10); compile_only uses C++20.
CXX_FLAGS = ["-O3"]
NVCC_FLAGS = [
    "-O3",
    "--use_fast_math",  # exp2f -> ex2.approx, as FlashAttention
    "-lineinfo",
    # torch's default flags disable the half/bfloat16 operators; the kernels use intrinsics only.
    "-U__CUDA_NO_HALF_OPERATORS__",
    "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_HALF2_OPERATORS__",
]
DEFAULT_ARCHS = "8.0;9.0"

_module = None
_error: str | None = None


def find_cuda_home() -> str | None:
    """$CUDA_HOME or $CUDA_PATH, else the toolkit around `nvcc` on PATH, else /usr/local/cuda.
    torch guesses from PATH only, which is wrong when nvcc is a wrapper script outside the
    toolkit (as /usr/local/bin/nvcc on some images)."""

    def is_toolkit(path) -> bool:
        p = Path(path)
        return (p / "bin" / "nvcc").exists() and (p / "include" / "cuda_runtime.h").exists()

    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and is_toolkit(os.environ[var]):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc:
        home = Path(nvcc).resolve().parent.parent
        if is_toolkit(home):
            return str(home)
    if is_toolkit("/usr/local/cuda"):
        return "/usr/local/cuda"
    return None


def _cpp_extension(cuda_home: str):
    # cpp_extension reads CUDA_HOME once, at import; point it (and its subprocesses) at ours.
    os.environ["CUDA_HOME"] = cuda_home
    import torch.utils.cpp_extension as cpp_extension

    cpp_extension.CUDA_HOME = cuda_home
    return cpp_extension


def load_extension(verbose: bool = False):
    """The compiled module, building it on first use. Raises RuntimeError with the reason
    (remembered, so a failed build is not retried in every call)."""
    global _module, _error
    if _module is not None:
        return _module
    if _error is not None:
        raise RuntimeError(_error)
    try:
        cuda_home = find_cuda_home()
        if cuda_home is None:
            raise RuntimeError("nvcc not found: install the CUDA toolkit or set CUDA_HOME to it")
        if shutil.which("ninja") is None and not (Path(sys.executable).parent / "ninja").exists():
            raise RuntimeError("ninja not found: `pip install ninja` (torch needs it to build extensions)")
        cpp_extension = _cpp_extension(cuda_home)
        _module = cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(CSRC / s) for s in CPP_SOURCES + CUDA_SOURCES],
            extra_cflags=CXX_FLAGS,
            extra_cuda_cflags=NVCC_FLAGS,
            extra_include_paths=[str(CSRC)],
            verbose=verbose,
        )
    except Exception as e:  # any build or load failure: keep the message, never crash callers
        detail = str(e).strip().splitlines()
        _error = f"the bridged-attention CUDA extension failed to build: {detail[-1] if detail else type(e).__name__}"
        if verbose:
            raise
        raise RuntimeError(_error) from e
    return _module


def _arch_gencode(archs: str) -> list[str]:
    """"8.0;9.0" (torch's TORCH_CUDA_ARCH_LIST syntax, "+PTX" allowed) -> nvcc -gencode flags."""
    flags = []
    for item in archs.replace(",", ";").replace(" ", ";").split(";"):
        if not item:
            continue
        ptx = item.endswith("+PTX")
        num = item.removesuffix("+PTX").replace(".", "")
        if not num.isdigit():
            raise ValueError(f"bad CUDA arch {item!r}: expected numbers such as 8.0 or 9.0 (optionally +PTX)")
        flags.append(f"-gencode=arch=compute_{num},code=sm_{num}")
        if ptx:
            flags.append(f"-gencode=arch=compute_{num},code=compute_{num}")
    if not flags:
        raise ValueError(f"no CUDA arch in {archs!r}")
    return flags


def compile_only(archs: str = DEFAULT_ARCHS, build_dir: str | Path | None = None, werror: bool = False,
                 verbose: bool = False, resources: bool = False) -> list[Path]:
    """Compile every source to an object file (no GPU, no link, no import). Returns the objects;
    raises RuntimeError with the compiler output on failure. `resources`: print ptxas' registers
    and spills per kernel as a markdown table instead of the compiler output."""
    import torch

    cuda_home = find_cuda_home()
    if cuda_home is None:
        raise RuntimeError("nvcc not found: install the CUDA toolkit or set CUDA_HOME to it")
    cpp_extension = _cpp_extension(cuda_home)
    out_dir = Path(build_dir) if build_dir else Path(tempfile.mkdtemp(prefix="libra_kernels_"))
    out_dir.mkdir(parents=True, exist_ok=True)
    nvcc = str(Path(cuda_home) / "bin" / "nvcc")
    gencode = _arch_gencode(archs)

    commands = []
    for src in CUDA_SOURCES:
        cmd = [nvcc, "-c", str(CSRC / src), "-o", str(out_dir / (src + ".o")), "-std=c++20", *NVCC_FLAGS,
               *gencode,
               f"-I{CSRC}", "-Xcompiler", "-fPIC", "-Xcompiler", "-Wall"]
        if werror:
            cmd += ["-Werror", "all-warnings"]
        if verbose or resources:
            cmd += ["-Xptxas=-v"]  # registers, shared memory and spills per kernel
        commands.append(cmd)
    try:
        torch_includes = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # torch < 2.5 spells it `cuda=True`
        torch_includes = cpp_extension.include_paths(cuda=True)
    includes = [*torch_includes, sysconfig.get_paths()["include"], str(CSRC)]
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cxx = os.environ.get("CXX", "c++")
    for src in CPP_SOURCES:
        cmd = [cxx, "-c", str(CSRC / src), "-o", str(out_dir / (src + ".o")), "-std=c++20", *CXX_FLAGS,
               "-fPIC", "-Wall",
               *(f"-I{p}" for p in includes), f"-DTORCH_EXTENSION_NAME={EXTENSION_NAME}",
               "-DTORCH_API_INCLUDE_EXTENSION_H", f"-D_GLIBCXX_USE_CXX11_ABI={abi}"]
        if werror:
            cmd.append("-Werror")
        commands.append(cmd)

    def run(cmd):
        if verbose:
            click.echo(" ".join(cmd), err=True)
        return subprocess.run(cmd, capture_output=True, text=True)

    # The sources are independent: compile them side by side.
    with ThreadPoolExecutor(max_workers=max(1, min(len(commands), os.cpu_count() or 1))) as pool:
        results = list(pool.map(run, commands))
    table = []
    for cmd, proc in zip(commands, results, strict=True):
        output = (proc.stdout + proc.stderr).strip()
        if proc.returncode != 0:
            raise RuntimeError(f"compiling {Path(cmd[2]).name} failed:\n{output}")
        if resources:
            table += ptxas_table(output)
        elif output:
            click.echo(output, err=True)
    if resources:
        click.echo("| arch | kernel | dtype | d | tile (BM x BN x warps) | registers | spill stores / loads (B) |")
        click.echo("|---|---|---|---|---|---|---|")
        for r in sorted(table, key=lambda r: (r["arch"], r["kernel"], r["head_dim"], r["tile"], r["dtype"])):
            click.echo(f"| {r['arch']} | {r['kernel']} | {r['dtype']} | {r['head_dim']} | {r['tile']} | "
                       f"{r['registers']} | {r['spill_stores']} / {r['spill_loads']} |")
    return [Path(cmd[4]) for cmd in commands]


def ptxas_table(text: str) -> list[dict]:
    """ptxas -v output -> one row per kernel: arch, kernel, dtype, head dim, tile (BM, BN, warps),
    registers, spill stores and loads (bytes)."""
    rows = []
    pattern = (r"Compiling entry function '(\S+)' for '(sm_\d+)'\s*\n.*?(\d+) bytes stack frame, (\d+) bytes spill "
               r"stores, (\d+) bytes spill loads\s*\n.*?Used (\d+) registers")
    for m in re.finditer(pattern, text, re.S):
        name, arch, _, stores, loads, regs = m.groups()
        k = re.search(r"(fwd|bwd|bwd_delta)_kernelI(6__half|13__nv_bfloat16)Li(\d+)E(?:Li(\d+)ELi(\d+)ELi(\d+)E)?",
                      name)
        if k is None:
            continue
        tile = "x".join(k.group(i) for i in (4, 5, 6)) if k.group(4) else "-"
        rows.append({"arch": arch, "kernel": k.group(1), "dtype": "fp16" if "half" in k.group(2) else "bf16",
                     "head_dim": int(k.group(3)), "tile": tile, "registers": int(regs), "spill_stores": int(stores),
                     "spill_loads": int(loads)})
    return rows


@click.command()
@click.option("--compile-only", "compile_only_flag", is_flag=True,
              help="Compile the sources to object files without a GPU (no link, no import): the CI check.")
@click.option("--arch", default=None,
              help=f'CUDA archs, TORCH_CUDA_ARCH_LIST syntax, e.g. "{DEFAULT_ARCHS}". Default: '
                   "$TORCH_CUDA_ARCH_LIST, else the visible GPU, else " + DEFAULT_ARCHS + ".")
@click.option("--build-dir", type=click.Path(file_okay=False), default=None,
              help="Where --compile-only writes the objects (default: a temporary folder, removed after).")
@click.option("--werror", is_flag=True, help="Treat compiler warnings as errors (--compile-only).")
@click.option("--verbose", "-v", is_flag=True, help="Show the compiler commands and ptxas resource usage.")
@click.option("--resources", is_flag=True,
              help="With --compile-only: print registers and spills of every kernel (ptxas -v) as a table.")
def main(compile_only_flag, arch, build_dir, werror, verbose, resources):
    """Build the fused bridged-attention CUDA extension ahead of time, or compile-check it."""
    if resources and not compile_only_flag:
        raise click.UsageError("--resources goes with --compile-only")
    if compile_only_flag:
        archs = arch or os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCHS
        try:
            if build_dir is None:
                with tempfile.TemporaryDirectory(prefix="libra_kernels_") as tmp:
                    objects = compile_only(archs, tmp, werror=werror, verbose=verbose, resources=resources)
            else:
                objects = compile_only(archs, build_dir, werror=werror, verbose=verbose, resources=resources)
        except (RuntimeError, ValueError) as e:
            raise click.ClickException(str(e)) from e
        click.echo(f"compiled {len(objects)} sources for {archs}: {', '.join(o.name for o in objects)}")
        return
    import torch

    if arch:
        os.environ["TORCH_CUDA_ARCH_LIST"] = arch
    elif "TORCH_CUDA_ARCH_LIST" not in os.environ and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_ARCHS
    try:
        module = load_extension(verbose=verbose)
    except Exception as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"built {EXTENSION_NAME} for {os.environ.get('TORCH_CUDA_ARCH_LIST', 'the visible GPU')}: "
               f"{module.__file__}")


if __name__ == "__main__":
    main()
