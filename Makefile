# medfed: the two commands (`make demo`, `make test`) and their helpers.
# Each target creates or refreshes the virtual environment .venv first.

PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.medfed-installed

# Flower 1.41 must never install dependencies or phone home at run time.
export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION := 1
export FLWR_TELEMETRY_ENABLED := 0
export FLWR_DISABLE_UPDATE_CHECK := 1

.PHONY: venv demo test lint test-fast benchmark benchmark-privacy benchmark-generalisation clean

venv: $(STAMP)

# Re-install whenever the project's dependency list changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: venv
	$(BIN)/medfed simulate --sites 3 --rounds 3 --run-config "local-epochs=5"

# Lint and import order first (ruff, configured in pyproject.toml), then every test.
test: venv lint
	$(BIN)/python -m pytest

lint: venv
	$(BIN)/ruff check .

# Unit tests only (no Flower processes, no real data): seconds.
test-fast: venv
	$(BIN)/python -m pytest -m "not integration and not realdata"

benchmark: venv
	$(BIN)/python benchmarks/cli_startup.py
	$(BIN)/python benchmarks/train_throughput.py
	$(BIN)/python benchmarks/ingest.py
	$(BIN)/python benchmarks/dp_throughput.py

# Privacy/accuracy study on PneumoniaMNIST from ../shared/data (about 20 min on 2 cores).
benchmark-privacy: venv
	$(BIN)/python benchmarks/privacy_study.py

# fast vs accurate recipes on a shifted, held-out site of the real data (pneumonia-cxr, lung-seg; about 2 h on 2 busy cores).
benchmark-generalisation: venv
	$(BIN)/python benchmarks/generalisation.py

clean:
	rm -rf results .pytest_cache
