# Every target creates .venv if it is missing and installs what it needs.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# The project alone, no extras: what `make demo` needs.
CORE_STAMP := $(VENV)/.installed-core

# Other Pythons that `make test` also runs the core tests on, each in its own .venv-X.Y with
# `.[test]` only (no torch, Ray, docs or bench extras). `make test PYTHONS=` skips them.
PYTHONS ?= 3.10 3.13
PYENV_ROOT ?= $(or $(shell pyenv root 2>/dev/null),$(HOME)/.pyenv)
# The interpreter for version $(1): pyenv's build of it, else pythonX.Y on the PATH.
python_for = $(firstword $(wildcard $(PYENV_ROOT)/versions/$(1).*/bin/python$(1)) \
                         $(shell command -v python$(1) 2>/dev/null))
# Fast and torch-free: pools, decorators, errors, and every example of the docs.
CORE_TESTS := tests/test_pools.py tests/test_decorators.py tests/test_errors.py tests/test_docs.py
CORE_DESELECT := --deselect tests/test_docs.py::test_mkdocs_builds_strict

# Runs a pytest command; pytest's exit status 5 (no tests collected) is said out loud and fails,
# so a run that tested nothing is never taken for a pass, nor fails without a reason.
PYTEST := sh -c '"$$@"; rc=$$?; [ $$rc -ne 5 ] || echo "error: pytest collected no tests: $$*" >&2; exit $$rc' pytest

.PHONY: test test-pythons demo bench docs lint clean

$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch first, pinned: a bare requirement would pull a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[all]'
	touch $(STAMP) $(CORE_STAMP)

$(CORE_STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $(CORE_STAMP)

.venv-%/.installed: pyproject.toml
	@test -n "$(call python_for,$*)" || { echo "error: no Python $* (pyenv install $*, or make test PYTHONS=)" >&2; exit 1; }
	test -d .venv-$* || $(call python_for,$*) -m venv .venv-$*
	.venv-$*/bin/python -m pip install --quiet --upgrade pip
	.venv-$*/bin/pip install --quiet -e '.[test]'
	touch $@

test: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy
	$(PYTEST) $(BIN)/python -m pytest src tests
	$(MAKE) --no-print-directory test-pythons

# Every Python runs even when one fails, so one CI run shows them all.
test-pythons: $(foreach version,$(PYTHONS),.venv-$(version)/.installed)
	@status=0; for version in $(PYTHONS); do \
		echo "== core tests on Python $$version"; \
		$(PYTEST) .venv-$$version/bin/python -m pytest -q $(CORE_TESTS) $(CORE_DESELECT) || status=$$?; \
	done; exit $$status

demo: $(CORE_STAMP)
	$(BIN)/twat-mp demo

# graph.py compares with Dask (the bench extra) and ThinkAgain 0.3.0, which the registry does not
# serve: its wheel comes from ../shared/peers/ when there is one, else graph.py skips its rows.
bench: $(STAMP)
	@wheel=$$(ls ../shared/peers/thinkagain-0.3.0-*.whl 2>/dev/null | head -n 1); \
	if [ -n "$$wheel" ]; then $(BIN)/pip install --quiet "$$wheel"; \
	else echo "note: no ThinkAgain 0.3.0 wheel in ../shared/peers/: benchmarks/graph.py and benchmarks/services.py skip their rows"; fi
	$(BIN)/python benchmarks/run.py
	$(BIN)/python benchmarks/faults.py
	$(BIN)/python benchmarks/graph.py
	$(BIN)/python benchmarks/devices.py
	$(BIN)/python benchmarks/services.py

docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/mypy

clean:
	rm -rf $(VENV) $(foreach version,$(PYTHONS),.venv-$(version)) site .pytest_cache .mypy_cache
