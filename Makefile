# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install tollway (runtime only), run `tollway demo`
#   make test   create .venv, install tollway with dev tools, run scripts/check and the tests
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEV    := $(VENV)/.installed-dev
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock

.PHONY: demo test check bench install clean

$(STAMP): pyproject.toml requirements.lock
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PIP) -e .
	touch $(STAMP)

# The dev tools (pytest, ruff, mypy, …) only for what needs them: the demo does not.
$(DEV): $(STAMP)
	$(PIP) -e '.[dev]'
	touch $(DEV)

install: $(DEV)

demo: $(STAMP)
	$(BIN)/tollway demo

test: $(DEV)
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/check
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/test

check: $(DEV)
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/check

bench: $(DEV)
	$(BIN)/python bench/engine.py --json

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
