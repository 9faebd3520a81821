# Everything a fresh machine needs: `make demo` and `make test` create .venv and install into it.
# torch is pinned to a CPU build where there is no GPU so a CPU-only machine never pulls the multi-GB CUDA wheels.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fewstep-installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
TORCH_SPEC ?= torch>=2.4
else
TORCH_SPEC ?= torch==2.13.0
endif
PYTEST_WORKERS ?= 2

.PHONY: install demo test bench lint accuracy clean

install: $(STAMP)

$(STAMP): pyproject.toml setup.py
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install -q "$(TORCH_SPEC)"
	FEWSTEP_SKIP_CUDA_BUILD=$(if $(HAS_GPU),0,1) $(BIN)/pip install -q --no-build-isolation -e ".[test,export,serve]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/fewstep demo

accuracy: $(STAMP)
	$(BIN)/fewstep accuracy --out accuracy.png

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(PYTEST_WORKERS) tests
	$(BIN)/python -m pytest -q benchmarks --benchmark-disable

bench: $(STAMP)
	mkdir -p benchmarks/results
	$(BIN)/python -m pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/pytest-benchmark-$$(hostname)-$$(git rev-parse --short HEAD).json

lint: $(STAMP)
	$(BIN)/pip install -q ruff
	$(BIN)/ruff check fewstep tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
