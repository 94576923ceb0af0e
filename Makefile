# Every target works on a fresh clone: `make test` builds .venv first.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: venv test demo chaos bench lint types docs clean

venv: $(STAMP)

# Reinstall only when the project's metadata changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

# The whole check, as CI runs it: lint, strict types, the docs (warnings as errors), then the
# suite. Extra pytest arguments: make test ARGS='-k cluster -x'
test: lint types docs
	$(BIN)/pytest $(ARGS)

chaos: venv
	$(BIN)/pytest -m chaos $(ARGS)

demo: venv
	$(BIN)/python -m example_project.demo

# Figures of docs/benchmarks.rst: make bench ARGS='--broker redis --quick'.
# The Ray column needs the optional extra: $(BIN)/pip install -e '.[bench]'
bench: venv
	$(BIN)/python -m benchmarks.run $(ARGS)

lint: venv
	$(BIN)/ruff check .
	$(BIN)/lint-imports

types: venv
	$(BIN)/mypy forseti_celery

# The docs site, warnings as errors (as `tox -e docs`): open docs/_build/html/index.html.
docs: venv
	$(BIN)/sphinx-build -W -b html docs docs/_build/html

clean:
	rm -rf $(VENV) .tox .mypy_cache .pytest_cache .ruff_cache build dist *.egg-info docs/_build
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
