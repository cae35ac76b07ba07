"""Transient I/O errors are retried with backoff; permanent ones fail at once; stage tasks do not retry
bad input."""

from __future__ import annotations

import errno

import pytest

from lvdflow.io_retry import retry_io


def _flaky(fail_times: int, exc: OSError):
    calls = []

    def fn():
        calls.append(1)
        if len(calls) <= fail_times:
            raise exc
        return b"ok"

    return fn, calls


def test_transient_errors_are_retried_with_growing_delays():
    fn, calls = _flaky(2, OSError(errno.EIO, "Input/output error"))
    delays = []
    assert retry_io(fn, sleep=delays.append) == b"ok"
    assert len(calls) == 3 and delays == [0.5, 1.0]


def test_permanent_errors_fail_at_once_and_retries_are_bounded():
    fn, calls = _flaky(1, FileNotFoundError(errno.ENOENT, "No such file"))
    with pytest.raises(FileNotFoundError):
        retry_io(fn, sleep=lambda d: None)
    assert len(calls) == 1
    fn, calls = _flaky(10, OSError(errno.ETIMEDOUT, "timed out"))
    with pytest.raises(OSError, match="timed out"):
        retry_io(fn, attempts=3, sleep=lambda d: None)
    assert len(calls) == 3


@pytest.mark.usefixtures("prefect_server")
def test_a_stage_task_retries_failures_but_not_bad_input(tmp_path):
    from prefect import flow, task

    from flows.caching import STAGE_RETRIES
    from lvdflow.errors import UserError

    calls = {"io": 0, "user": 0}

    @task(**{**STAGE_RETRIES, "retry_delay_seconds": 0, "retry_jitter_factor": None})
    def flaky_io():
        calls["io"] += 1
        if calls["io"] < 3:
            raise OSError(errno.EIO, "storage hiccup")
        return "done"

    @task(**{**STAGE_RETRIES, "retry_delay_seconds": 0, "retry_jitter_factor": None})
    def bad_input():
        calls["user"] += 1
        raise UserError("no such folder")

    @flow
    def f():
        return flaky_io(), bad_input(return_state=True)

    result, state = f()
    assert result == "done" and calls["io"] == 3
    assert state.is_failed() and calls["user"] == 1
