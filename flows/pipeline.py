"""The `curate-and-pretrain` DAG and its `curate` part: every stage in order, each cached across runs.

    curate:  [demo-data] -> ingest (pool, each query set) -> dedup (candidates, then decision + decontamination)
             -> select -> [bootstrap embedder: shard the queries -> pretrain] -> embed (pool, each query set)
             -> retrieve (each query set by its own size) -> shard
    curate-and-pretrain:  curate -> pretrain -> distill -> evaluate

Each stage is a subflow over one cached task, dedup over two (see flows/caching.py): a second run of the
same deployment finds every stage in the cache, a changed parameter reruns that stage and those downstream
of it (their inputs' fingerprints change), and `refresh` names stages to rerun regardless.
"""

from __future__ import annotations

import re
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.config import PipelineConfig, check_refresh, load_profile, merge_overrides
from flows.dedup import dedup_flow
from flows.demo_data import demo_data_flow
from flows.distill import distill_flow
from flows.embed import embed_flow
from flows.evaluate import evaluate_flow
from flows.ingest import ingest_flow
from flows.pretrain import pretrain_flow
from flows.retrieve import retrieve_flow
from flows.select import select_flow
from flows.shard import shard_flow


def _ingest(sources: list[str], out: Path, cfg: PipelineConfig, refresh: list[str]) -> dict:
    return ingest_flow(sources=sources, out=str(out), workers=cfg.ingest.workers, max_pixels=cfg.ingest.max_pixels,
                       min_side=cfg.ingest.min_side, batch_size=cfg.ingest.batch_size, runner=cfg.runner,
                       refresh=refresh)


def _embed(manifest_dir: str, weights: str, out: Path, cfg: PipelineConfig, refresh: list[str]) -> dict:
    e = cfg.embed
    return embed_flow(manifest=str(Path(manifest_dir) / "manifest.parquet"), weights=weights, out=str(out),
                      arch=e.arch, patch_size=e.patch_size, img_size=e.img_size, batch_size=e.batch_size,
                      num_workers=e.num_workers, device=e.device, runner=cfg.runner, refresh=refresh)


def query_set_names(sources: list[str]) -> list[str]:
    """A folder-safe name per curated query source (its folder or file name), unique in the list: each set
    is ingested, embedded and retrieved for on its own, as its size chooses its retrieval mode."""
    names: list[str] = []
    for src in sources:
        p = Path(src)
        base = re.sub(r"[^A-Za-z0-9._-]+", "-", (p.name if p.is_dir() else p.stem) or "queries").strip("-.")
        name, n = base or "queries", 1
        while name in names:
            n += 1
            name = f"{base}-{n}"
        names.append(name)
    return names


@flow(name="curate", log_prints=True)
def curate(config: PipelineConfig, refresh: list[str] | None = None) -> dict:
    """Curate the pool into WebDataset shards; returns every stage's small manifest by stage name."""
    cfg, refresh = config, check_refresh(refresh)
    root = Path(cfg.run_dir)
    stages: dict[str, dict] = {}
    pool, queries = list(cfg.pool or []), list(cfg.queries or [])
    eval_train, eval_test = cfg.eval_train, cfg.eval_test
    if not pool or not queries:
        demo = demo_data_flow(out=str(root / "demo"), size=cfg.demo_size, refresh=refresh)
        stages["demo-data"] = demo
        d = Path(demo["dir"])
        pool = pool or [str(d / demo["outputs"]["pool"])]
        queries = queries or [str(d / demo["outputs"]["queries"])]
        eval_train = eval_train or str(d / demo["outputs"]["eval_train"])
        eval_test = eval_test or str(d / demo["outputs"]["eval_test"])

    stages["ingest"] = _ingest(pool, root / "ingest", cfg, refresh)
    query_sets = dict(zip(query_set_names(queries), queries))
    for name, src in query_sets.items():
        stages[f"ingest-queries/{name}"] = _ingest([src], root / "ingest-queries" / name, cfg, refresh)
    query_ingests = [stages[f"ingest-queries/{name}"]["dir"] for name in query_sets]

    dd = cfg.dedup
    references = []
    if dd.decontaminate_eval:
        references += [p for p in (eval_train, eval_test) if p]
    if dd.decontaminate_queries:
        references += queries
    if dd.enabled:
        stages["dedup"] = dedup_flow(
            input=stages["ingest"]["dir"], out=str(root / "dedup"), references=references or None,
            weights=dd.weights, runner=cfg.runner, refresh=refresh,
            params={"descriptor": dd.descriptor, "threshold": dd.threshold,
                    "reference_threshold": dd.reference_threshold, "k": dd.k, "nsfw": dd.nsfw,
                    "nsfw_threshold": dd.nsfw_threshold, "faces": dd.faces})
        stages["select"] = select_flow(ingest_dir=stages["ingest"]["dir"], dedup_dir=stages["dedup"]["dir"],
                                       out=str(root / "curated-pool"), refresh=refresh)
        pool_manifest = stages["select"]["dir"]
    else:
        pool_manifest = stages["ingest"]["dir"]

    weights = cfg.embed.weights
    if not weights:
        # No embedder checkpoint can be downloaded here: pretrain a small one on the curated queries.
        stages["bootstrap-shards"] = shard_flow(source=query_ingests, out=str(root / "bootstrap-shards"),
                                                refresh=refresh)
        stages["bootstrap"] = pretrain_flow(shards=stages["bootstrap-shards"]["dir"], out=str(root / "bootstrap"),
                                            config=cfg.embed.bootstrap_config,
                                            overrides=cfg.embed.bootstrap_overrides, refresh=refresh)
        weights = str(Path(stages["bootstrap"]["dir"]) / stages["bootstrap"]["outputs"]["teacher"])

    stages["embed"] = _embed(pool_manifest, weights, root / "embed-pool", cfg, refresh)
    for name, ingested in zip(query_sets, query_ingests):
        stages[f"embed-queries/{name}"] = _embed(ingested, weights, root / "embed-queries" / name, cfg, refresh)
    r = cfg.retrieve
    stages["retrieve"] = retrieve_flow(
        pool_embeddings=stages["embed"]["dir"],
        query_embeddings=[stages[f"embed-queries/{name}"]["dir"] for name in query_sets],
        pool_manifest=str(Path(pool_manifest) / "manifest.parquet"), out=str(root / "retrieve"), runner=cfg.runner,
        refresh=refresh,
        params={"mode": r.mode, "k": r.k, "sample_threshold": r.sample_threshold, "n_clusters": r.n_clusters,
                **r.extra})
    stages["shard"] = shard_flow(source=stages["retrieve"]["dir"], out=str(root / "shards"),
                                 max_count=cfg.shard.max_count, max_bytes=cfg.shard.max_bytes,
                                 workers=cfg.shard.workers, runner=cfg.runner, refresh=refresh)
    stages["_eval"] = {"train": eval_train, "test": eval_test}
    return stages


@flow(name="curate-and-pretrain", log_prints=True)
def curate_and_pretrain(profile: str = "local", config: PipelineConfig | None = None,
                        overrides: dict | None = None, refresh: list[str] | None = None) -> dict:
    """Curate an image pool, pretrain a DINOv2 model on it, distil it, and evaluate.

    `profile` names a configuration under configs/ (local: this CPU and the demo data; production: GPUs);
    `config`, when given, replaces it; `overrides` changes single fields of either (nested dicts, e.g.
    {"dedup": {"threshold": 0.5}}). `refresh` lists stage names to rerun regardless of the cache.
    """
    if config is not None:
        cfg = PipelineConfig.model_validate(merge_overrides(config.model_dump(), overrides or {}))
    else:
        cfg = load_profile(profile, overrides)
    refresh = check_refresh(refresh)
    root = Path(cfg.run_dir)
    stages = curate(cfg, refresh)
    ev = stages.pop("_eval")
    p = cfg.pretrain
    stages["pretrain"] = pretrain_flow(shards=stages["shard"]["dir"], out=str(root / "pretrain"), config=p.config,
                                       overrides=p.overrides, eval_train=ev["train"], eval_test=ev["test"],
                                       **p.launch_params(), refresh=refresh)
    pre_dir = Path(stages["pretrain"]["dir"])
    models = {"pretrained teacher": str(pre_dir / stages["pretrain"]["outputs"]["teacher"])}
    if cfg.distill.enabled:
        stages["distill"] = distill_flow(teacher=str(pre_dir / stages["pretrain"]["outputs"]["teacher_with_heads"]),
                                         shards=stages["shard"]["dir"], out=str(root / "distill"),
                                         config=cfg.distill.config, overrides=cfg.distill.overrides,
                                         eval_train=ev["train"], eval_test=ev["test"],
                                         **cfg.distill.launch_params(), refresh=refresh)
        for name, s in stages["distill"]["students"].items():
            models[f"distilled {name}"] = s["backbone"]
    if ev["train"] and ev["test"]:
        stages["evaluate"] = evaluate_flow(checkpoints=models, train=ev["train"], test=ev["test"],
                                           out=str(root / "evaluate"), refresh=refresh)
    _report(stages)
    get_run_logger().info("done: %s", {k: v["dir"] for k, v in stages.items()})
    return {k: {"dir": v["dir"], "counts": v.get("counts", {})} for k, v in stages.items()}


def _report(stages: dict[str, dict]) -> None:
    lines = ["# curate-and-pretrain", "", "| stage | counts | output |", "| --- | --- | --- |"]
    for name, m in stages.items():
        counts = ", ".join(f"{k}={v}" for k, v in m.get("counts", {}).items())
        lines.append(f"| {name} | {counts} | `{m['dir']}` |")
    if "evaluate" in stages:
        lines += ["", "## kNN top-1 on the evaluation set", "", "| model | top-1 (k=20) |", "| --- | --- |"]
        for model, res in stages["evaluate"]["results"].items():
            knn = res.get("knn", {})
            top = knn.get("knn_top1_k20", next((v for k, v in knn.items() if "top1" in k), None))
            lines.append(f"| {model} | {top:.2f} |" if top is not None else f"| {model} | n/a |")
    create_markdown_artifact(key="curate-and-pretrain-report", markdown="\n".join(lines),
                             description="Stages of this run, their counts and outputs")


if __name__ == "__main__":
    curate_and_pretrain()
