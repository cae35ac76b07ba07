"""Prefect flow for the embedding stage."""

from __future__ import annotations

from prefect import flow, get_run_logger, task

from curation.embed import DEFAULT_ARCH, run_embed
from flows.caching import STAGE_RETRIES, run_stage, stage_cache_key
from flows.reporting import Progress, stage_table
from flows.runners import RunnerConfig, unit_executor


@task(name="embed", cache_key_fn=stage_cache_key, persist_result=True, **STAGE_RETRIES)
def embed_task(manifest: str, weights: str | None, out: str, arch: str = DEFAULT_ARCH, patch_size: int = 14,
               img_size: int = 224, num_heads: int | None = None, allow_random_init: bool = False,
               batch_size: int = 256, num_workers: int | None = None, device: str = "auto",
               shard_size: int = 50_000, runner: dict | None = None) -> dict:
    # A retry (or a rerun after a crash) resumes from the shards already written in <out>.partial.
    log = get_run_logger()
    step = [0]
    artifact = Progress(f"embedding {manifest}")

    def progress(done: int, total: int) -> None:
        artifact(done, total)
        if done - step[0] >= max(total // 20, 1) or done == total:
            step[0] = done
            log.info("embed: %d/%d images", done, total)

    with unit_executor(RunnerConfig.model_validate(runner or {}), "embed") as map_units:
        return run_embed(manifest, weights, out, arch=arch, patch_size=patch_size, img_size=img_size,
                         num_heads=num_heads, allow_random_init=allow_random_init, batch_size=batch_size,
                         num_workers=num_workers, device=device, shard_size=shard_size, progress=progress,
                         map_units=map_units)


@flow(name="embed", log_prints=True)
def embed_flow(manifest: str, weights: str | None, out: str, arch: str = DEFAULT_ARCH, patch_size: int = 14,
               img_size: int = 224, num_heads: int | None = None, allow_random_init: bool = False,
               batch_size: int = 256, num_workers: int | None = None, device: str = "auto",
               shard_size: int = 50_000, runner: RunnerConfig | None = None,
               refresh: list[str] | None = None) -> dict:
    """Embed every image of an ingest manifest with a ViT backbone (float16 L2-normalised CLS vectors).
    `runner` embeds the shards as tasks on threads, processes, Dask or Ray (default: in this process)."""
    result = run_stage(embed_task, out=out, refresh=refresh, manifest=str(manifest),
                       weights=str(weights) if weights else None, arch=arch, patch_size=patch_size,
                       img_size=img_size, num_heads=num_heads, allow_random_init=allow_random_init,
                       batch_size=batch_size, num_workers=num_workers, device=device, shard_size=shard_size,
                       runner=runner.model_dump() if runner else None)
    c = result["counts"]
    get_run_logger().info("embed: %d of %d images embedded (dim %d), %d failed", c["embedded"], c["images"],
                          result["dim"], c["failed"])
    stage_table("embed", result, extra={"dim": result["dim"], "arch width": result["model"]["embed_dim"]})
    return result
