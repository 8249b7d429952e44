# Two commands from a fresh clone: `make train` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: venv train test lint bench clean

venv: $(STAMP)

# torch is installed first and pinned: an unpinned torch in a fresh venv pulls a CUDA build.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[dev]'
	touch $(STAMP)

train: $(STAMP)
	$(BIN)/metaray train quickstart --output runs/quickstart --overwrite
	$(BIN)/metaray report runs/quickstart

test: $(STAMP)
	$(BIN)/ruff check metaray tests
	$(BIN)/python -m pytest tests --durations=25

bench: $(STAMP)
	$(BIN)/metaray bench --output bench.json --readme README.md

lint: $(STAMP)
	$(BIN)/ruff check metaray tests

clean:
	rm -rf runs .pytest_cache
