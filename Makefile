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

# Two workers of one torch thread each (tests/conftest.py): the tiny models gain nothing from a
# second thread, and two files at a time halve the wall time on a 2-core machine.
TEST_WORKERS ?= 2
test: $(VENV)/.installed-test
	$(BIN)/ruff check flashvaed tests benchmarks scripts
	$(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

lint: $(VENV)/.installed-test
	$(BIN)/ruff check flashvaed tests benchmarks scripts
	$(BIN)/ruff format --check flashvaed tests benchmarks scripts

# `make bench`: each preset in BENCH_MODELS vs its family's released teacher (random weights) and
# diffusers' own VAE class, torch eager then ONNX Runtime, 256x256, 9 frames (docs/cli.md, "bench").
# flash-wan2.1 alone takes about 5 min on a 2-core CPU; BENCH_MODELS="flash-wan2.1 flash-wan2.2"
# adds the Wan2.2 rows (its teacher is several times slower). JSON beside the tables in benchmarks/.
BENCH_MODELS ?= flash-wan2.1
BENCH_ARGS   ?= --height 256 --width 256 --frames 9 --repeats 3
bench: $(VENV)/.installed-test
	$(BIN)/flashvaed bench $(BENCH_MODELS) $(BENCH_ARGS) --json benchmarks/bench-torch.json
	$(BIN)/flashvaed bench $(BENCH_MODELS) $(BENCH_ARGS) --runtime onnxruntime \
		--json benchmarks/bench-onnxruntime.json

clean:
	rm -rf demo-output .pytest_cache .ruff_cache
