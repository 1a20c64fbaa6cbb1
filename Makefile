# make test   - create (or reuse) .venv, install nano_orion with its test extras, run the test suite
# TORCH picks the torch build: the default is the CPU wheel; e.g. `make TORCH=torch test` for your platform's default.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install test clean bench figures

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

# ---- convert.py: released weights <-> nano_orion checkpoints ----
.PHONY: convert-memory
# Peak RSS of convert.py on a synthetic 5 GB checkpoint (needs about 10 GB free in $(TMPDIR) or /tmp; deletes it after).
convert-memory: install
	$(PY) scripts/convert_memory.py $$(mktemp -d)

# make figures  - draw docs/figures/*.png with docs/make_figures.py (installs the optional `docs` extra, matplotlib)
# CHECKPOINT: the checkpoint folder whose router is drawn; TRAIN_LOG: train.py's OUT_DIR/log.jsonl for the
# loss and expert-load figures (skipped when empty).
CHECKPOINT ?= tests/fixtures/orion-mini-rmsnorm
TRAIN_LOG ?=
figures: install
	$(PY) -m pip install -q -e ".[docs]"
	$(PY) docs/make_figures.py --checkpoint $(CHECKPOINT) $(if $(TRAIN_LOG),--train-log $(TRAIN_LOG))
