# The README's two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
# TORCH_SPEC is installed first, so that no multi-GB CUDA build is pulled in by a plain `torch` requirement.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[lightning,test,demo]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/python examples/lightning_demo.py

lint: $(STAMP)
	$(BIN)/ruff check src tests examples benchmarks notebooks
	$(BIN)/mypy

test: lint
	$(BIN)/python -m pytest

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_update.py

clean:
	rm -rf $(VENV) dist build
