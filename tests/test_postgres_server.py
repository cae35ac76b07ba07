"""The Prefect server on PostgreSQL (for teams): the deployment runs against a real PostgreSQL server.

Starts Debian's PostgreSQL on 127.0.0.1 in a temporary cluster, a Prefect server on it, and runs
`curate-and-pretrain/local` through a worker. Skips cleanly where no PostgreSQL server can be started.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from lvdflow.net import free_port
from tests.prefect_helpers import deploy_local, run_local_deployment, start_server, stop_server

ROOT = Path(__file__).resolve().parents[1]


def _pg_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


@pytest.fixture
def postgres():
    bindir = _pg_bin()
    if bindir is None:
        pytest.skip("no PostgreSQL server binaries (Debian package postgresql)")
    # Not under pytest's tmp dir: that one is private to our user, and the server runs as 'postgres'.
    base = Path(tempfile.mkdtemp(prefix="lvdflow-pg-"))
    base.chmod(0o755)
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    run_as: list[str] = []
    if os.geteuid() == 0:  # PostgreSQL refuses to run as root
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser")
        try:
            import pwd

            pwd.getpwnam("postgres")
        except KeyError:
            pytest.skip("no 'postgres' system user to run the server as")
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
        run_as = ["runuser", "-u", "postgres", "--"]
    port = free_port()
    r = subprocess.run(run_as + [str(bindir / "initdb"), "-D", str(data), "-U", "prefect", "--auth=trust"],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        pytest.skip(f"initdb failed: {r.stderr[-500:]}")
    r = subprocess.run(run_as + [str(bindir / "pg_ctl"), "-D", str(data), "-w", "-t", "60", "-l", str(base / "log"),
                                 "-o", f"-p {port} -k {sock} -c listen_addresses=127.0.0.1", "start"],
                       capture_output=True, text=True, timeout=120)
    if r.returncode != 0:
        pytest.skip(f"PostgreSQL did not start: {r.stderr[-500:]}")
    try:
        subprocess.run(run_as + [str(bindir / "createdb") if (bindir / "createdb").exists()
                                 else "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "prefect"],
                       check=True, capture_output=True, timeout=60)
        yield {"port": port, "url": f"postgresql+asyncpg://prefect@127.0.0.1:{port}/prefect",
               "psql": run_as + ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "prefect", "-tA", "prefect"]}
    finally:
        subprocess.run(run_as + [str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"],
                       capture_output=True, timeout=120)
        shutil.rmtree(base, ignore_errors=True)


# The DAG without its two most computing stages: what this test checks is the server on PostgreSQL (the
# deployment, the flow run, its subflows, task runs, cache records and artifacts stored there); the whole
# DAG through a deployment is tests/test_deployment.py's job, on SQLite.
LIGHT = {"dedup": {"enabled": False}, "distill": {"enabled": False}}


@pytest.mark.slow
def test_deployment_runs_against_a_postgres_backed_server(postgres, tmp_path):
    port = free_port()
    home = tmp_path / "prefect-home"
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_DATABASE_CONNECTION_URL": postgres["url"],
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(tmp_path / "storage")}
    env.pop("PREFECT_API_URL", None)
    server = start_server(port, env, tmp_path, tmp_path / "server.log")
    api = f"http://127.0.0.1:{port}/api"
    try:
        cli_env = {k: env[k] for k in ("PREFECT_HOME", "PREFECT_RESULTS_LOCAL_STORAGE_PATH")}
        deploy_local(api, ROOT, cli_env, deployments=("local",))
        flow_run = run_local_deployment(api, ROOT, {"run_dir": str(tmp_path / "run"), **LIGHT}, cli_env)
        assert flow_run.state.is_completed(), flow_run.state

        def sql(query: str) -> str:
            r = subprocess.run(postgres["psql"] + ["-c", query], capture_output=True, text=True, timeout=60)
            assert r.returncode == 0, r.stderr
            return r.stdout.strip()

        # The run lives in PostgreSQL, not in a SQLite file: its state, its subflows' task runs, the artifacts.
        assert sql(f"select state_type from flow_run where id = '{flow_run.id}'") == "COMPLETED"
        assert int(sql("select count(*) from flow_run where parent_task_run_id is not null")) >= 8
        assert set(sql("select key from artifact where key is not null").split()) >= {
            "ingest-summary", "shard-summary", "pretrain-summary", "curate-and-pretrain-report"}
        assert not list(home.glob("*.db"))
        assert (tmp_path / "run" / "pretrain" / "teacher" / "teacher_backbone.pth").is_file()
    finally:
        stop_server(server)
