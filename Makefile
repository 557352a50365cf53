# One entry point. `make demo`: set up and run the demo; `make test`: set up and run the test suite.
# Everything is installed into .venv by `make setup` (idempotent; re-run after dependency changes).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CUDA 13.0 build of torch: the CUDA extension compiles against it when nvcc is present.
TORCH ?= torch==2.14.1
export CUDA_HOME ?= /usr/local/cuda
export MAX_JOBS ?= 2

.PHONY: setup test demo bench bench-all info clean

setup: $(VENV)/.ivl-installed

$(VENV)/.ivl-installed: pyproject.toml setup.py requirements-test.txt $(wildcard csrc/*)
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

clean:
	rm -rf $(VENV) build *.egg-info ivl_kernels/_C*.so
