# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
TORCH_PIN ?= torch==2.13.0

.PHONY: env demo test results bench notebooks clean

$(BIN)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# Pin the CPU build of torch that lies on this machine's disk before anything can pull a CUDA one.
	$(BIN)/pip install -q $(TORCH_PIN)
	$(BIN)/pip install -q -e '.[dev,notebooks]'
	touch $@

env: $(BIN)/.installed

demo: env
	$(BIN)/python -m sdknobs.demo --out out --overwrite   # re-runnable: replaces its own pictures

test: env
	$(BIN)/python -m pytest -q

results: env
	$(BIN)/sdknobs bench quality --grid out/quality_samples.png --overwrite
	$(BIN)/sdknobs bench analyzers --failures docs/quality_analyzer_failures.png --overwrite   # analyzer accuracy per tier
	$(BIN)/python -m sdknobs.lora.results    # ~10 min on 1 core: docs/lora.md, docs/lora/
	$(BIN)/python -m sdknobs.ti.results      # ~8 min on 1 core: docs/textual_inversion.md

notebooks: env   # the course notebooks at full length (~10 min on 1 core): out/notebooks/, docs/notebooks/
	$(BIN)/python notebooks/run.py --threads 1

bench: env
	$(BIN)/python benchmarks/bench_inference.py --repeats 7
	$(BIN)/python benchmarks/bench_lora_train.py --batch-sizes 1,4,16 --steps 40 --repeats 3

clean:
	rm -rf $(VENV) out build *.egg-info src/*.egg-info
