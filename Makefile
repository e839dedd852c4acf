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

DEMO_CKPT := out/tiny_converted

$(DEMO_CKPT)/lavit.json: | $(STAMP)
	$(VENV)/bin/python tools/convert_torch_weights.py --src ../shared/fixtures/image_tokenizer_tiny/checkpoint \
		--out $(DEMO_CKPT) --config configs/tiny.py --dtype f32

demo: $(STAMP) $(DEMO_CKPT)/lavit.json
	$(VENV)/bin/python -m lavit_jax.demo --checkpoint $(DEMO_CKPT)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(VENV)/bin/python -m pytest -n 2 --dist loadfile tests

bench: $(STAMP)
	$(VENV)/bin/python bench/bench_tokenizer.py

clean:
	rm -rf $(VENV)
