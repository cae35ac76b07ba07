"""Typed parameters of the curate-and-pretrain DAG, one model per stage.

The Prefect UI renders and validates these as forms. Profiles (`configs/<name>.yaml`) hold complete
configurations: `local` for a CPU and the small demo data, `production` for GPUs with a ViT-H/14 embedder
and ViT-L training. A deployment names its profile; `config` overrides it field by field.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from lvdflow.errors import UserError

PROFILES = Path(__file__).resolve().parents[1] / "configs"
# The cached stage tasks, by name: what `refresh` may name (flows/caching.py versions each of them).
STAGE_NAMES = ("demo-data", "ingest", "dedup-candidates", "dedup", "select", "embed", "retrieve", "shard",
               "pretrain", "distill", "evaluate")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not a silently ignored key


class IngestConfig(_Strict):
    workers: int | None = Field(None, description="decoding processes (default: one per CPU)")
    max_pixels: int = Field(100_000_000, description="larger images are quarantined as decompression bombs")
    min_side: int = Field(16, description="images whose shorter side is below this are quarantined")
    batch_size: int = Field(1024, ge=1, description="inputs per unit of work (and per resumable part file)")


class DedupConfig(_Strict):
    enabled: bool = True
    descriptor: Literal["builtin", "sscd", "backbone"] = "builtin"
    weights: str | None = Field(None, description="SSCD TorchScript file or backbone checkpoint")
    threshold: float = Field(0.6, gt=0, le=1, description="cosine similarity above which two pool images are copies")
    reference_threshold: float = Field(0.45, gt=0, le=1, description="stricter threshold against evaluation sets")
    k: int = Field(64, ge=1, description="neighbours searched per image")
    decontaminate_eval: bool = Field(True, description="drop pool components that copy an evaluation image")
    decontaminate_queries: bool = Field(False, description="also drop pool copies of the query images")
    nsfw: bool = False
    nsfw_threshold: float = 0.6
    faces: bool = False


class EmbedConfig(_Strict):
    weights: str | None = Field(None, description="embedder checkpoint; none: bootstrap one on the queries")
    arch: str = "vit_small"
    patch_size: int = 14
    img_size: int = 224
    batch_size: int = 64
    num_workers: int | None = None
    device: str = "auto"
    bootstrap_config: str = Field("bootstrap", description="pretraining profile of the bootstrap embedder")
    bootstrap_overrides: dict[str, Any] = Field(default_factory=dict)


class RetrieveConfig(_Strict):
    mode: Literal["auto", "sample", "cluster", "balanced"] = "auto"
    k: int = Field(4, ge=1, description="pool images per query (sample mode)")
    sample_threshold: int = Field(1_000_000, ge=1, description="query sets at least this big use sample mode")
    n_clusters: int | None = Field(None, ge=1, description="k-means clusters (none: pool size / 100)")
    extra: dict[str, Any] = Field(default_factory=dict, description="further run_retrieve options")


class ShardConfig(_Strict):
    max_count: int = Field(10_000, ge=1, description="samples per shard")
    max_bytes: int = Field(1 << 30, ge=1, description="bytes per shard")
    workers: int = Field(1, ge=1, description="shards written in parallel")


class _Launch(_Strict):
    """How training is launched (pretrain/launch.py): in the flow's process, or under torchrun."""
    nproc: int = Field(1, ge=1, description="processes per node under torchrun (1 and one node: in-process)")
    nnodes: int = Field(1, ge=1, description="nodes; more than one needs rdzv_endpoint")
    rdzv_endpoint: str | None = Field(None, description="host:port of the c10d rendezvous (multi-node)")
    launcher: list[str] = Field(default_factory=list,
                                description='command prefix that starts torchrun on every node, e.g. '
                                            '["srun", "--nodes=4", "--ntasks-per-node=1"]')

    def launch_params(self) -> dict[str, Any]:
        return {"nproc": self.nproc, "nnodes": self.nnodes, "rdzv_endpoint": self.rdzv_endpoint,
                "launcher": list(self.launcher)}


class PretrainConfig(_Launch):
    config: str = Field("demo", description="pretraining profile (pretrain/configs/<name>.yaml) or a path")
    overrides: dict[str, Any] = Field(default_factory=dict)


class DistillConfig(_Launch):
    enabled: bool = True
    config: str = "distill_demo"
    overrides: dict[str, Any] = Field(default_factory=dict)


class RunnerConfig(_Strict):
    """Where the units of the curation stages run (flows/runners.py)."""
    kind: Literal["inline", "threads", "processes", "dask", "ray"] = Field(
        "inline", description="inline: this process; or Prefect task runs on threads, processes, Dask or Ray")
    workers: int | None = Field(None, ge=1, description="threads / processes / local Dask workers (default: CPUs)")
    threads_per_worker: int = Field(1, ge=1, description="threads of each local Dask worker process")
    address: str | None = Field(None, description="Dask scheduler or Ray cluster address; none: start a local one")
    retries: int = Field(2, ge=0, description="retries of a failed unit (a lost worker, transient I/O)")


class PipelineConfig(_Strict):
    run_dir: str = Field("runs/local", description="every stage writes under this folder")
    demo_size: Literal["tiny", "small", "medium"] = "small"
    pool: list[str] | None = Field(None, description="folders/tars/lists to curate; none: the demo pool")
    queries: list[str] | None = Field(None, description="curated query images; none: the demo queries")
    eval_train: str | None = None
    eval_test: str | None = None
    runner: RunnerConfig = Field(default_factory=RunnerConfig, description="where curation stages run their units")
    ingest: IngestConfig = Field(default_factory=IngestConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    embed: EmbedConfig = Field(default_factory=EmbedConfig)
    retrieve: RetrieveConfig = Field(default_factory=RetrieveConfig)
    shard: ShardConfig = Field(default_factory=ShardConfig)
    pretrain: PretrainConfig = Field(default_factory=PretrainConfig)
    distill: DistillConfig = Field(default_factory=DistillConfig)


def check_refresh(names: list[str] | None) -> list[str]:
    """`refresh` as a list, or a UserError naming what is not a stage (a misspelt name would rerun nothing)."""
    unknown = sorted(set(names or ()) - set(STAGE_NAMES))
    if unknown:
        raise UserError(f"refresh: no stage named {', '.join(unknown)} (stages: {', '.join(STAGE_NAMES)})")
    return list(names or ())


def merge_overrides(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge_overrides(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_profile(name: str, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """The profile `configs/<name>.yaml` (or a YAML path), with `overrides` merged in field by field."""
    path = Path(name) if name.endswith((".yaml", ".yml")) else PROFILES / f"{name}.yaml"
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in PROFILES.glob("*.yaml")))
        raise UserError(f"no profile {name!r} (known: {known})")
    data = yaml.safe_load(path.read_text()) or {}
    try:
        return PipelineConfig.model_validate(merge_overrides(data, overrides or {}))
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(x) for x in e['loc'])}: {e['msg']}" for e in exc.errors())
        raise UserError(f"invalid configuration ({path.name} + overrides): {problems}") from None
