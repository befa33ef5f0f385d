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

.PHONY: venv demo test lint test-fast benchmark benchmark-privacy benchmark-scale benchmark-heterogeneity benchmark-robust \
	benchmark-generalisation clean

venv: $(STAMP)

# Re-install whenever the project's dependency list changes.
$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	@touch $(STAMP)

demo: venv
	$(BIN)/medfed simulate --sites 3 --rounds 3 --run-config "local-epochs=5"

# Lint and import order first (ruff, configured in pyproject.toml), then every test, in TEST_WORKERS processes
# (pytest-xdist; a test file stays in one process, so its module fixtures are built once). TEST_WORKERS=0: serial.
TEST_WORKERS ?= 2
test: venv lint
	$(BIN)/python -m pytest $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder)

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
	$(BIN)/python benchmarks/augment_throughput.py

# Privacy/accuracy study on PneumoniaMNIST from ../shared/data (about 20 min on 2 cores).
benchmark-privacy: venv
	$(BIN)/python benchmarks/privacy_study.py

# 100 simulated phantom sites on this machine: peak memory of the process tree, per-round overhead (10-20 min).
benchmark-scale: venv
	$(BIN)/python benchmarks/scale.py --sites 100 --rounds 2
# Heterogeneity study on cxr-pneumonia from ../shared/data: 5 partition settings x strategies, the local-only
# baseline, benefit of joining, on a seeded 800-image patient subset (the README's table; 30-50 min on 2 cores).
# All 5232 images with pooled baselines too: python benchmarks/heterogeneity.py (about 3 h here).
benchmark-heterogeneity: venv
	nice -n 19 $(BIN)/python benchmarks/heterogeneity.py --images 800 --rounds 5 --seeds 0 --baselines local
# One sign-flipping site among 5 under FedAvg, the norm screen and the robust strategies (9 simulations;
# about 1-2 h on a loaded 2-core machine). Finished runs in benchmarks/out/robust-runs/ are reused.
benchmark-robust: venv
	nice -n 19 $(BIN)/python benchmarks/robust_aggregation.py
# fast vs accurate recipes on a shifted, held-out site of the real data (pneumonia-cxr, lung-seg), 3 seeds (each
# another partition and held-out site); vit-tiny / fcn at seed 0. Finished runs in its JSON are reused.
benchmark-generalisation: venv
	$(BIN)/python benchmarks/generalisation.py --seeds 0,1,2 --extra-seeds 0

clean:
	rm -rf results .pytest_cache
