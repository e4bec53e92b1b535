# Two commands on a fresh machine: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Installed with --no-deps (see pyproject.toml); its needs are declared there.
NODEPS := insightface==2.1

export RAY_AUTH_MODE := disabled
export RAY_USAGE_STATS_ENABLED := 0

.PHONY: setup demo test clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip setuptools wheel
	$(BIN)/python -m pip install -q -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps $(NODEPS)
	@touch $(STAMP)

demo: setup
	$(BIN)/corpus-anon demo --out ./demo-output

test: setup
	$(BIN)/python -m pytest -q tests

clean:
	rm -rf $(VENV) demo-output .pytest_cache
