# Each target creates .venv when it is missing and installs what it needs into it.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
# torch and torchvision come from pip's usual resolution; DALI's CPU-only mode runs in CI.
EXTRAS  ?= test,dali

.PHONY: demo test bench install clean

$(BIN)/activate:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip setuptools wheel

$(VENV)/.installed: setup.cfg setup.py | $(BIN)/activate
	$(BIN)/pip install -q -e ".[$(EXTRAS)]"
	touch $@

install: $(VENV)/.installed

test: install
	$(BIN)/python -m pytest -q tests

demo: install
	$(BIN)/python tools/demo.py --out logs/demo

bench: install
	$(BIN)/python tools/benchmark.py --mode all

clean:
	rm -rf $(VENV) logs
