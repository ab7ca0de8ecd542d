# Two commands: `make demo` (the main job: a consortium on this machine) and `make test`;
# CI also runs `make lint` (ruff).
# Each creates .venv on first use: torch 2.13.0 (CPU build) first, then fedgen.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.fedgen-installed

.PHONY: demo test lint venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# Pinned first: an unpinned torch would resolve to a CUDA build of several GB.
	$(BIN)/python -m pip install --quiet torch==2.13.0
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# DEMO_ARGS: extra `fedgen demo` options, e.g. make demo DEMO_ARGS="--sites 5 --rounds 4".
demo: venv
	$(BIN)/fedgen demo $(DEMO_ARGS) --out runs/demo-$$(date -u +%Y%m%dT%H%M%SZ)

test: venv
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

clean:
	rm -rf $(VENV) runs build *.egg-info
