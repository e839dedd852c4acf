# Two entry points: `make demo` and `make test`. Both build .venv from the pinned requirement files.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export JAX_PLATFORMS ?= cpu
export PYTHONPATH := $(CURDIR)

.PHONY: demo test lint bench env clean

$(STAMP): requirements.txt requirements-test.txt requirements-reference.txt
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH (or make PY=python3)"; exit 1; }
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements-test.txt
	$(VENV)/bin/python -m pip install -q --no-deps --upgrade --target $(VENV)/reference -r requirements-reference.txt
	touch $(STAMP)

env: $(STAMP)

# make demo: trains stage 1 -> stage 2 -> detokenizer on the procedural shapes dataset, evaluates on held-out scenes
# and writes runs/demo/report.json (lavit_jax/demo.py). DEMO_FLAGS adds flags, e.g. DEMO_FLAGS=--overwrite to
# replace an earlier run, or --steps_scale=0.02 for a smoke run (tests/test_docs_commands.py does).
DEMO_FLAGS ?=

demo: $(STAMP)
	$(VENV)/bin/python -m lavit_jax.demo --config configs/demo.py --workdir runs/demo $(DEMO_FLAGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile tests

bench: $(STAMP)
	$(VENV)/bin/python bench/bench_tokenizer.py

clean:
	rm -rf $(VENV)
