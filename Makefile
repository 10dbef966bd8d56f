# The two set-up commands of a fresh machine: `make demo` and `make test`.
# Each creates .venv and installs the locked environment (requirements.lock) plus this package.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_OUT ?= runs/demo
export HF_HUB_OFFLINE := 1

.PHONY: demo test test-slow lint bench probes clean

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

# Benchmarks print JSON lines. The probes read a trained run (`make probes RUN=runs/blip3o`); the other
# scripts build what they time themselves. common.py is their shared module, not a benchmark.
PROBES := $(shell grep -l 'add_argument..runs\?"' benchmarks/*.py)
BENCHES := $(filter-out benchmarks/common.py $(PROBES),$(wildcard benchmarks/*.py))

bench: $(STAMP)
	@set -e; for b in $(BENCHES); do $(PY) $$b; done

probes: $(STAMP)
	@test -n "$(RUN)" || { echo "usage: make probes RUN=DIR (a trained run directory)"; exit 2; }
	@failed=; for p in $(PROBES); do $(PY) $$p $(RUN) || failed="$$failed $$p"; done; \
	test -z "$$failed" || { echo "failed on $(RUN) (a probe of the other model family exits with its reason):$$failed"; exit 1; }

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
