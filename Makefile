# Two commands on a fresh machine with Python 3.10+ and make:
#   make quickstart   — install into .venv, then run the offline demo
#   make test         — install with the test references, then run the whole suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
UNAME := $(shell uname -s)
# On Linux plain mlx-lm installs no MLX: take the CPU back end (use MLX_EXTRA=cuda for NVIDIA).
MLX_EXTRA ?= $(if $(filter Linux,$(UNAME)),cpu,)
EXTRAS := $(MLX_EXTRA)

.PHONY: install install-test quickstart test lint bench fuzz clean

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

install: $(VENV)/bin/python
	$(PY) -m pip install -q ".[$(EXTRAS)]"

install-test: $(VENV)/bin/python
	# torch first and pinned: anything that pulls torch later must not fetch a CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q ".[$(if $(EXTRAS),$(EXTRAS)$(comma))test]"

quickstart: install
	$(VENV)/bin/mlxlocal quickstart

# Test processes (pytest-xdist): one per core, at most 4; each test file runs whole in one of
# them, so its module fixtures are built once. TEST_JOBS=0 runs everything in this process.
TEST_JOBS ?= auto
test: install-test
	cd tests && ../$(VENV)/bin/python -m pytest -q -n $(TEST_JOBS) --maxprocesses 4 --dist loadfile

lint: install-test
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

FUZZ_MINUTES ?= 5
FUZZ_SEED ?= 1
FUZZ_JOBS ?= 2
FUZZ_SAMPLE ?=
# Hostile inputs for every verb, then seeded random mutations (README "Tests").
fuzz: install-test
	cd tests && ../$(VENV)/bin/python hostile_corpus.py --minutes $(FUZZ_MINUTES) \
		--seed $(FUZZ_SEED) --jobs $(FUZZ_JOBS) $(if $(FUZZ_SAMPLE),--sample $(FUZZ_SAMPLE),)

bench: install-test
	$(PY) -m benchmarks --suite all --size tiny

clean:
	rm -rf $(VENV) build *.egg-info

comma := ,
