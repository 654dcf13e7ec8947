# `make demo` and `make test` each set up the virtual environment on a fresh machine, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
OUT ?= runs/demo
# Test files run in parallel, one file per worker (its module fixtures built once): 2 = the CI machine's cores.
WORKERS ?= 2

.PHONY: install demo test lint clean

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# Pinned: the tested build (on these machines pip takes the CPU wheel already on disk).
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/mobilebert demo --out $(OUT)

test: $(STAMP)
	$(PY) -m pytest -n $(WORKERS) --dist loadfile

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests experiments benchmarks

clean:
	rm -rf $(VENV) runs
