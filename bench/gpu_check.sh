#!/usr/bin/env bash
# The GPU check of the fused bridged-attention kernels, prepared to run unedited on a fresh GPU
# machine in under 8 minutes and to write one results file. Two steps:
#
#   1. Where there is network (any x86-64 Linux, once; build/ is git-ignored):
#        bash bench/gpu_check.sh --fetch-wheels
#      downloads into build/gpu_wheels/ the pure-Python packages a stock PyTorch image lacks
#      (vector-quantize-pytorch and its helpers, which `import libra_lm` needs; open_clip_torch
#      for the encode benchmark), as Python 3.12 wheels.
#   2. On the GPU machine, from the repository root, with build/gpu_wheels/ copied along:
#        bash bench/gpu_check.sh [RESULTS_FILE]
#      RESULTS_FILE defaults to $OUT/gpu_check.md when $OUT is set, else ./gpu_check.md.
#
# Needs python3 with torch (CUDA), nvcc and ninja on the machine; installs the wheels into a
# temporary folder (nothing system-wide). Steps, each with a time limit inside an overall 470 s
# budget; a failed or timed-out step is recorded and the next one runs:
#   environment         GPU, driver, torch, nvcc, the shared memory the device lets a kernel use
#   install             the wheels of build/gpu_wheels/ (when present) into /tmp/libra_site
#   build               the extension for the visible GPU's arch (python -m libra_lm.kernels.build)
#   cuda tests          tests/test_lm_kernels.py -m cuda: every layout, dtype, head dim and tile
#                       configuration against the fp64 oracle, opcheck, torch.compile, checkpointing
#   racecheck, memcheck compute-sanitizer on one small forward+backward (bench/attention.py --one-case)
#   attention bench     bench/attention.py: d=128 bf16 causal, N = 1k..8k, cuda / cuda-small / flex /
#                       sdpa-flash (no bridge): forward and forward+backward TFLOP/s, peak memory
#   encode bench        bench/encode.py: libra-l336 (fresh weights), fp32 vs bf16 throughput, id agreement
#   lm step             bench/lm_step.py --config 1b: the ~1B routed LM's training step
set -uo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
WHEELS="$ROOT/build/gpu_wheels"
# name==version: the versions the project's tests run with (pip list in .venv).
WHEEL_PINS=(vector-quantize-pytorch==1.32.0 einx==0.4.3 frozendict==2.5.1 loguru==0.7.3
            torch-einops-utils==0.2.0 open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4)

if [[ "${1:-}" == "--fetch-wheels" ]]; then
  mkdir -p "$WHEELS"
  for pin in "${WHEEL_PINS[@]}"; do
    python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform any -d "$WHEELS" "$pin" || { echo "could not download $pin" >&2; exit 1; }
  done
  ls -1 "$WHEELS"
  exit 0
fi

RESULTS="${1:-${OUT:+$OUT/gpu_check.md}}"
RESULTS="${RESULTS:-$ROOT/gpu_check.md}"
START=$(date +%s)
DEADLINE=$((START + ${GPU_CHECK_BUDGET:-470}))  # seconds for all steps; the override is for trying the script
LOGS="$(mktemp -d /tmp/libra_gpu_check.XXXXXX)"
export ROOT PYTHONUNBUFFERED=1 PYTHONPATH="$ROOT:/tmp/libra_site" TORCH_EXTENSIONS_DIR=/tmp/libra_torch_extensions
export MAX_JOBS="$(nproc)" HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

{
  echo "# GPU check of the fused bridged-attention kernels"
  echo
  echo "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')"\
       "$(git diff --quiet 2>/dev/null || echo '(with uncommitted changes)')"
} > "$RESULTS"

# run_step NAME LIMIT_SECONDS LINES COMMAND...: runs COMMAND with a time limit (never past the
# deadline) and appends its exit status, duration and last LINES lines of output to the results.
run_step() {
  local name="$1" limit="$2" lines="$3"
  shift 3
  local now left rc log
  now=$(date +%s)
  left=$((DEADLINE - now))
  ((limit > left)) && limit=$left
  {
    echo
    echo "## $name"
    echo
    echo "\`$*\`"
    echo
  } >> "$RESULTS"
  if ((limit < 10)); then
    echo "skipped: the time budget is spent" >> "$RESULTS"
    return 0
  fi
  log="$LOGS/$(echo "$name" | tr ' /' '__').log"
  if declare -F "$1" > /dev/null; then  # a step function of this script: run it in a child bash
    timeout -k 10 "$limit" bash -c "$(declare -f "$1"); $(printf '%q ' "$@")" > "$log" 2>&1
  else
    timeout -k 10 "$limit" "$@" > "$log" 2>&1
  fi
  rc=$?
  {
    if ((rc == 124 || rc == 137)); then
      echo "timed out after ${limit} s"
    else
      echo "exit status $rc, $(($(date +%s) - now)) s"
    fi
    echo
    echo '```'
    tail -n "$lines" "$log"
    echo '```'
  } >> "$RESULTS"
  echo "$name: exit $rc ($(($(date +%s) - now)) s)"
  return 0
}

step_environment() {
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv || true
  nvcc --version | tail -n 2 || true
  python3 - <<'EOF'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"{p.name}: compute capability {p.major}.{p.minor}, {p.multi_processor_count} SMs, "
          f"opt-in shared memory per block {getattr(p, 'shared_memory_per_block_optin', 0) // 1024} KiB")
EOF
}

step_install() {
  if compgen -G "$ROOT/build/gpu_wheels/*.whl" > /dev/null; then
    python3 -m pip install --quiet --no-index --no-deps --no-compile --upgrade --target /tmp/libra_site \
      "$ROOT"/build/gpu_wheels/*.whl || return 1
  else
    echo "no wheels in build/gpu_wheels (run bench/gpu_check.sh --fetch-wheels where there is network)"
  fi
  python3 - <<'EOF'
import importlib
for name in ("vector_quantize_pytorch", "open_clip", "ninja", "pytest", "transformers"):
    try:
        importlib.import_module(name)
        print(f"{name}: ok")
    except ImportError as e:
        print(f"{name}: MISSING ({e})")
import libra_lm.kernels  # noqa: F401  (needs vector_quantize_pytorch through libra_lm)
print("libra_lm.kernels imports")
EOF
}

step_build() {
  local arch
  arch=$(python3 -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || return 1
  python3 -m libra_lm.kernels.build --arch "$arch"
}

step_sanitize() {
  local tool="$1" filter=()
  compute-sanitizer --help 2>/dev/null | grep -q -- "--kernel-name" && filter=(--kernel-name kns=bridged_attn)
  compute-sanitizer --tool "$tool" "${filter[@]}" --error-exitcode 3 \
    python3 bench/attention.py --one-case 384 --head-dim 128
}

# In order of what the issue needs most; whatever the budget leaves out is recorded as skipped.
run_step "environment" 30 40 step_environment
run_step "install" 30 20 step_install
run_step "build" 150 50 step_build
run_step "cuda tests" 170 40 python3 -m pytest -q -p no:cacheprovider tests/test_lm_kernels.py -m cuda -rs
run_step "attention bench" 130 40 python3 bench/attention.py --seqlens 1024,2048,4096,8192 \
  --backends cuda,cuda-small,flex,sdpa-flash --warmup 3 --iters 10 --json "$LOGS/attention.json"
run_step "racecheck" 50 25 step_sanitize racecheck
run_step "memcheck" 35 25 step_sanitize memcheck
run_step "lm step" 70 25 python3 bench/lm_step.py --config 1b --device cuda --batch-size 4 --steps 5 --warmup 2
run_step "encode bench" 50 25 python3 bench/encode.py --preset libra-l336 --num-images 256 --batch-size 64 \
  --num-workers 8 --device cuda
if [[ -f "$LOGS/attention.json" ]]; then
  { echo; echo "## attention bench rows (JSON)"; echo; echo '```json'; cat "$LOGS/attention.json"; echo; echo '```'; } \
    >> "$RESULTS"
fi
echo >> "$RESULTS"
echo "total $(($(date +%s) - START)) s" >> "$RESULTS"
echo "results: $RESULTS"
