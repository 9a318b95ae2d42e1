# `make test` and `make bench` work as the first command on a fresh machine: each creates .venv.
# On a machine whose python3 already has the dependencies (the GPU machine), pass SYSTEM_PYTHON=1.
ifdef SYSTEM_PYTHON
PY := python3
export PYTHONPATH := $(CURDIR)
VENV_TEST :=
VENV_DEV :=
VENV_BENCH :=
VENV_DOCS :=
else
PY := .venv/bin/python
VENV_TEST := .venv/.test
VENV_DEV := .venv/.dev
VENV_BENCH := .venv/.bench
VENV_DOCS := .venv/.docs
endif

.PHONY: test test-gpu bench bench-save lint format docs clean

.venv/bin/python:
	python3 -m venv .venv
	.venv/bin/python -m pip install -q --upgrade pip

.venv/.test: .venv/bin/python pyproject.toml
	$(PY) -m pip install -q -e '.[test,plot,mpi,mkl,jit]'
	touch $@

.venv/.dev: .venv/bin/python pyproject.toml
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

.venv/.bench: .venv/bin/python pyproject.toml
	$(PY) -m pip install -q -e '.[plot,mkl,jit]'
	touch $@

.venv/.docs: .venv/bin/python pyproject.toml
	$(PY) -m pip install -q -e '.[docs]'
	touch $@

test: $(VENV_TEST)
	$(PY) -m pytest -q

# fails when every GPU test skipped (no CUDA device answered): a GPU check that ran nothing is not a pass
test-gpu: $(VENV_TEST)
	$(PY) -m pytest -q -m gpu -rs --require-gpu

bench: $(VENV_BENCH)
	$(PY) -m gpubptt bench

# Regenerate committed results: make bench-save BENCH_NAME=cpu-default BENCH_ARGS='--compare torch'
BENCH_NAME ?= cpu-default
BENCH_ARGS ?=
bench-save: $(VENV_BENCH)
	$(PY) -m gpubptt bench $(BENCH_ARGS) --output benchmarks/$(BENCH_NAME).json --plot benchmarks/$(BENCH_NAME).png

# The documentation site into site/ (ignored), strict: a broken link or reference fails the build.
docs: $(VENV_DOCS)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict --quiet --site-dir site

lint: $(VENV_DEV)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(VENV_DEV)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

clean:
	rm -rf .venv .pytest_cache .ruff_cache .hypothesis site
