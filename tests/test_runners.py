"""make_task_runner (flows/runners.py): the task runner built for each runner config, without starting it."""

from __future__ import annotations

import sys
import types

from flows.config import RunnerConfig
from flows.runners import make_task_runner


class _RecordingRayTaskRunner:
    def __init__(self, **kwargs):
        self.kwargs = kwargs


def test_ray_runner_joins_a_cluster_without_init_kwargs(monkeypatch):
    # prefect-ray is an optional extra: a stand-in module records what the runner is given.
    monkeypatch.setitem(sys.modules, "prefect_ray", types.SimpleNamespace(RayTaskRunner=_RecordingRayTaskRunner))
    monkeypatch.setattr("flows.runners._worker_env", lambda: {"PREFECT_API_URL": "http://api"})
    joined = make_task_runner(RunnerConfig(kind="ray", address="ray://head:10001", workers=3))
    assert joined.kwargs == {"address": "ray://head:10001"}  # ray.init refuses num_cpus for a running cluster
    local = make_task_runner(RunnerConfig(kind="ray", workers=3))
    assert local.kwargs["init_kwargs"] == {"runtime_env": {"env_vars": {"PREFECT_API_URL": "http://api"}},
                                           "num_cpus": 3}
    assert local.kwargs.get("address") is None
