# The two commands that set up a fresh Linux machine (Python 3.10+ with venv):
#   make serve     create .venv if needed, install craftserve, run it on the shipped models.yaml
#   make test      create .venv if needed, add the test tools, lint, run the fast tier of the suite
#                  (-m "not slow": unit tests and the tiny-model HTTP suites of every dialect)
# and, for everything (what .ci/run runs):
#   make test-all  add the [ray] extra too, lint, run every test (the slow tier included: soak,
#                  Ray, browser, fuzzing, subprocess signals, the 2 GB checkpoint, full sizes)
PYTHON ?= python3
VENV   ?= .venv
# The CPU build is enough for the tests; on a GPU box install a CUDA build of torch instead.
TORCH  ?= torch==2.13.0
# pytest-xdist workers of make test-all, one per core of the 2-core build machine (0: one process)
WORKERS ?= 2

# One stamp per set of extras: `make serve` installs what serving needs, `make test` then adds
# the test tools, `make test-all` the Ray extra. Each is redone when pyproject.toml changes.
STAMP      := $(VENV)/.installed
STAMP_TEST := $(VENV)/.installed-test
STAMP_RAY  := $(VENV)/.installed-test-ray

.PHONY: serve test test-all lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(VENV)/bin/python -m pip install --quiet -e .
	touch $(STAMP)

$(STAMP_TEST): $(STAMP) pyproject.toml
	$(VENV)/bin/python -m pip install --quiet -e ".[test]"
	touch $(STAMP_TEST)

$(STAMP_RAY): $(STAMP_TEST) pyproject.toml
	$(VENV)/bin/python -m pip install --quiet -e ".[test,ray]"
	touch $(STAMP_RAY)

serve: $(STAMP)
	$(VENV)/bin/craftserve serve $(ARGS)

lint: $(STAMP_TEST)
	$(VENV)/bin/ruff check .

test: $(STAMP_TEST) lint
	$(VENV)/bin/python -m pytest -q -m "not slow" $(PYTEST_ARGS)

test-all: $(STAMP_RAY) lint
	$(VENV)/bin/python -m pytest -q -n $(WORKERS) --dist loadgroup $(PYTEST_ARGS)

bench: $(STAMP_TEST)
	$(VENV)/bin/python scripts/bench_http.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
