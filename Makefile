# The README's two commands. Both work on a fresh machine with only Python 3.10+:
# they create .venv, install what they need, and run.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev
MUTATION_STAMP := $(VENV)/.installed-mutation

.PHONY: demo test install mutation clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/crossdistill demo

# ruff: lint and format check ([tool.ruff]); lint-imports: the layer and no-cycle contracts of
# pyproject.toml ([tool.importlinter]). `$(BIN)/ruff format src tests benchmarks tools` fixes the format.
LINTED := src tests benchmarks tools
test: $(STAMP)
	$(BIN)/ruff check $(LINTED)
	$(BIN)/ruff format --check $(LINTED)
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -q

$(MUTATION_STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -e ".[dev,mutation]"
	touch $(STAMP) $(MUTATION_STAMP)

# Slow (hours on 2 cores), not part of `make test`. MODULES="sampling losses" runs only those;
# the table lands in build/mutation/report.md (see docs/TESTING.md).
mutation: $(MUTATION_STAMP)
	$(BIN)/python tools/mutation.py $(MODULES)

clean:
	rm -rf $(VENV) build *.egg-info src/*.egg-info demo_runs mutants .import_linter_cache
