# flashsale — developer entry points. `make run` and `make test` work from a fresh clone.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.flashsale-installed
RUNTIME_STAMP := $(VENV)/.flashsale-runtime

export PY VENV

.DEFAULT_GOAL := help
.PHONY: help venv venv-runtime servers tools rules run test lint typecheck chaos bench soak loadtest sentinel clean

help:
	@echo "make run        start Redis, PostgreSQL, HTTP API, consumer and compensator (flashsale up)"
	@echo "make test       lint, typecheck and the whole test suite against real servers"
	@echo "make soak       5-minute memory soak: front RSS and Redis memory per order (bench/soak.py)"
	@echo "make sentinel   a Redis primary, a replica and 3 sentinels on loopback; prints the env to use"
	@echo "make lint | typecheck | chaos | bench | soak | loadtest | clean"

# The venv is (re)installed only when pyproject.toml or constraints.txt (the
# versions CI last passed with; regenerate with `pip freeze --exclude-editable`)
# is newer than a stamp:
# `make run` needs the package alone (a fresh clone is serving sooner), `make
# test` the dev extras too.
venv: $(STAMP)
venv-runtime: $(RUNTIME_STAMP)

$(BIN)/python:
	@$(PY) -m venv $(VENV) || { rm -rf $(VENV); \
		echo "could not create $(VENV) with $(PY) (Debian: apt-get install python3-venv)" >&2; \
		exit 1; }

$(RUNTIME_STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -c constraints.txt -e .
	@touch $@

$(STAMP): pyproject.toml constraints.txt | $(BIN)/python
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	@touch $@ $(RUNTIME_STAMP)

# Server binaries for the embedded Redis/PostgreSQL; skipped for a server whose
# URL (FLASHSALE_REDIS_URL / FLASHSALE_DATABASE_URL) is set.
servers: venv-runtime
	@if [ -z "$$FLASHSALE_REDIS_URL" ] || [ -z "$$FLASHSALE_DATABASE_URL" ]; then \
		bash scripts/ensure-servers.sh; \
	fi

run: venv-runtime servers
	$(BIN)/flashsale up

# Headless Chromium + chromedriver (the dashboard's browser test) and promtool
# (the alert rules), from Debian when missing.
tools:
	@bash scripts/ensure-tools.sh

# The Prometheus alert rules: valid, and each one fires on its synthetic series.
rules: tools
	promtool check rules deploy/prometheus/rules.yml
	cd deploy/prometheus && promtool test rules rules_test.yml

# Lint and typecheck first; any failure stops here with a non-zero status.
test: venv servers tools lint typecheck rules
	$(BIN)/pytest -q tests

lint: venv
	$(BIN)/ruff check .

typecheck: venv
	$(BIN)/mypy

# Every test with the chaos marker, wherever it lives (tests/chaos, and the
# Sentinel and Cluster replica tests in tests/integration); `make test` runs them too.
chaos: venv servers
	$(BIN)/pytest -q -m chaos tests

# The open-loop load generator (C, bench/openloop/openloop.c): built here, not committed.
OPENLOOP := bench/openloop/openloop
$(OPENLOOP): bench/openloop/openloop.c
	$${CC:-gcc} -O2 -Wall -Wextra -o $@ $<

bench: venv servers $(OPENLOOP)
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev,bench]'
	bash bench/ensure-wrk.sh
	$(BIN)/python -m bench.run

# SOAK_ARGS, e.g. make soak SOAK_ARGS="--minutes 1 --own-redis"
soak: venv servers
	bash bench/ensure-wrk.sh
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

# A Sentinel topology for trying failover by hand (flashsale/run/embedded/sentinel.py):
# prints FLASHSALE_REDIS_SENTINELS / _SENTINEL_MASTER; Ctrl-C stops it. Options
# with a value in one word, or quoted: make sentinel SENTINEL_ARGS=--replicas=2
sentinel: venv-runtime servers
	$(BIN)/python -m flashsale.run.embedded.sentinel $(SENTINEL_ARGS)

loadtest: venv servers
	$(BIN)/python -m loadtest.run

# Keeps .flashsale/ (the embedded servers' data): `rm -rf .flashsale` to reset it.
clean:
	rm -rf $(VENV) build dist .mypy_cache .ruff_cache .pytest_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
	find . -maxdepth 2 -name '*.egg-info' -type d -prune -exec rm -rf {} +
