# The two commands that set up a fresh Linux machine (Python 3.10+ with venv):
#   make serve   create .venv if needed, then run the server on the shipped models.yaml
#   make test    create .venv if needed, then lint and run the test suite (CPU, no network)
PYTHON ?= python3
VENV   ?= .venv
# The CPU build is enough for the tests; on a GPU box install a CUDA build of torch instead.
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: serve test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --quiet --upgrade pip
	$(VENV)/bin/python -m pip install --quiet "$(TORCH)"
	$(VENV)/bin/python -m pip install --quiet -e ".[test,ray]"
	touch $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/craftserve serve $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: $(STAMP) lint
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

bench: $(STAMP)
	$(VENV)/bin/python scripts/bench_http.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
