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
# model upscalers; --no-deps, see pyproject.toml (its torchvision would replace the CPU torch)
SPANDREL ?= spandrel>=0.4,<0.5
# pytest-xdist workers of make test and of make test-all's first run, one per core of the
# 2-core build machine (WORKERS=0: one process)
WORKERS ?= 2
# make test-all's second run, in one process after the first: tests that need the machine to
# themselves: a local Ray cluster (ray.init(num_cpus=2) and its replicas), a craftserve process
# on a port picked free before it binds, the 6 GB checkpoint, full-size images under timeouts.
SERIAL := ray or subprocess or bigfile or fullsize

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
	$(VENV)/bin/python -m pip install --quiet --no-deps "$(SPANDREL)"
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
	$(VENV)/bin/python -m pytest -q -n $(WORKERS) -m "not slow" $(PYTEST_ARGS)

# Both runs go to the end; exit status 5 (no test selected) of one run is fine, of both is 5.
test-all: $(STAMP_RAY) lint
	first=0; second=0; \
	$(VENV)/bin/python -m pytest -q -n $(WORKERS) -m "not ($(SERIAL))" $(PYTEST_ARGS) || first=$$?; \
	$(VENV)/bin/python -m pytest -q -m "$(SERIAL)" $(PYTEST_ARGS) || second=$$?; \
	if [ $$first -eq 5 ] && [ $$second -eq 5 ]; then exit 5; fi; \
	for rc in $$first $$second; do case $$rc in 0|5) ;; *) exit $$rc ;; esac; done

bench: $(STAMP_TEST)
	$(VENV)/bin/python scripts/bench_http.py

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
