"""The Prefect server crashes and comes back while a flow runs: no finished work is lost, and a rerun picks
up from the cache (finished stages) and from the work directories (the stage that was running)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.image_helpers import noise_images
from lvdflow.net import free_port
from tests.prefect_helpers import start_server, stop_server, task_states

ROOT = Path(__file__).resolve().parents[1]

RUN = """
import json, sys, time
import shards.writer as w
from prefect import flow
from flows.ingest import ingest_flow
from flows.shard import shard_flow

write, delay = w.write_shard, float(sys.argv[3])

def slow_write(*args, **kwargs):  # report each finished shard, then dawdle: the restart lands mid-stage
    result = write(*args, **kwargs)
    print("shard", result.shard, flush=True)
    time.sleep(delay)
    return result

w.write_shard = slow_write

@flow(name="ingest-then-shard")
def ingest_then_shard(src: str, root: str) -> dict:
    m = ingest_flow(sources=[src], out=root + "/ingest", workers=0)
    return shard_flow(source=m["dir"], out=root + "/shards", max_count=2)

state = ingest_then_shard(sys.argv[1], sys.argv[2], return_state=True)
print("STATE", state.type.value, state.state_details.flow_run_id, flush=True)
if state.is_completed():
    print("RESULT", json.dumps(state.result()["counts"]), flush=True)
"""


def _outcome(proc: subprocess.Popen, timeout: float) -> tuple[str, str, dict | None]:
    out, _ = proc.communicate(timeout=timeout)
    state = next(line for line in out.splitlines() if line.startswith("STATE ")).split()
    result = next((json.loads(line[7:]) for line in out.splitlines() if line.startswith("RESULT ")), None)
    return state[1], state[2], result


@pytest.mark.slow
def test_server_restart_during_a_run_loses_no_work(tmp_path):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from curation.ingest import run_ingest
    from shards.writer import run_shard

    src = noise_images(tmp_path / "src", 30)
    run_ingest([src], tmp_path / "ref-ingest", workers=0)
    reference = run_shard(tmp_path / "ref-ingest", tmp_path / "ref-shards", max_count=2)

    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "results"),
           "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3"}
    log = tmp_path / "server.log"
    root = tmp_path / "run"
    server = start_server(port, env, tmp_path, log)
    try:
        first = subprocess.Popen([sys.executable, "-c", RUN, str(src), str(root), "0.4"], cwd=ROOT, env=env,
                                 stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for line in first.stdout:
            if line.startswith("shard 2"):
                break
        else:
            pytest.fail("the first run ended before its shard stage got going")
        stop_server(server, hard=True)  # a crash: SIGKILL, no shutdown
        server = start_server(port, env, tmp_path, log)  # same database, same address
        state1, _, _ = _outcome(first, timeout=600)
        print("first run after the restart:", state1)
        # Whether the run rode out the outage (the client retries) or crashed, nothing may be lost:
        assert state1 in ("COMPLETED", "FAILED", "CRASHED"), state1
        shard_work = Path(str(root / "shards") + ".partial")
        assert (root / "shards").exists() or len(list(shard_work.glob("*.tar"))) >= 3

        second = subprocess.Popen([sys.executable, "-c", RUN, str(src), str(root), "0"], cwd=ROOT, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        state2, run_id, counts = _outcome(second, timeout=600)
        assert state2 == "COMPLETED", state2
        with temporary_settings(updates={PREFECT_API_URL: api}):
            states = task_states(run_id)
        assert states["ingest"] == "Cached"  # finished before the crash: not redone
        if state1 == "COMPLETED":
            assert states["shard"] == "Cached"
        else:
            assert counts["shards_skipped"] >= 3  # the shards written before the crash were kept
        assert {k: v for k, v in counts.items() if k != "shards_skipped"} == \
            {k: v for k, v in reference["counts"].items() if k != "shards_skipped"}
        for tar in sorted((tmp_path / "ref-shards").glob("*.tar")):
            assert (root / "shards" / tar.name).read_bytes() == tar.read_bytes(), tar.name
    finally:
        stop_server(server)
