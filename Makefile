# Every target sets itself up: a fresh machine needs only Python 3.11 and make.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: install test lint run demo bench docs clean

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# Lint, format, types (core and tasks), then the whole suite.
test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m pytest

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

# docs/settings.md, rendered from the Settings model (tests/unit/test_settings_reference.py).
docs: $(STAMP)
	$(BIN)/python -m phi3ops.settings > docs/settings.md.tmp && mv docs/settings.md.tmp docs/settings.md

clean:
	rm -rf $(VENV) .data .pytest_cache
