# graft-vfs: every target sets itself up (a virtual environment with the project installed).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench

.PHONY: install test demo bench bench-quick bench-docs soak clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# Lint, then the suite in two worker processes (most tests wait on servers and links, so
# two workers halve the time on two cores; a lone `pytest` runs serially as before).
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q -n 2 --dist worksteal

demo: $(STAMP)
	$(PY) -m graft_vfs.demo

$(BENCH_STAMP): $(STAMP) pyproject.toml
	$(PY) -m pip install --quiet -e '.[dev,bench]'
	touch $(BENCH_STAMP)

# Benchmarks (issues 4 and 11; not part of `make test`): graft and its baselines on the
# same >= 100 MB database over three simulated links, then the capacity run (one server,
# 8 client processes). Writes benchmarks/results/latest.json, latest.png and
# capacity.json and prints tables. bench-quick: fewer repetitions, about 6 minutes.
# bench-docs: copy the latest results into README's benchmark section and docs/capacity.md.
bench: $(BENCH_STAMP)
	$(PY) -m benchmarks.run
	$(PY) -m benchmarks.capacity

bench-quick: $(BENCH_STAMP)
	$(PY) -m benchmarks.run --quick
	$(PY) -m benchmarks.capacity --quick

bench-docs: $(BENCH_STAMP)
	$(PY) -m benchmarks.report --readme
	$(PY) -m benchmarks.capacity --doc

# The bank-transfer tests (3 servers, 6 clients; servers killed and restarted; store
# faults switched on and off; background push and pull): a 5-minute workload each
# instead of 6-10 s, and the client-side variants (background sync, transactions,
# rebase, spread layout) on every store kind, not only on the directory store as in
# `make test`; and the model tests (tests/test_model.py, tests/test_model_rebase.py)
# with 400 examples each instead of `make test`'s 10; and the client-side modules
# (CLIENT_SIDE_STORES in tests/support/servers.py: CLI, shell, replica, SQLite features,
# cache, pins) on S3 as well, which `make test` runs on the directory store only.
CLIENT_SIDE_TESTS := tests/test_cli.py tests/test_cli_sql.py tests/test_shell.py \
	tests/test_ecosystem.py tests/test_replica.py tests/test_sqlite_compat.py \
	tests/test_cache_size.py tests/test_pin_race.py
soak: $(STAMP)
	GRAFT_SOAK_SECONDS=300 $(PY) -m pytest -q tests/test_scale_out.py tests/test_bank_faults.py
	GRAFT_MODEL_EXAMPLES=400 $(PY) -m pytest -q tests/test_model.py tests/test_model_rebase.py
	GRAFT_ALL_STORES=1 $(PY) -m pytest -q -n 2 --dist worksteal $(CLIENT_SIDE_TESTS)

clean:
	rm -rf $(VENV) .pytest_cache build *.egg-info
