# The README's two commands: `make demo` and `make test`. Each creates .venv and installs what it needs.
# TORCH_SPEC is installed first, so that no multi-GB CUDA build is pulled in by a plain `torch` requirement.
# --no-compile: Python compiles what the suite imports anyway; compiling everything at install time costs CI time.
# `make test` also creates .venv-floor, where torchmetrics, lightning, pytorch-lightning and transformers are pinned to
# the floors declared in pyproject.toml (`python tests/supported_versions.py pins`), and runs the suite there too.
# .venv-floor has no trl (FLOOR_EXTRAS leaves out the `trl` extra): trl 1.16 needs a newer transformers than its
# floor. It is cleared whenever it is rebuilt, so that nothing installed by an earlier resolution stays in it.
PYTHON ?= python3
VENV ?= .venv
FLOOR_VENV ?= .venv-floor
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
FLOOR_BIN := $(FLOOR_VENV)/bin
STAMP := $(VENV)/.installed
FLOOR_STAMP := $(FLOOR_VENV)/.installed
FLOOR_EXTRAS := lightning,pytorch-lightning,test,demo
EXTRAS := $(FLOOR_EXTRAS),trl

.PHONY: demo test test-newest test-floor lint bench gpu-check clean

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --no-compile --upgrade pip
	$(BIN)/python -m pip install --quiet --no-compile "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet --no-compile -e ".[$(EXTRAS)]"
	touch $(STAMP)

$(FLOOR_STAMP): pyproject.toml Makefile tests/supported_versions.py | $(STAMP)
	$(PYTHON) -m venv --clear $(FLOOR_VENV)
	$(FLOOR_BIN)/python -m pip install --quiet --no-compile --upgrade pip
	$(FLOOR_BIN)/python -m pip install --quiet --no-compile "$(TORCH_SPEC)"
	pins="$$($(BIN)/python tests/supported_versions.py pins)" && \
	  $(FLOOR_BIN)/python -m pip install --quiet --no-compile -e ".[$(FLOOR_EXTRAS)]" $$pins
	touch $(FLOOR_STAMP)

demo: $(STAMP)
	$(BIN)/python examples/lightning_demo.py

lint: $(STAMP)
	$(BIN)/ruff check src tests examples benchmarks notebooks
	$(BIN)/mypy

test: lint test-newest test-floor

test-newest: $(STAMP)
	EMA_METRICS_TESTED_ENV=newest $(BIN)/python -m pytest -rs

# The floor run repeats what depends on the pinned torchmetrics, Lightning and transformers: the metrics, their
# torchmetrics contract and DDP sync, every Lightning test and the Hugging Face Trainer tests. It leaves out what does
# not (to keep CI under 15 minutes): the packaging check (it installs the wheel with the newest releases into a venv
# of its own), the notebook, the framework examples and the Lightning demo, the sync protocol tests (torch.distributed
# only) and the GPU check's dry run (its Lightning fit is a plain one that the Lightning tests repeat at the floor);
# and what needs trl, which is not installed there (trl 1.16 needs transformers 4.56.2 or later; trl's declared floor,
# 1.16, is the release the newest run tests): the TRL tests and the TRL modules' doctests.
FLOOR_SKIP := tests/test_packaging.py tests/test_notebook.py tests/test_examples.py tests/test_lightning_demo.py \
	tests/integrations/transformers/test_trl.py tests/integrations/trl src/ema_metrics/trl.py \
	src/ema_metrics/integrations/trl tests/sync/test_sync.py tests/test_gpu_check.py
test-floor: $(FLOOR_STAMP)
	EMA_METRICS_TESTED_ENV=floor $(FLOOR_BIN)/python -m pytest -rs $(foreach t,$(FLOOR_SKIP),--ignore=$(t))

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_update.py

# On a machine with a CUDA GPU: install a CUDA build of torch first (for example TORCH_SPEC="torch==2.13.0" with the
# CUDA wheel index in pip's configuration), then this prints and writes the JSON summary (about a minute).
gpu-check: $(STAMP)
	PYTHONPATH=. $(BIN)/python benchmarks/gpu_check.py --out gpu_check.json

clean:
	rm -rf $(VENV) $(FLOOR_VENV) dist build
