# The two set-up commands (see README): `make demo` runs the main job, `make test` the tests.
# Each creates .venv and installs what it needs on first use; later runs reuse it.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Real datasets for integration tests and benchmarks (read-only, never copied into the repo).
export DINOTUNE_SHARED ?= $(abspath ../shared)

.PHONY: demo test test-slow examples hostile docs bench install install-dev clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-dev: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: $(VENV)/.installed
	$(BIN)/dinotune demo --out runs/demo

test: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q

test-slow: $(VENV)/.installed-dev
	$(BIN)/python -m pytest -q -m slow

# The tutorials in examples/, converted to notebooks and executed (nothing written into the repo).
examples: $(VENV)/.installed-dev
	$(BIN)/python examples/run_all.py

# The documentation site (mkdocs.yml, docs/) into site/; --strict fails on any warning: a broken link,
# a docstring the API page cannot read, a flags marker naming no command (docs/hooks.py).
docs: $(VENV)/.installed-dev
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --quiet -d site

# The hostile-input replay (benchmarks/bench_hostile.py): every case of the hardening reviews, end to
# end; fails when one is not handled. A few minutes on 2 cores, so it runs beside the suite, not in it.
hostile: $(VENV)/.installed-dev
	$(BIN)/python benchmarks/bench_hostile.py --out runs/hostile/hostile-inputs

clean:
	rm -rf $(VENV) runs
