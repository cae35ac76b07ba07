"""Where a curation stage's units of work run: this process, local threads or processes, Dask or Ray.

The library stages take a `map_units(fn, units)` executor (lvdflow/parts.py). `unit_executor` turns the
pipeline's `runner` config into one that submits every unit as a Prefect task on the matching task
runner, so each unit is a task run in the UI with its own retries, and a unit that fails on a remote
worker fails the stage with that worker's error. The task runner is entered once per stage and reused by
every `map_units` call of that stage (ingest calls it once per window of batches).

    kind: inline     the library's own loop (a process pool for ingest, DataLoader workers for embed)
    kind: threads    ThreadPoolTaskRunner(workers)
    kind: processes  ProcessPoolTaskRunner(workers)
    kind: dask       DaskTaskRunner: a LocalCluster of `workers` processes, or the scheduler at `address`
    kind: ray        RayTaskRunner at `address` (needs the `ray` extra: pip install -e '.[ray]')

Remote workers must see the run directory at the same path (a shared file system), since units write
their outputs into the stage's work directory.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Callable, Iterator, Sequence

from prefect import task
from prefect.cache_policies import NO_CACHE
from prefect.settings import PREFECT_API_URL
from flows.config import RunnerConfig
from lvdflow.errors import UserError
from lvdflow.parts import MapUnits

def _call(fn: Callable[[Any], Any], unit: Any) -> Any:
    return fn(unit)


def _worker_env() -> dict[str, str]:
    # Local Dask/Ray workers are new processes: they must report to this run's API, which may have been
    # set in-process (a test harness, a profile) rather than in the environment they inherit.
    url = PREFECT_API_URL.value()
    if not url:  # an ephemeral server (a flow run without a server): its address is known only here
        from prefect.client.orchestration import get_client

        with get_client(sync_client=True) as client:
            url = str(client.api_url).rstrip("/")
    env = {k: v for k, v in os.environ.items() if k.startswith("PREFECT_")}
    env["PREFECT_API_URL"] = url
    return env


def make_task_runner(cfg: RunnerConfig):
    """The Prefect task runner for `cfg` (not entered)."""
    workers = cfg.workers or os.cpu_count() or 1
    if cfg.kind == "threads":
        from prefect.task_runners import ThreadPoolTaskRunner

        return ThreadPoolTaskRunner(max_workers=workers)
    if cfg.kind == "processes":
        from prefect.task_runners import ProcessPoolTaskRunner

        return ProcessPoolTaskRunner(max_workers=workers)
    if cfg.kind == "dask":
        from prefect_dask import DaskTaskRunner

        if cfg.address:
            return DaskTaskRunner(address=cfg.address)
        return DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": cfg.threads_per_worker,
                                              "processes": True, "dashboard_address": None, "env": _worker_env()})
    if cfg.kind == "ray":
        try:
            from prefect_ray import RayTaskRunner
        except ImportError:
            raise UserError("runner kind 'ray' needs prefect-ray: pip install -e '.[ray]'") from None
        if cfg.address:  # a running cluster: ray.init refuses num_cpus there, its workers are set up already
            return RayTaskRunner(address=cfg.address)
        return RayTaskRunner(init_kwargs={"runtime_env": {"env_vars": _worker_env()}, "num_cpus": workers})
    raise UserError(f"unknown runner kind {cfg.kind!r}")


@contextlib.contextmanager
def unit_executor(cfg: RunnerConfig | None, stage: str) -> Iterator[MapUnits | None]:
    """A `map_units` for the stage's library function, or None for the library's own in-process loop."""
    if cfg is None or cfg.kind == "inline":
        yield None
        return
    part = task(_call, name=f"{stage}-part", cache_policy=NO_CACHE, retries=cfg.retries,
                retry_delay_seconds=[2, 10, 30][: max(1, cfg.retries)])
    with make_task_runner(cfg) as runner:
        def map_units(fn: Callable[[Any], Any], units: Sequence[Any]) -> list[Any]:
            futures = [runner.submit(part, parameters={"fn": fn, "unit": u}) for u in units]
            return [f.result() for f in futures]  # raises the first failed unit's error

        yield map_units
