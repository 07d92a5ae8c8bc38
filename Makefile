# The two set-up commands (README.md): `make study` and `make test`.
# Each creates .venv on first use and installs the project into it, with the exact package
# versions known to work (constraints.txt; pyproject.toml holds the compatible ranges).
PY      := .venv/bin/python
STAMP   := .venv/.installed

.PHONY: study study-table test lint typecheck docs clean

$(STAMP): pyproject.toml constraints.txt
	python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,docs,playground]'
	touch $(STAMP)

# `make study` trains the main comparison afresh (every cell, compile included) into
# results/local, which git ignores, and ends with a reproduction report against the
# committed results/compare. `make study-table` rebuilds the committed table and figures
# from the committed cells, training nothing (tracing each cell to check that it holds the
# current code's key, which the table's header states).
study: $(STAMP)
	$(PY) studies/compare.py --out results/local --figures results/local/figures \
		--reproduce results

study-table: $(STAMP)
	$(PY) studies/compare.py --report-only --check

# Lint, type check, then the whole test suite, `slow` tests included (CI runs everything):
# one worker per core of a 2-core machine, each test file on one worker (the files share
# compiled programs through module-scoped fixtures), the longest files first (conftest's
# LONGEST_FIRST). For a quicker loop while developing,
# leave out the tests marked `slow` (Brax training, MJX compiles, long runs):
#   .venv/bin/python -m pytest -q -n 2 --dist loadfile -m "not slow"
WORKERS ?= 2
test: lint typecheck
	$(PY) -m pytest -q -n $(WORKERS) --dist loadfile --no-loadscope-reorder

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

typecheck: $(STAMP)
	$(PY) -m pyright

# The documentation site, into site/; any warning fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(PY) -m mkdocs build --strict

# Removes what make and the tools create: .venv, caches, the built site, and the results
# that are not committed (git's ignored files under results/). Tracked files stay.
clean:
	rm -rf .venv .pytest_cache .ruff_cache site build diffsim.egg-info
	find . -name __pycache__ -type d -not -path './.git/*' -prune -exec rm -rf {} +
	if git rev-parse --is-inside-work-tree >/dev/null 2>&1; then \
		git clean -fdX -- results; \
	fi
