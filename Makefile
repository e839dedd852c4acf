# Two entry points: `make demo` and `make test`. Both build .venv from the pinned requirement files.
PY ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
export XLA_FLAGS ?= --xla_force_host_platform_device_count=8
export JAX_PLATFORMS ?= cpu
export PYTHONPATH := $(CURDIR)

.PHONY: demo test lint bench env clean

$(STAMP): requirements.txt requirements-test.txt
	@command -v $(PY) >/dev/null 2>&1 || { echo "need $(PY) on PATH (or make PY=python3)"; exit 1; }
	test -x $(VENV)/bin/python || $(PY) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -r requirements-test.txt
	touch $(STAMP)

env: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/python -m lavit_jax.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile tests

bench: $(STAMP)
	$(VENV)/bin/python bench/bench_tokenizer.py

clean:
	rm -rf $(VENV)
