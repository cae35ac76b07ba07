# The two commands of the README: `make demo` runs the whole local DAG, `make test` runs the tests.
# Both create .venv and install Debian's data packages when missing, and are safe to run twice.
.PHONY: demo test setup stop bench ui-check

setup:
	@scripts/ensure_data_packages.sh
	@scripts/ensure_venv.sh

demo: setup
	@scripts/run_local.sh

# Two pytest-xdist workers, one test file each at a time (module fixtures stay shared): most of the suite
# waits on Prefect servers, subprocesses and rendezvous rather than computing, so two workers on 2 cores
# take ~30% less wall time than one; files go out slowest first (tests/conftest.py says why).
# `make test PYTEST_ARGS=-q` runs it in one process.
PYTEST_ARGS ?= -n 2 --dist loadfile --no-loadscope-reorder

test: setup
	.venv/bin/python -m pytest $(PYTEST_ARGS)

stop:
	-PREFECT_HOME=$(CURDIR)/.prefect .venv/bin/prefect server stop

bench: setup
	@scripts/ensure_data_packages.sh --bench
	.venv/bin/python -m bench.run_all

# Check the last curate-and-pretrain run in the UI with headless Chromium; keeps docs/ui-flow-run.png.
ui-check:
	PREFECT_API_URL=http://127.0.0.1:4200/api .venv/bin/python scripts/ui_check.py
