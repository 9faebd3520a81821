# Everything a fresh machine needs: `make demo` and `make test` create .venv and install into it.
# torch is pinned to a CPU build where there is no GPU so a CPU-only machine never pulls the multi-GB CUDA wheels.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.fewstep-installed
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
ifeq ($(HAS_GPU),1)
TORCH_SPEC ?= torch>=2.13
else
TORCH_SPEC ?= torch==2.13.0
endif
PYTEST_WORKERS ?= 2
# make gpu-check: the GPU machine's own Python (its torch and Triton are used as they are; nothing is downloaded)
GPU_PYTHON ?= $(shell command -v python3 || command -v python)
GPU_CHECK_ARGS ?=
# make wheels: fewstep's pure-Python run-time and test dependencies (never torch / triton) for an offline GPU
# machine whose Python version is unknown; pure wheels once, platform wheels (safetensors, pillow, numpy,
# pyyaml, ...) per CPython version, Linux x86_64
WHEEL_DIR ?= .whl
WHEEL_PYTHONS ?= 3.10 3.11 3.12 3.13
WHEEL_PACKAGES ?= diffusers safetensors pillow pytest pytest-benchmark pytest-xdist
# numpy comes with every torch install and is 16 MB a version: left out so four versions fit the ~64 MB that
# travels with a working tree (about 55 MB; set WHEEL_PYTHONS to the GPU machine's version when known)
WHEEL_SKIP ?= numpy
# make test-compat: the lowest supported Triton beside the CPU torch wheel, in a venv of its own; numpy < 2.4
# because Triton 3.5 / 3.6's interpreter crashes on the FP8 GEMM loops with numpy 2.4 (fixed in later Triton)
COMPAT_VENV ?= .venv-compat
COMPAT_SPECS ?= "torch==2.13.0" "triton==3.6.0" "numpy<2.4"
COMPAT_TESTS ?= tests/kernels/test_fp8_gemm.py tests/kernels/test_fp8_quantize.py \
	tests/kernels/test_fp8_adaln_quant.py tests/kernels/test_fp8_aot.py tests/kernels/test_solver_update.py \
	tests/kernels/test_triton_support.py tests/quant/test_fp8_linear.py tests/quant/test_calibrate.py
# make test also runs test-compat when RUN_COMPAT=1 (it roughly doubles the kernel tests' time)
RUN_COMPAT ?= 0

.PHONY: install demo test bench lint accuracy clean gpu-check gpu-check-dry wheels test-compat mutate

install: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h)
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
	$(BIN)/python -m pytest -q benchmarks --benchmark-disable -m "not slow"
	$(MAKE) --no-print-directory gpu-check-dry
ifeq ($(RUN_COMPAT),1)
	$(MAKE) --no-print-directory test-compat
endif

# every GPU test, benchmark and tuning run, offline, in one go (scripts/gpu_check.py); a dry run without CUDA
gpu-check:
	$(GPU_PYTHON) scripts/gpu_check.py $(GPU_CHECK_ARGS)

gpu-check-dry: $(STAMP)
	$(BIN)/python scripts/gpu_check.py --dry-run --no-install

wheels:
	mkdir -p $(WHEEL_DIR)
	for v in $(WHEEL_PYTHONS); do \
	  $(PYTHON) -m pip download -q --only-binary=:all: --implementation cp --python-version $$v \
	    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
	    -d $(WHEEL_DIR) $(WHEEL_PACKAGES) || exit 1; \
	done
	for p in $(WHEEL_SKIP); do rm -f $(WHEEL_DIR)/$$p-*.whl; done
	du -sh $(WHEEL_DIR)

$(COMPAT_VENV)/.installed:
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_VENV)/bin/pip install -q $(COMPAT_SPECS) pytest pytest-xdist scipy safetensors pillow diffusers
	touch $@

test-compat: $(COMPAT_VENV)/.installed
	$(COMPAT_VENV)/bin/python -c "import torch, triton, numpy; print('test-compat: torch', torch.__version__, \
	  'triton', triton.__version__, 'numpy', numpy.__version__)"
	PYTHONPATH=$(CURDIR) $(COMPAT_VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) -p no:cacheprovider \
	  $(COMPAT_TESTS)

# mutation testing of the numeric core (scripts/mutate.py; not part of make test): writes docs/mutation.md
mutate: $(STAMP)
	$(BIN)/python -c "import mutmut" 2>/dev/null || FEWSTEP_SKIP_CUDA_BUILD=$(if $(HAS_GPU),0,1) \
	  $(BIN)/pip install -q --no-build-isolation -e ".[mutate]"
	$(BIN)/python scripts/mutate.py $(MUTATE_ARGS)

bench: $(STAMP)
	mkdir -p benchmarks/results
	$(BIN)/python -m pytest benchmarks --benchmark-only --benchmark-json=benchmarks/results/pytest-benchmark-$$(hostname)-$$(git rev-parse --short HEAD).json

lint: $(STAMP)
	$(BIN)/pip install -q ruff
	$(BIN)/ruff check fewstep tests benchmarks

clean:
	rm -rf $(VENV) $(COMPAT_VENV) build *.egg-info .pytest_cache fewstep/_C*.so
