# Set-up contract: `make demo` and `make test` bootstrap .venv from Python >= 3.12 when missing.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PYTEST_ARGS ?=

# The first interpreter on PATH that is Python >= 3.12 (pyenv picks 3.12 from .python-version).
PYTHON ?= $(shell for p in python3.12 python3.13 python3.14 python3; do \
	command -v $$p >/dev/null 2>&1 && $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null \
	&& { echo $$p; break; }; done)

.PHONY: venv demo test bench examples lint docs clean

$(VENV)/.installed: pyproject.toml
	@if [ -z "$(PYTHON)" ]; then echo "error: Python >= 3.12 not found on PATH" >&2; exit 1; fi
	@test -x $(PY) || { echo "creating $(VENV) with $(PYTHON)"; $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[fem,dev]"
	@touch $@

venv: $(VENV)/.installed

demo: venv
	$(PY) -m vcnn.demo

test: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pytest -q $(PYTEST_ARGS)

# Benchmarks print Markdown tables (and keep a copy under results/); BENCH_ARGS=--quick for a short run.
# The closure benchmark compares with the inference code and model of BASELINE (a git revision).
BENCH_ARGS ?=
BASELINE ?= 6b28f81
bench: venv
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) experiments/bench_pipeline.py
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) experiments/bench_clouds.py $(BENCH_ARGS)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) experiments/bench_closure.py --baseline $(BASELINE) $(BENCH_ARGS)
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) experiments/bench_closure.py --resolutions 0.5 1 2

# The configuration reference, generated from the config classes (tests/test_docs.py fails when
# it is stale), and the API reference from the docstrings (pdoc; HTML in docs/api/, git-ignored).
API_PACKAGES ?= vcnn solvers meshes
API_MODULES = import importlib, pkgutil; print(" ".join(name for package in "$(API_PACKAGES)".split() \
	for name in [package] + [m.name for m in pkgutil.walk_packages( \
	importlib.import_module(package).__path__, package + ".")] if "._" not in name))
docs: venv
	$(PY) -m vcnn.config_reference > docs/configuration.md.tmp
	mv docs/configuration.md.tmp docs/configuration.md
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pdoc -d google -o docs/api $$($(PY) -c '$(API_MODULES)')
	@echo "configuration reference: docs/configuration.md; API reference: docs/api/index.html"

# The examples (integral, atoms, the 3-D study), one command each; EXAMPLES_ARGS= for the full runs.
# One thread each: their many small tensor operations run slower with two (measured).
EXAMPLES_ARGS ?= --quick
examples: venv
	OMP_NUM_THREADS=1 PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) experiments/integral/run.py $(EXAMPLES_ARGS)
	OMP_NUM_THREADS=1 PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) experiments/atoms/run.py $(EXAMPLES_ARGS)
	OMP_NUM_THREADS=1 PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) experiments/hills3d/run.py $(EXAMPLES_ARGS)

lint: venv
	$(VENV)/bin/ruff check .

clean:
	rm -rf $(VENV) build *.egg-info
