# TRACI developer and user entry points. `make run` and `make test` set everything up first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CONFIG ?= examples/digits.yaml

.PHONY: install run test test-fast test-integration chaos bench gpu-check lint format clean

install: $(STAMP)

# torch is pinned to the CPU wheel this machine carries (a looser pin pulls a CUDA build).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet "torch==2.13.0"
	$(BIN)/pip install --quiet -e ".[dev,tracking]"
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/traci up $(CONFIG) --fresh

test: $(STAMP)
	$(BIN)/pytest -q

test-fast: $(STAMP)
	$(BIN)/pytest -q -m "not integration"

test-integration: $(STAMP)
	$(BIN)/pytest -q -m integration

# ~2 minutes of SIGKILLs against a training run, plus its fault-free twin; prints a report.
chaos: $(STAMP)
	$(BIN)/pytest -q -s -m chaos

# The benchmark suite: TRACI against its baselines in one invocation (bench/results/latest.json).
bench: $(STAMP)
	$(BIN)/python -m bench.run

# The GPU path on one CUDA device (< 5 min): digits through traci up and the fused reference,
# all on cuda, bfloat16 on the wire (bench/results/gpu.json). Needs a CUDA build of torch;
# exits 2 without a GPU. ARGS="--device cpu --steps 40" is a dry run of the same code.
gpu-check: $(STAMP)
	$(BIN)/python -m bench.gpu_check $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache *.egg-info
