# nano_orion's everyday commands. Each creates (or reuses) .venv and installs what it needs.
#
#   make demo      train the toy model on the CPU from scratch (a few minutes), then generate from it
#   make test      run the test suite
#   make lint      check the code's style with ruff (pyproject.toml says which rules)
#   make bench     speed against transformers' MixtralForCausalLM on the same weights, and against the read bandwidth (CPU)
#   make figures   redraw docs/figures/*.png from the code and the committed runs in docs/runs/
#   make docs-runs replace docs/runs/ with make demo's and make collapse-demo's runs, and redraw
#   make docs-model      retrain docs/trained/, the small model walkthroughs 4 and 7 show (a minute)
#   make experiments     walkthrough 11's dense-versus-MoE runs (about 20 minutes), after make demo
#   make collapse-demo   the demo's run again without the load-balancing loss (docs/05_moe.md)
#   make docs-refresh    rewrite the docs' shown outputs and code-link line numbers from the code
#
# On a machine with a CUDA GPU, with a python that has torch (no venv is made: PY=python3):
#   make gpu-check PY=python3        GPU code paths' tests, a short training run to a checkpoint,
#                                    generate.py --compile on it, and the training benchmark
#   make bench-gpu PY=python3        Orion-MoE8x7B's decoding speed on the GPU (benchmarks/bench_gpu.py)
#   make bench-train-gpu PY=python3  training a 583 M MoE: nano_orion eager and compiled vs transformers
#
# TORCH is the torch requirement pip installs into VENV (default torch==2.13.0). Which build that is
# depends on your platform and pip configuration: on Linux, PyPI's default is the CUDA build; add
# PyTorch's CPU index to your pip configuration for the smaller CPU wheel. Another torch gets a venv
# of its own, so .venv is left as it is:
#   make test TORCH=torch==2.11.0 VENV=.venv-2.11
# A venv keeps the torch it was made with; asking it for another one is refused, naming both.
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: install test lint demo collapse-demo bench figures docs-runs docs-model experiments docs-refresh convert-memory clean gpu-check bench-gpu bench-train-gpu

install: $(VENV)/.installed
	@made_with="$$(cat $(VENV)/.installed)"; if [ "$$made_with" != '$(TORCH)' ]; then \
		echo "make: $(VENV) was made with $${made_with:-another torch}, not $(TORCH): give this torch a venv of its own (VENV=.venv-...), or remove $(VENV) (make clean)" >&2; \
		exit 2; fi

# The stamp holds the torch requirement the venv was made with.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip "setuptools>=77"
	$(PY) -m pip install -q '$(TORCH)'
	$(PY) -m pip install -q -e ".[test]"
	echo '$(TORCH)' > $@

test: install
	$(PY) -m pytest -q

# lint: ruff, configured in pyproject.toml: pyflakes, pycodestyle (lines up to 120 characters) and
# import order, then the formatter's check (`$(PY) -m ruff format .` formats in place).
lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# ---- training ----
# demo: prepare the default corpus (the Python standard library's sources), train the toy
# model from scratch for 300 steps on the CPU, then generate a sample from it.
# DEMO_THREADS: train.py's and generate.py's --threads; 1 is the robust choice on a small shared machine.
# The MALLOC_* settings make glibc keep freed memory instead of returning it to the OS, so the
# step's large temporary tensors (a chunk of logits is 8 MB) reuse pages rather than fault in
# fresh ones (measured on a 2-core box, 60 steps twice each: 6,000-6,400 training tokens/s with
# them, 5,000-6,200 without; other libcs ignore them).
DEMO_OUT ?= out/demo
DEMO_THREADS ?= 1
DEMO_ENV = MALLOC_MMAP_THRESHOLD_=4294967296 MALLOC_TRIM_THRESHOLD_=4294967296
DEMO_TRAIN_ARGS = --max-iters 300 --batch-size 16 --block-size 128 --lr 3e-3 --warmup-iters 30 --eval-interval 100 \
	--device cpu --threads $(DEMO_THREADS)
# --overwrite: make demo trains afresh each time, replacing the demo run in DEMO_OUT (continue one instead
# with: python train.py --resume --out-dir out/demo --max-iters 600)
demo: install
	$(DEMO_ENV) $(PY) train.py --config toy --out-dir $(DEMO_OUT) $(DEMO_TRAIN_ARGS) --overwrite
	$(DEMO_ENV) $(PY) generate.py --ckpt $(DEMO_OUT) --threads $(DEMO_THREADS) \
		--prompt "$$(printf 'class Parser:\n    def __init__(self')" --max-new-tokens 200 --seed 0

# collapse-demo: the same run (same seed, data and steps) with router_aux_loss_coef = 0, i.e. no
# load-balancing loss, into COLLAPSE_OUT; make figures draws its expert load beside the demo's.
COLLAPSE_OUT ?= out/collapse
collapse-demo: install
	mkdir -p $(dir $(COLLAPSE_OUT))
	$(PY) -c "import json; from nano_orion import OrionConfig; \
		print(json.dumps(OrionConfig.preset('toy', router_aux_loss_coef=0.0).to_dict()))" > $(COLLAPSE_OUT).json
	$(DEMO_ENV) $(PY) train.py --config $(COLLAPSE_OUT).json --out-dir $(COLLAPSE_OUT) $(DEMO_TRAIN_ARGS) --overwrite

# docs-model: the small trained model of walkthroughs 4 and 7 (docs/trained/, 1.2 MB, about a
# minute): a tiny MoE trained on the copy of argparse.py the docs ship. Then make docs-refresh.
DOCS_MODEL_OUT ?= out/docs-model
docs-model: install
	mkdir -p $(dir $(DOCS_MODEL_OUT))
	$(PY) -c "import json; c = json.load(open('docs/trained/config.json'))['config']; \
		print(json.dumps({k: c[k] for k in ('dim', 'n_layers', 'n_heads', 'n_kv_heads', 'ffn_dim', 'n_experts', 'top_k', 'max_seq_len')}))" \
		> $(DOCS_MODEL_OUT).json
	$(PY) train.py --config $(DOCS_MODEL_OUT).json --data docs/corpus/argparse.py --data-dir $(DOCS_MODEL_OUT)-data \
		--vocab-size 512 --out-dir $(DOCS_MODEL_OUT) --batch-size 16 --block-size 64 --lr 3e-3 --warmup-iters 20 \
		--max-iters 600 --eval-interval 200 --eval-iters 4 --log-interval 50 --device cpu --threads 1 --overwrite
	cp $(DOCS_MODEL_OUT)/config.json $(DOCS_MODEL_OUT)/model.safetensors $(DOCS_MODEL_OUT)/tokenizer.model \
		$(DOCS_MODEL_OUT)/tokenizer_config.json $(DOCS_MODEL_OUT)/log.jsonl docs/trained/

# experiments: walkthrough 11's runs (scripts/experiments.py): the demo's training with six
# feed-forward layers, dense and MoE, two at a time with one thread each (about 20 minutes on 2
# cores), their logs copied into docs/runs/experiments/; then which experts make demo's model
# sends each kind of Python token to (docs/runs/demo/specialisation.json; needs make demo's
# checkpoint). Then make figures, and update the numbers walkthrough 11 quotes (make test names them).
experiments: install
	$(PY) scripts/experiments.py train
	$(PY) scripts/experiments.py specialisation --ckpt $(DEMO_OUT)

# ---- speed: generation, then training, each against transformers in one run ----
# GEN_BENCH_ARGS: --compile adds compiled decode steps (compile_decode_step) to the race and to the roofline table
# (float32, bfloat16 and int8 at 1 and 2 threads: a few minutes of compiling); drop it for eager only.
GEN_BENCH_ARGS ?= --threads 1 --compile --repeats 9
TRAIN_BENCH_ARGS ?=
bench: install
	$(PY) -m benchmarks.bench_generate $(GEN_BENCH_ARGS)
	$(PY) -m benchmarks.bench_train $(TRAIN_BENCH_ARGS)

# ---- GPU: no `install` prerequisite; PY must have torch with CUDA (e.g. PY=python3 on a GPU machine).
GPU_OUT ?= out/gpu-check
GPU_BENCH_ARGS ?=
# gpu-check goes on after a failing step (time on a GPU is short; generate.py needs train.py's
# checkpoint, so it is skipped when train.py fails), then names the failed steps, and make fails.
gpu-check:
	@failed=""; \
	echo "== gpu-check: the GPU code paths' tests"; \
	$(PY) -m pytest -q tests/test_gemv.py tests/test_decode.py tests/test_moe.py tests/test_device.py tests/test_loss.py \
		|| failed="$$failed tests"; \
	echo "== gpu-check: train.py --device cuda"; \
	if $(PY) train.py --device cuda --out-dir $(GPU_OUT) --max-iters 120 --eval-interval 60; then \
		echo "== gpu-check: generate.py --compile on its checkpoint"; \
		$(PY) generate.py --ckpt $(GPU_OUT) --device cuda --compile --temperature 0 --max-new-tokens 64 \
			--prompt "$$(printf 'class Parser:\n    def __init__(self')" || failed="$$failed generate.py"; \
	else failed="$$failed train.py (so generate.py was skipped)"; fi; \
	echo "== gpu-check: the training benchmark"; \
	$(MAKE) --no-print-directory bench-train-gpu PY=$(PY) || failed="$$failed bench-train-gpu"; \
	if [ -n "$$failed" ]; then echo "gpu-check: failed:$$failed"; exit 1; fi; echo "gpu-check: every step passed"
bench-gpu:
	$(PY) -m benchmarks.bench_gpu $(GPU_BENCH_ARGS)
bench-train-gpu:
	$(PY) -m benchmarks.bench_train --device cuda --config orion-583m --batch-size 16 --block-size 1024 --steps 30

# ---- figures: every PNG of docs/figures, drawn by docs/make_figures.py from the code and from
# the committed runs in docs/runs/ (no training needed). Installs the `docs` extra (matplotlib).
# router.png's Chinese, Japanese and Korean characters need a font with their glyphs, found
# among the system's fonts (Debian/Ubuntu: apt-get install fonts-noto-cjk); without one,
# make_figures warns and spells them as U+XXXX.
figures: install
	$(PY) -m pip install -q -e ".[docs]"
	$(PY) docs/make_figures.py

# docs-runs: after make demo and make collapse-demo, replace the committed runs the docs quote
# and draw (docs/runs/{demo,collapse}: log.jsonl, config.json; the demo model's routing.json
# and specialisation.json),
# then redraw the figures. Then update the numbers the docs quote: make test names each one
# that no longer matches (tests/test_doc_numbers.py).
docs-runs: install
	$(PY) -m pip install -q -e ".[docs]"
	mkdir -p docs/runs/demo docs/runs/collapse
	cp $(DEMO_OUT)/log.jsonl $(DEMO_OUT)/config.json docs/runs/demo/
	cp $(COLLAPSE_OUT)/log.jsonl $(COLLAPSE_OUT)/config.json docs/runs/collapse/
	$(PY) scripts/experiments.py specialisation --ckpt $(DEMO_OUT)
	$(PY) docs/make_figures.py --record-routing $(DEMO_OUT)

# ---- docs-refresh: after a code change, rewrite the docs' shown outputs (```text output blocks)
# and the #L<n> line anchors of their code links from the code, then review `git diff docs README.md`.
# tests/test_docs.py fails, naming this target, when either is stale. DOCS_PAGES: pages to refresh
# (default: all); `make docs-refresh DOCS_REFRESH_ARGS=--no-run` fixes only the anchors.
DOCS_PAGES ?=
DOCS_REFRESH_ARGS ?=
docs-refresh: install
	$(PY) scripts/refresh_docs.py $(DOCS_REFRESH_ARGS) $(DOCS_PAGES)

# ---- convert.py: peak RSS on a synthetic 5 GB checkpoint (needs ~10 GB free in $TMPDIR or /tmp; deletes it after)
convert-memory: install
	$(PY) scripts/convert_memory.py $$(mktemp -d)

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis
