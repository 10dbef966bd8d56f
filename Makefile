# The two set-up commands of a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs the locked environment (requirements.lock) plus this package.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-slow lint bench clean

$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements.lock
	$(PY) -m pip install --quiet --no-deps -e .
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/blip3o demo --out $(DEMO_OUT)

test: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest

test-slow: $(STAMP)
	$(PY) -m pytest -m slow

bench: $(STAMP)
	@for b in benchmarks/*.py; do $(PY) $$b; done

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
