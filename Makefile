# Each target creates .venv when it is missing and installs what it needs into it.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# torch and torchvision come from pip's usual resolution; DALI's CPU-only mode runs in CI.
EXTRAS  ?= test,dali

.PHONY: demo test test-fast bench gpu-check install clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

$(VENV)/.installed: setup.cfg setup.py | $(BIN)/activate
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

# Lint first (ruff.toml: pycodestyle and pyflakes, 110 columns), then the whole suite.
test: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q tests

# The loop while working: the suite less the tests marked `slow` (those that start train.py's real
# training, torchrun, the GPU check or torch.compile); every module is still exercised.
test-fast: install
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q -m "not slow" tests

demo: install
	$(BIN)/python tools/demo.py --out logs/demo

# `make bench`: `tools/benchmark.py all` (loaders, step, train, eval) on the synthetic medium set, this
# project against the published way of running. On a CPU-only machine a small configuration (stated in the JSON).
BENCH      ?= logs/bench
CPU_BENCH  := -a resnet18 --height 128 --width 64 -b 32 --warmup 2 --window 3 --repeats 3 --gpus 1,2 --workers 2
HAS_CUDA    = $(shell $(BIN)/python -c "import torch; print(int(torch.cuda.is_available()))")

$(BENCH)/data/SYNTHETIC.json: | install
	$(BIN)/python tools/make_synthetic.py --out $(BENCH)/data --scale medium

bench: install $(BENCH)/data/SYNTHETIC.json
	$(BIN)/python tools/make_shards.py --data-dir $(BENCH)/data --out $(BENCH)/shards --workers 4
	$(BIN)/python tools/benchmark.py all --impl both --shards $(BENCH)/shards \
		--data-dir $(BENCH)/data --out $(BENCH) $(if $(filter 1,$(HAS_CUDA)),--workers 8,$(CPU_BENCH))

# `make gpu-check`: every GPU path in one go (tools/gpu_check.py: synthetic data, shards, GPU tests,
# DALI against PIL, the benchmarks; OUT/results.json and OUT/summary.md), with whichever Python is
# there: the .venv when it exists, else the machine's own (a bare GPU machine has no network to
# install one; PYTHONPATH finds the packages without an install). GPU_CHECK_FLAGS="--device cpu --quick" runs the tiny CPU configuration CI runs.
GPU_CHECK       ?= logs/gpu-check
GPU_CHECK_FLAGS ?=
GPU_PY          ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,$(PY))

gpu-check:
	PYTHONPATH=$(CURDIR)$${PYTHONPATH:+:$$PYTHONPATH} $(GPU_PY) tools/gpu_check.py --out $(GPU_CHECK) $(GPU_CHECK_FLAGS)

# `make clean` removes only what `make` rebuilds: the environment and caches. Results (logs/,
# where the README's runs and the demo write) and shards are never deleted.
clean:
	rm -rf $(VENV) .pytest_cache *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
