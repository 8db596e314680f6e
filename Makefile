# pgfleet: `make run` and `make test` are all a fresh Debian/Ubuntu host (as root) needs.
SHELL := /bin/bash
VENV := .venv
PGFLEET := $(VENV)/bin/pgfleet
PYTEST_ARGS ?=
# flags for `pgfleet up`, e.g. make run ARGS="--listen 0.0.0.0:6432 --log-format json"
ARGS ?=

.PHONY: deps deps-run run test test-fast bench clean

# everything: the daemon's packages and the tests', benchmarks' and microVM tool chain
deps:
	@./scripts/install-deps.sh test

# only what the daemon needs
deps-run:
	@./scripts/install-deps.sh run

run: deps-run
	$(PGFLEET) up $(ARGS)

test: deps
	@./scripts/run-tests.sh $(PYTEST_ARGS)

# the fast layer alone (tests/unit: fake driver, pure helpers): seconds, no root, no Postgres
test-fast: deps
	@./scripts/run-tests.sh --fast $(PYTEST_ARGS)

bench: deps
	$(VENV)/bin/python bench/wake.py
	$(VENV)/bin/python bench/proxy.py
	$(VENV)/bin/python bench/microvm.py
	$(VENV)/bin/python bench/http_sql.py
	$(VENV)/bin/python bench/branches.py

clean:
	rm -rf $(VENV) .pytest_cache
