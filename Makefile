# The two set-up commands (README.md): `make study` and `make test`.
# Each creates .venv on first use and installs the project into it.
PY      := .venv/bin/python
STAMP   := .venv/.installed
PYTEST_WORKERS ?= 2

.PHONY: study test lint clean

$(STAMP): pyproject.toml
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

study: $(STAMP)
	$(PY) studies/compare.py

test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .
	$(PY) -m pyright

clean:
	rm -rf .venv results .pytest_cache
