# One entry point for a fresh machine: `make serve` starts the server, `make test` runs every test.
# Both create .venv and install what they need on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
ARCH := $(shell uname -m)
# torch and torchvision must come as a matching pair (timm needs torchvision's compiled ops).
ifeq ($(ARCH),aarch64)
TORCH_SPEC ?= torch==2.9.1 torchvision==0.24.1
MIN_FREE_GIB ?= 2
else
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
MIN_FREE_GIB ?= 7
endif

.PHONY: install serve test test-fast bench lint
install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# A CUDA build of torch is ~5.5 GiB installed: say so up front, not as pip's OSError halfway through.
	@$(PY) -c 'import torch' 2>/dev/null || { free=$$(df -Pk $(VENV) | awk 'NR == 2 {print int($$4 / 1048576)}'); \
	  if [ "$$free" -lt $(MIN_FREE_GIB) ]; then \
	    echo "error: installing PyTorch into $(VENV) needs about $(MIN_FREE_GIB) GiB free; $$free GiB are (df -h $(VENV))" >&2; \
	    exit 1; fi; }
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

serve: install
	$(VENV)/bin/mame-serve

# Two workers: most tests wait on server processes they start, and the suite then takes about half the
# time on two cores. `--dist worksteal` keeps the few long tests from ending up queued behind each other.
PYTEST_WORKERS ?= 2
test: install
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal

test-fast: install
	$(PY) -m pytest -n $(PYTEST_WORKERS) --dist worksteal -m "not slow"

bench: install
	$(VENV)/bin/mame-bench

lint: install
	$(VENV)/bin/ruff check mame_core server loadtest abtest tests
