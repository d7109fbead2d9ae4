# Set-up is part of every target: a fresh clone needs only `make run` or `make test`.
PYTHON ?= python3.11
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install browser run demo test test-slow bench bench-gpu bench-service benchmarks-md lint docs clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	# torch/torchvision first, pinned to the builds this machine keeps on disk (no multi-GB download)
	$(PY) -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
	$(PY) -m pip install --quiet -e ".[dev,timm,mlflow]"
	@touch $(STAMP)

install: $(STAMP) browser

# The browser test's Chromium and its WebDriver (tests/test_web_browser.py): Debian's packages, installed
# when missing on a machine with apt-get where we are root (a fresh CI machine); skipped when present.
# Elsewhere it says how to get them, and the browser test skips saying the same.
browser:
	@if command -v chromium >/dev/null && command -v chromedriver >/dev/null; then :; \
	elif command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ]; then \
		{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } \
		|| echo "chromium/chromedriver could not be installed (the browser test skips)"; \
	else echo "chromium/chromedriver missing: apt-get install chromium chromium-driver (the browser test skips)"; fi

# The service in embedded mode: SQLite under var/, the local runner, no Docker, no Redis, no keys
# (loopback only). Stop it with Ctrl-C.
run: $(STAMP)
	AUTH_DISABLED=$${AUTH_DISABLED:-1} $(PY) -m api

# The engine alone: a small job through the CLI, no service (digits, ResNet-20, half the MACs).
demo: $(STAMP)
	$(VENV)/bin/prune run --model resnet20 --data digits --method magnitude --target 0.5 \
		--dense-epochs 3 --epochs 3 --kd --out runs/demo

# CI's suite: everything but the tests marked slow (kept under about 15 minutes on 2 cores). Two
# pytest-xdist workers, one torch thread each (tests/conftest.py), a test file per worker at a time (its
# module fixtures train once): half the suite waits on processes and sockets, not on the CPU.
TEST_WORKERS ?= 2
test: $(STAMP) browser
	$(VENV)/bin/pytest -q -m "not slow" -n $(TEST_WORKERS) --dist loadfile

# The longer runs (large torchvision models, longer training); still CPU.
test-slow: $(STAMP)
	$(VENV)/bin/pytest -q -m slow

bench: $(STAMP)
	$(PY) -m bench.run --profile cpu

bench-gpu: $(STAMP)
	$(PY) -m bench.run --profile gpu

# HTTP throughput and latency against uvicorn + PostgreSQL + Redis on this machine.
bench-service: $(STAMP)
	$(PY) -m bench.service

# BENCHMARKS.md regenerated from the committed results files that bench/document.py's manifest names
# (trains nothing; seconds). After a benchmark run: commit its results JSON, name it in the manifest, run this.
benchmarks-md: $(STAMP)
	$(PY) -m bench.document

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The documentation site (mkdocs.yml, pages under docs/; the job spec and configuration pages generated from
# the code by docs/_hooks/reference.py) into site/, strict: a broken link or anchor fails it.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

clean:
	rm -rf runs var site .pytest_cache .ruff_cache
