"""Reading task-run states back from the Prefect API, for cache tests."""

from __future__ import annotations

import time

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterParentFlowRunId


def task_states(flow_run_id, settle_s: float = 30.0) -> dict[str, str]:
    """{task name: state name} for every task run of a flow run and its subflow runs.

    Called once the flow run has finished, so every task has too; but a task that ran in another process (a
    Ray or Dask worker) reports its last state to the server on its own, which can land a moment after the
    flow's. Wait up to `settle_s` for every task run to reach a final state before reading the names.
    The server records task-run states from events, in the background: on a loaded machine a task run can
    be read with its state type set and its state object not yet there; that, too, is read again."""
    deadline = time.monotonic() + settle_s
    while True:
        trs, runs = _task_runs(flow_run_id)
        settled = all(t.state.is_final() if t.state is not None else t.state_type is None for t in trs)
        if settled or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    # subflow calls appear as task runs too (dummy tasks); keep real stage tasks only
    out: dict[str, list[str]] = {}
    for t in sorted(trs, key=lambda t: t.expected_start_time or t.created):
        if t.state is not None and t.flow_run_id in runs and not _is_subflow_marker(t):
            out.setdefault(t.name.rsplit("-", 1)[0], []).append(t.state.name)
    return {k: v[0] if len(v) == 1 else v for k, v in out.items()}


def run_flow(flow, **kw):
    """Run `flow` in this process; assert it completed; return (its result, task_states of its run)."""
    state = flow(return_state=True, **kw)
    assert state.is_completed(), state
    return state.result(), task_states(state.state_details.flow_run_id)


def _task_runs(flow_run_id) -> tuple[list, list]:
    """(task runs, flow run ids) of a flow run and all its subflow runs."""
    with get_client(sync_client=True) as client:
        runs = [flow_run_id]
        frontier = [flow_run_id]
        while frontier:
            children = client.read_flow_runs(
                flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=frontier)))
            frontier = [c.id for c in children]
            runs += frontier
        return client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=runs))), runs


def _is_subflow_marker(task_run) -> bool:
    # A subflow call is recorded in its parent as a task run named like the subflow (so like its stage
    # task); its state points at the child flow run.
    return bool(task_run.state and task_run.state.state_details.child_flow_run_id)


def deploy_local(api_url: str, root, env: dict | None = None, deployments: tuple[str, ...] = ()) -> None:
    """Create the work pools and deploy prefect.yaml (all of it, or the named `deployments`).

    `prefect deploy` is the CLI, as a user runs it. The pools are made through the client in this process:
    each `prefect` command is a fresh interpreter that spends ~5 s importing Prefect on a 2-core machine, and
    this step tests nothing of ours."""
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.workers.process import ProcessWorker

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        with get_client(sync_client=True) as client:
            for pool in ("lvdflow-local", "lvdflow-gpu"):  # what `prefect work-pool create --type process` makes
                client.create_work_pool(WorkPoolCreate(name=pool, type="process",
                                                       base_job_template=ProcessWorker.get_default_base_job_template()),
                                        overwrite=True)
    names = [a for d in deployments for a in ("--name", d)] or ["--all"]
    _prefect(api_url, root, env, "deploy", *names, "--no-prompt")


def run_local_deployment(api_url: str, root, overrides: dict, env: dict | None = None, timeout: int = 600):
    """Run `curate-and-pretrain/local` with the test profile (tiny demo data, a few training steps) and
    `overrides` through a `--run-once` process worker; returns the finished flow run, read back from the API.
    The run is requested through the client here (as `prefect deployment run` does, without its ~5 s start)."""
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        flow_run = run_deployment("curate-and-pretrain/local", timeout=0, as_subflow=False,
                                  parameters={"profile": "test", "overrides": overrides})
        _prefect(api_url, root, env, "worker", "start", "--pool", "lvdflow-local", "--run-once", t=timeout)
        with get_client(sync_client=True) as client:
            return client.read_flow_run(flow_run.id)


def _prefect(api_url: str, root, env: dict | None, *args: str, t: int = 300):
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-m", "prefect", *args], cwd=root, capture_output=True, text=True,
                       timeout=t, env={**os.environ, **(env or {}), "PREFECT_API_URL": api_url})
    assert r.returncode == 0, f"prefect {' '.join(args)}:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def start_server(port: int, env: dict, cwd, log_path, timeout: float = 240):
    """`prefect server start` on 127.0.0.1:`port` in its own process group; returns the process once
    /api/health answers (a fresh server needs ~20 s, more on a loaded machine)."""
    import subprocess
    import sys
    import time
    import urllib.request

    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(port), "--no-ui"], env=env, cwd=cwd, start_new_session=True,
                              stdout=open(log_path, "a"), stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while True:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2).status == 200:
                return server
        except OSError:
            pass
        if server.poll() is not None or time.time() > deadline:
            stop_server(server)
            raise AssertionError(f"server did not become healthy:\n{open(log_path).read()[-3000:]}")
        time.sleep(1)


def stop_server(server, hard: bool = False) -> None:
    """Stop a `start_server` process group: SIGKILL when `hard` (a crash), else SIGTERM then SIGKILL."""
    import os
    import signal
    import subprocess

    try:
        os.killpg(server.pid, signal.SIGKILL if hard else signal.SIGTERM)
        server.wait(30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait(30)
