# Every target sets itself up: a fresh machine needs only Python 3.11 and make.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test test-fast lint run demo bench bench-mini docs clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Test processes: most of the suite waits on servers and subprocesses, so two share 2 cores well.
# Each test file runs whole on one of them (module fixtures: one server, one packaged model).
TEST_WORKERS ?= 2
PYTEST := $(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile --durations=10

# Lint, format, types (core and tasks), then the whole suite: what CI runs.
test: lint $(STAMP)
	$(BIN)/mypy
	$(PYTEST)

# The quick loop: lint, types, and the tests that build or serve no model and start no server.
test-fast: lint $(STAMP)
	$(BIN)/mypy
	$(PYTEST) -m "not slow and not e2e"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# Main job: the real Phi-3 from the Hugging Face hub (needs network access to the hub).
run: $(STAMP)
	$(BIN)/phi3ops run

# The same job, offline, on a tiny random Phi-3 served from a local hub on loopback.
demo: $(STAMP)
	$(BIN)/phi3ops demo

bench: $(STAMP)
	$(BIN)/python -m bench

# Phi-3-mini's real shape on this machine (on demand, never in `make test`): builds the `mini`
# preset once (~3 min, ~10.5 GB peak), then about 30 min on 2 cores; BENCHMARKS.md `## mini`.
bench-mini: $(STAMP)
	$(BIN)/python -m bench.mini $(BENCH_MINI_ARGS)

# docs/settings.md, rendered from the Settings model (tests/unit/test_settings_reference.py).
docs: $(STAMP)
	$(BIN)/python -m phi3ops.settings > docs/settings.md.tmp && mv docs/settings.md.tmp docs/settings.md

clean:
	rm -rf $(VENV) .data .pytest_cache
