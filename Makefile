# Two entry points for a fresh machine: `make demo` (the main job) and `make test` (the suite).
# Both create .venv, install the CPU build of torch first, then the package with its extras.

PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
EXTRAS ?= train,onnx,test
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=
# pytest-xdist workers (each runs torch on one thread, tests/conftest.py); 0 runs the suite in this process
PYTEST_WORKERS ?= 2
PYTEST_XDIST := -n $(PYTEST_WORKERS) --dist worksteal

export HF_HUB_OFFLINE ?= 1
export PIP_DISABLE_PIP_VERSION_CHECK = 1

.PHONY: setup demo test test-all bench lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -c constraints.txt -e ".[$(EXTRAS)]"
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/refs/perceiver-pytorch-0.10.1 perceiver-pytorch==0.10.1
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/refs/perceiver-pytorch-0.8.8 perceiver-pytorch==0.8.8
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/refs/perceiver-multi-modality-pytorch-1.4.0 perceiver-multi-modality-pytorch==1.4.0
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/refs/perceiver-io-0.6.0 perceiver-io==0.6.0
	$(PY) -m pip install --quiet --no-deps --target $(VENV)/refs/perceiver-ar-pytorch-0.0.10 perceiver-ar-pytorch==0.0.10
	$(PY) -m pip install --quiet --no-deps --ignore-requires-python --target $(VENV)/refs/perceiver-io-0.11.0 perceiver-io==0.11.0
	FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE $(PY) -m pip install --quiet --no-deps --no-build-isolation --target $(VENV)/refs/flash-perceiver-0.2.0 flash-attn==2.8.3.post2 flash-perceiver==0.2.0
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(PY) -m perceivers.demo

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q $(PYTEST_XDIST) $(PYTEST_ARGS)

test-all: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_XDIST) -m "slow or fuzz or not (slow or fuzz)" $(PYTEST_ARGS)

bench: $(STAMP)
	$(PY) benchmarks/run.py

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .hypothesis
