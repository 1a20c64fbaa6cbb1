# make test   - create (or reuse) .venv, install nano_orion with its test extras, run the test suite
# TORCH picks the torch build: the default is the CPU wheel; e.g. `make TORCH=torch test` for your platform's default.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install test clean bench

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis

# make bench  - generation speed, nano_orion vs transformers on the same weights (CPU, float32; a few minutes)
bench: install
	$(PY) benchmarks/bench_generate.py
