# The two commands of README: `make demo` (the main job) and `make test` (the suite).
# Both create the virtual environment from nothing when it is absent.
PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?=
# --no-compile: no .pyc for every installed file up front (torch alone has thousands);
# Python writes them for the modules it imports
PIP_FLAGS = -q --disable-pip-version-check --no-compile $(if $(CONSTRAINTS),-c $(CONSTRAINTS))

.PHONY: demo test clean

$(VENV)/.installed: pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install $(PIP_FLAGS) -U pip
	$(VENV)/bin/python -m pip install $(PIP_FLAGS) -e ".[test,bench]"
	touch $@

demo: $(VENV)/.installed
	$(VENV)/bin/python -m benchmarks.quality --preset demo

# Three processes (the model ports, the rest, then sequence parallelism on 8 fake CPU
# devices): one process for everything grows past what jaxlib 0.10.2's CPU compiler
# survives (a segfault late in the run), and the device count is fixed when jax starts.
test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS) tests/models
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS) tests --ignore=tests/models --ignore=tests/parallel
	XLA_FLAGS=--xla_force_host_platform_device_count=8 $(VENV)/bin/python -m pytest -q $(PYTEST_ARGS) tests/parallel

clean:
	rm -rf .venv .venv312 .pytest_cache
