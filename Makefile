# The two commands of a fresh machine (Python >= 3.10 and make):
#
#   make quickstart    create .venv and install dida on first use, then run `dida quickstart`
#   make test          the same environment, then the tests (`python -m pytest`)
#
# Variables (make VAR=value ...):
#   ARGS          extra arguments: make quickstart ARGS="--seeds 2"; make test ARGS=--runslow
#   TEST_JOBS     test processes (pytest-xdist; default auto: one per core, at most 4), one
#                 thread each (tests/conftest.py); TEST_JOBS=0 runs them in one process
#   PYTHON        the interpreter that creates the environment (default python3)
#   VENV          the environment's folder (default .venv)
#   TORCH         the PyTorch requirement (default torch==2.13.0, the version tested; dida
#                 accepts any torch >= 2.3, e.g. TORCH=torch==2.5.1); it stays pinned while
#                 dida's requirements install (pip then takes a kornia that supports it)
#   PINS          more requirements for that install: torch < 2.4 was built for numpy 1, so
#                 TORCH=torch==2.3.1 needs PINS="numpy<2"
#   TORCH_INDEX   where PyTorch comes from: the CPU build by default; a CUDA build with e.g.
#                 TORCH_INDEX=https://download.pytorch.org/whl/cu126, PyPI's default with TORCH_INDEX=
# The environment is (re)installed when pyproject.toml changes; `make clean-venv` removes it.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
PINS ?=
ARGS ?=
TEST_JOBS ?= auto

BIN := $(VENV)/bin
STAMP := $(VENV)/.dida-installed

.PHONY: quickstart test lint install clean-venv

quickstart: $(STAMP)
	$(BIN)/dida quickstart $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -n $(TEST_JOBS) --maxprocesses 4 $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks tools image_demo.py create_buffer.py

install: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "dida needs Python 3.10 or newer: make ... PYTHON=python3.12")'
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	@# torch alone from TORCH_INDEX (its dependencies come from the default index afterwards)
	$(BIN)/python -c 'import torch' 2>/dev/null || { \
		$(BIN)/python -m pip install -q --no-deps "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX)) && \
		$(BIN)/python -m pip install -q "$(TORCH)"; }
	$(BIN)/python -m pip install -q -e ".[dev]" "$(TORCH)" $(foreach pin,$(PINS),"$(pin)")
	touch $(STAMP)

clean-venv:
	rm -rf $(VENV)
