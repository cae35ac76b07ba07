"""Shared fixtures. Prefect tests share one temporary server (the harness takes ~20 s to start)."""

from __future__ import annotations

import os

import pytest

# Before anything imports prefect: generous server start on a loaded 2-core CI box, and no telemetry.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


# The slowest test files, slowest first (`--durations=0` of `make test` on 2 cores, 2026-12-02). `make test`
# runs files on two xdist workers (`--dist loadfile --no-loadscope-reorder`), handing them out in collection
# order; by default xdist would order files by their number of tests, which put these one- and two-test
# files last and left one worker idle for the last ~80 s. Longest first is the classic fix. A file missing
# here (or a stale figure) only costs balance, never a test.
SLOWEST_FILES = ("test_deployment.py", "test_scaleout.py", "test_pretrain_direction.py", "test_pretrain_train.py",
                 "test_postgres_server.py", "test_distill.py", "test_shards.py", "test_torchrun_flows.py",
                 "test_kill_resume.py", "test_embed.py", "test_server_restart.py", "test_pretrain_data.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: test order within files kept
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:  # torch missing or broken: nothing CUDA can run
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _prefect_console_on_real_stderr():
    """Keep Prefect's console log handler on the process's real stderr (fd 2, still captured by pytest).

    Prefect binds the handler to whatever sys.stderr is when it configures logging; under pytest that can
    be one test's capture stream, closed after that test, and every later flow run would then fail while
    logging (a recursion through log_prints). Rebinding before each test avoids that.
    """
    import logging
    import sys

    for handler in logging.getLogger().handlers:
        if type(handler).__name__ == "PrefectConsoleHandler" and handler.stream is not sys.__stderr__:
            handler.stream = sys.__stderr__  # not setStream: it would flush the closed stream
            if hasattr(handler, "console"):
                handler.console.file = sys.__stderr__
    yield


@pytest.fixture
def one_torch_thread():
    """Tiny tensors: one thread avoids OpenMP spin-waits that make them crawl on a loaded 2-core box."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A temporary Prefect server and result store for the whole session (flow and cache tests)."""
    from prefect.testing.utilities import prefect_test_harness

    mp = pytest.MonkeyPatch()
    # The harness swaps only the database; results (the cache records) must be isolated too, or cached
    # tasks would return results from a developer's own runs (prefect.toml keeps them in .prefect/storage).
    # In the environment for the processes the tests start (workers, flow runs), and as a setting for this
    # one: Prefect read its settings when the test modules imported it, so a later setenv alone is not
    # seen here, and this process and a worker's flow runs would keep their cache records apart.
    from prefect.settings import (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, PREFECT_RESULTS_LOCAL_STORAGE_PATH,
                                  temporary_settings)

    storage = tmp_path_factory.mktemp("prefect-storage")
    mp.setenv("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(storage))
    mp.setenv("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")
    # No flow-run heartbeats in the tests' own process. Prefect's heartbeat thread sleeps in 1 s steps and
    # every flow run joins it on exit, so each run, subflows included, ends ~0.9 s late (a trivial subflow:
    # 1.35 s with heartbeats, 0.45 s without): about 15 s per pipeline run, the pipeline's 16 flow runs.
    # Heartbeats only feed zombie-run detection on a server; the product keeps Prefect's default.
    with prefect_test_harness(server_startup_timeout=180), \
            temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None,
                                        PREFECT_RESULTS_LOCAL_STORAGE_PATH: storage}):
        yield
    mp.undo()
