"""flows/reporting.py helpers that need no Prefect server."""

from __future__ import annotations

import contextvars
import threading
import time

from flows.reporting import TrainingProgress

RUN = contextvars.ContextVar("RUN", default=None)  # stands for Prefect's task-run context


def test_training_progress_reports_from_its_thread_in_the_task_runs_context(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"iteration": 4}\n')
    seen: list[tuple] = []
    watcher = TrainingProgress([metrics], 10, "training", every=0.01)
    watcher.progress = lambda it, total: seen.append((threading.current_thread(), RUN.get(), it, total))
    token = RUN.set("the task run")
    try:
        with watcher:
            deadline = time.monotonic() + 10
            while not seen and time.monotonic() < deadline:
                time.sleep(0.01)
    finally:
        RUN.reset(token)
    from_thread = [s[1:] for s in seen if s[0] is not threading.main_thread()]
    assert from_thread and from_thread[0] == ("the task run", 5, 10)
