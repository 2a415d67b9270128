# Two commands set everything up on a fresh machine:
#   make demo   create .venv, install tollway (runtime only), run `tollway demo`
#   make test   create .venv, install tollway with dev tools, run scripts/check and the tests
# `make test` also builds .venv-litellm: the LiteLLM proxy (litellm[proxy]) for the end-to-end tests of
# tollway.integrations.litellm. It has a venv of its own because the proxy extra requires rich<14 while
# the dev tools (import-linter) require rich>=14.2; .venv has litellm without the proxy extra.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
DEV    := $(VENV)/.installed-dev
PIP    := $(BIN)/python -m pip install --quiet --disable-pip-version-check -c requirements.lock
PROXY_VENV  := .venv-litellm
PROXY_STAMP := $(PROXY_VENV)/.installed
LITELLM_PROXY := litellm[proxy]==1.108.0

.PHONY: demo test check bench install litellm-proxy clean

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

$(PROXY_STAMP): pyproject.toml requirements-litellm-proxy.lock
	$(PYTHON) -m venv $(PROXY_VENV)
	$(PROXY_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip
	$(PROXY_VENV)/bin/python -m pip install --quiet --disable-pip-version-check -c requirements-litellm-proxy.lock -e . '$(LITELLM_PROXY)'
	touch $(PROXY_STAMP)


litellm-proxy: $(PROXY_STAMP)

demo: $(STAMP)
	$(BIN)/tollway demo

test: $(DEV) $(PROXY_STAMP)
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/check
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/test

check: $(DEV)
	PATH="$(CURDIR)/$(BIN):$$PATH" scripts/check

bench: $(DEV)
	$(BIN)/python bench/engine.py --json

clean:
	rm -rf $(VENV) $(PROXY_VENV) .pytest_cache .mypy_cache .ruff_cache .hypothesis
