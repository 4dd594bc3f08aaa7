# vendgate developer commands. Every target creates the virtualenv it needs,
# so each one works on a fresh clone.

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test lint format bench fuzz vectors clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## demo: the main job on embedded defaults (today: the wire protocol end to end)
demo: $(STAMP)
	$(BIN)/vendgate demo

## test: the whole test suite (pure, component and integration tiers)
test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

## lint: ruff (rules and format) and mypy --strict, with no exceptions
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

## bench: short benchmarks that print what they measured
bench: $(STAMP)
	$(BIN)/python -m benchmarks.codec

## vectors: regenerate protocols/vectors/v1.json (review the diff before committing)
vectors: $(STAMP)
	$(BIN)/python -m protocols.vectors.generate

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
