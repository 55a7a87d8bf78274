# One entry point for a fresh machine: `make serve` starts the server, `make test` runs every test.
# Both create .venv and install what they need on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
ARCH := $(shell uname -m)
# torch and torchvision must come as a matching pair (timm needs torchvision's compiled ops).
ifeq ($(ARCH),aarch64)
TORCH_SPEC ?= torch==2.9.1 torchvision==0.24.1
else
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
endif

.PHONY: install serve test test-fast bench lint
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

serve: install
	$(VENV)/bin/mame-serve

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

bench: install
	$(VENV)/bin/mame-bench

lint: install
	$(VENV)/bin/ruff check mame_core server loadtest tests
