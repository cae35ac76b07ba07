"""Shared fixtures. Prefect tests share one temporary server (the harness takes ~20 s to start)."""

from __future__ import annotations

import os

import pytest

# Before anything imports prefect: generous server start on a loaded 2-core CI box, and no telemetry.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")


def pytest_collection_modifyitems(config, items):
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


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory):
    """A temporary Prefect server and result store for the whole session (flow and cache tests)."""
    from prefect.testing.utilities import prefect_test_harness

    mp = pytest.MonkeyPatch()
    # The harness swaps only the database; results (the cache records) must be isolated too, or cached
    # tasks would return results from a developer's own runs.
    mp.setenv("PREFECT_RESULTS_LOCAL_STORAGE_PATH", str(tmp_path_factory.mktemp("prefect-storage")))
    mp.setenv("PREFECT_LOGGING_TO_API_BATCH_INTERVAL", "0.3")
    with prefect_test_harness(server_startup_timeout=180):
        yield
    mp.undo()
