"""run_stage and stage_cache_key (flows/caching.py) on a toy stage: cheap flow runs, no library stage."""

from __future__ import annotations

from pathlib import Path

import pytest
from prefect import flow, task

from flows.caching import run_stage, stage_cache_key
from lvdflow.stage import file_digest, publish, read_manifest, work_dir

CALLS: list[int] = []  # the toy stage's runs (tasks run in this process)


@task(name="toy-stage", cache_key_fn=stage_cache_key, persist_result=True)
def toy_stage(out: str, p: int) -> dict:
    """Writes `p` into `out` and publishes it with a digest, as the real stages do."""
    CALLS.append(p)
    work = work_dir(Path(out), fresh=True)
    (work / "value.txt").write_text(str(p))
    return publish(work, Path(out), {"stage": "toy", "params": {"p": p}, "digest": file_digest(work / "value.txt")})


@flow(name="toy-flow")
def toy_flow(out: str, p: int) -> dict:
    return run_stage(toy_stage, out=out, p=p)


@pytest.mark.usefixtures("prefect_server")
def test_global_refresh_cache_setting_reruns_a_stage(tmp_path):
    from prefect.settings import PREFECT_TASKS_REFRESH_CACHE, temporary_settings

    out = str(tmp_path / "out")
    toy_flow(out=out, p=1)
    CALLS.clear()
    toy_flow(out=out, p=1)
    assert CALLS == []  # a cache hit
    with temporary_settings(updates={PREFECT_TASKS_REFRESH_CACHE: True}):
        toy_flow(out=out, p=1)
    assert CALLS == [1]


@pytest.mark.usefixtures("prefect_server")
def test_a_then_b_then_a_returns_what_is_on_disk(tmp_path):
    out = tmp_path / "out"
    toy_flow(out=str(out), p=1)
    toy_flow(out=str(out), p=2)
    m = toy_flow(out=str(out), p=1)  # A's cache record, but the folder holds B's output: must rerun
    disk = read_manifest(out)
    assert (out / "value.txt").read_text() == "1"
    assert (m["digest"], m["created"], m["params"]) == (disk["digest"], disk["created"], {"p": 1})


def test_pretrain_key_changes_when_its_profile_file_is_edited(tmp_path, monkeypatch):
    """The flow passes a profile *name*; the task's cache key must still follow the file behind it."""
    import logging
    import shutil
    from types import SimpleNamespace

    import flows.pretrain as fp
    import pretrain.config

    profiles = tmp_path / "configs"
    profiles.mkdir()
    shutil.copy(pretrain.config.CONFIG_DIR / "demo.yaml", profiles / "demo.yaml")
    monkeypatch.setattr(pretrain.config, "CONFIG_DIR", profiles)
    calls: list[dict] = []
    monkeypatch.setattr(fp, "run_stage", lambda task, **kw: calls.append(kw) or {})
    monkeypatch.setattr(fp, "get_run_logger", lambda: logging.getLogger("test"))
    monkeypatch.setattr(fp, "stage_table", lambda *a, **k: None)

    def key() -> str:
        fp.pretrain_flow.fn(shards=str(tmp_path / "shards"), out=str(tmp_path / "out"), config="demo")
        params = {k: v for k, v in calls.pop().items() if k != "refresh"}
        return stage_cache_key(SimpleNamespace(task=fp.pretrain_task), params)

    before = key()
    assert key() == before
    with open(profiles / "demo.yaml", "a") as f:
        f.write("\n# edited\n")
    assert key() != before


@pytest.mark.parametrize("kind", ["csv", "parquet"])
def test_ingest_key_follows_the_images_a_list_source_names(tmp_path, kind):
    from types import SimpleNamespace

    import pyarrow as pa
    import pyarrow.parquet as pq

    from flows.ingest import ingest_task

    image = tmp_path / "a.png"
    image.write_bytes(b"x" * 10)
    listing = tmp_path / f"list.{kind}"
    if kind == "csv":
        listing.write_text("path\na.png\nlater.png\n")
    else:
        pq.write_table(pa.table({"uri": [str(image), str(tmp_path / "later.png")]}), listing)

    def key() -> str:  # the key function the task is decorated with
        params = {"sources": [str(listing)], "out": str(tmp_path / "out"), "workers": 0}
        return ingest_task.cache_key_fn(SimpleNamespace(task=ingest_task), params)

    first = key()
    assert key() == first
    image.write_bytes(b"y" * 20)  # replaced behind the same listed path: the list file is unchanged
    second = key()
    assert second != first
    (tmp_path / "later.png").write_bytes(b"z")  # a listed file that was missing appears
    assert key() != second
