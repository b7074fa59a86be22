# `make demo` and `make test` each create or reuse .venv and install what they need.
# torch is pinned so these machines take the local CPU wheel instead of several GB of CUDA.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
TORCH  := torch==2.13.0

.PHONY: demo test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(VENV)/.installed-base: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q $(TORCH)
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.installed-base
	$(BIN)/pip install -q -e ".[test]"
	touch $@

demo: $(VENV)/.installed-base
	$(BIN)/flashvaed demo --out demo-output

test: $(VENV)/.installed-test
	$(BIN)/ruff check flashvaed tests benchmarks scripts
	$(BIN)/python -m pytest -q

lint: $(VENV)/.installed-test
	$(BIN)/ruff check flashvaed tests benchmarks scripts
	$(BIN)/ruff format --check flashvaed tests benchmarks scripts

bench: $(VENV)/.installed-base
	$(BIN)/python benchmarks/teacher_decode.py

clean:
	rm -rf demo-output .pytest_cache .ruff_cache
