# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: env demo test results bench clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pin the CPU build of torch that lies on this machine's disk before anything can pull a CUDA one.
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev]'
	touch $@

env: $(BIN)/.installed

demo: env
	$(BIN)/python -m sdknobs.demo --out out

test: env
	$(BIN)/python -m pytest -q

results: env
	$(BIN)/sdknobs bench quality --grid out/quality_samples.png

bench: env
	$(BIN)/python benchmarks/bench_inference.py

clean:
	rm -rf $(VENV) out build *.egg-info src/*.egg-info
