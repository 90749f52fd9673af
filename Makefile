# The two commands a newcomer needs (see README.md):
#   make run   - a sidecar fed by Falco (or by the Falco double), alerts shown live
#   make test  - lint, type-check and the whole test suite
# Both create .venv and install everything on first use.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

BUF := tools/buf/node_modules/.bin/buf

.PHONY: run test lint lint-proto typecheck unit proto bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/python tools/run_local.py

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

# buf (protobuf lint and wire-compatibility checks) comes from the npm registry, pinned.
$(BUF): tools/buf/package.json tools/buf/package-lock.json
	npm ci --prefix tools/buf --no-audit --no-fund --loglevel=error
	touch $(BUF)

lint-proto: $(BUF)
	$(BUF) lint

typecheck: $(STAMP)
	$(BIN)/mypy

unit: $(STAMP) $(BUF)
	$(BIN)/python tools/pytest_strict.py

test: lint lint-proto typecheck unit

# Benchmarks (not part of `make test`): see bench/README.md. wrk comes from Debian's packages.
bench: $(STAMP)
	command -v wrk >/dev/null || (apt-get update && apt-get install -y wrk)
	$(BIN)/python -m bench.throughput
	$(BIN)/python -m bench.latency
	$(BIN)/python -m bench.stalled
	$(BIN)/python -m bench.propagation
	$(BIN)/python -m bench.validation

proto: $(STAMP)
	$(BIN)/python tools/gen_proto.py

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache tools/buf/node_modules
