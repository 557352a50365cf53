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
# Triton 3.6's interpreter breaks with NumPy >= 2.4 (the GPU machines never run the interpreter).
COMPAT_PKGS ?= torch==2.11.0 triton==3.6.0 "numpy<2.4" transformers==5.17.0
COMPAT_TESTS ?= tests/ops tests/test_validate.py tests/test_build.py

.PHONY: setup test demo bench bench-all info clean setup-compat test-compat

setup: $(VENV)/.ivl-installed

$(VENV)/.ivl-installed: pyproject.toml setup.py requirements-test.txt $(CSRC)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)"
	$(BIN)/python -m pip install -q -r requirements-test.txt
	$(BIN)/python -m pip install --no-build-isolation -e .
	$(BIN)/ivl-kernels info
	touch $@

test: setup
	$(BIN)/python -m pytest tests -q

demo: setup
	$(BIN)/ivl-kernels demo

bench: setup
	$(BIN)/ivl-kernels bench logits

bench-all: setup
	$(BIN)/ivl-kernels bench all

info: setup
	$(BIN)/ivl-kernels info

setup-compat: $(COMPAT_VENV)/.ivl-installed

# The extension must compile against torch 2.11's headers for the H100/H200 (sm_90): a compile error fails here,
# as it would in the GPU session's build step. Its .so is named for Python 3.12, beside .venv's own build.
$(COMPAT_VENV)/.ivl-installed: pyproject.toml setup.py $(CSRC)
	test -x $(COMPAT_BIN)/python || $(COMPAT_PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_BIN)/python -m pip install -q --upgrade pip
	$(COMPAT_BIN)/python -m pip install -q $(COMPAT_PKGS) "pytest>=8" ninja "setuptools>=69" wheel
	IVL_KERNELS_REQUIRE_CUDA_BUILD=1 TORCH_CUDA_ARCH_LIST=9.0 \
	  $(COMPAT_BIN)/python -m pip install --no-build-isolation -e .
	$(COMPAT_BIN)/ivl-kernels info
	touch $@

# Op, validation and build tests on that stack (Triton kernels under the interpreter, plus the ahead-of-time
# Triton compile for sm_80/sm_90).
test-compat: setup-compat
	IVL_KERNELS_REQUIRE_CUDA_BUILD=1 TRITON_INTERPRET=1 $(COMPAT_BIN)/python -m pytest $(COMPAT_TESTS) -q

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info ivl_kernels/_C*.so
