# Everything starts from a fresh machine with only Python 3.11 and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

## run: serve the webhook over TLS on 0.0.0.0:8443 with self-generated dev certs in certs/
run: $(STAMP)
	$(BIN)/nix-flake-webhook serve

## test: lint, type-check and run the whole test suite
test: lint
	$(BIN)/pytest -q

lint: $(STAMP)
	$(BIN)/ruff check webhook tests bench
	$(BIN)/ruff format --check webhook tests bench
	$(BIN)/mypy

## bench: print the codec, admission and load benchmarks (not part of the tests; see bench/RESULTS.md)
bench: $(STAMP)
	$(BIN)/python -m bench.codec
	$(BIN)/python -m bench.admission
	$(BIN)/python -m bench.load

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache .hypothesis
