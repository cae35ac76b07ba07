"""`lvdflow retrieve`: curated query sets pull their nearest images out of the (deduplicated) pool."""

from __future__ import annotations

import argparse

from lvdflow.commands._common import add_runner_arguments, existing_dir, existing_path, non_negative_int, output_dir, positive_int, print_result, runner_config
from lvdflow.errors import UserError

NAME = "retrieve"
HELP = ("Retrieve pool images for curated query sets (DINOv2 LVD-142M style): the k nearest pool images per "
        "query for large sets, whole k-means clusters holding more than --min-queries queries for small "
        "ones, or query-free balanced sampling over hierarchical k-means. Writes OUT/retrieved.parquet and a "
        "curation report (OUT/report/).")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pool-embeddings", required=True, help="embedding directory of the pool (lvdflow embed)")
    p.add_argument("--pool-manifest", required=True, help="ingest output (or manifest.parquet) of the pool")
    p.add_argument("--queries", nargs="*", default=[], metavar="DIR",
                   help="embedding directories of the query sets, one per curated source")
    p.add_argument("--query-manifests", nargs="*", default=None, metavar="DIR",
                   help="ingest outputs of the query sets (only to show query images in the report)")
    p.add_argument("--out", required=True, help="output directory (replaced atomically when complete)")
    p.add_argument("--mode", choices=["auto", "sample", "cluster", "balanced"], default="auto",
                   help="auto: sample-based for sets of at least --sample-threshold queries, else cluster-based")
    p.add_argument("--sample-threshold", type=positive_int, default=1_000_000, help="default: %(default)s")
    p.add_argument("--k", type=positive_int, default=4, help="neighbours per query in sample mode (default: %(default)s)")
    p.add_argument("--clusters", type=positive_int, default=None, help="k-means clusters (default: pool size / 100)")
    p.add_argument("--clustering", choices=["kmeans", "hierarchical"], default="kmeans",
                   help="flat faiss k-means, or hierarchical k-means with resampling for the cluster mode")
    p.add_argument("--levels", type=positive_int, nargs="+", default=None,
                   help="hierarchical k-means cluster counts, finest first (default: clusters, clusters/10)")
    p.add_argument("--min-queries", type=non_negative_int, default=3,
                   help="a cluster is retrieved when it holds more than this many queries (default: %(default)s)")
    p.add_argument("--per-cluster", type=positive_int, default=10_000, help="images per retrieved cluster (default: %(default)s)")
    p.add_argument("--per-source-cap", type=positive_int, default=1_000_000,
                   help="images per cluster-based query set (default: %(default)s)")
    p.add_argument("--selection", choices=["random", "closest"], default="random",
                   help="which images of a big cluster to take (default: %(default)s)")
    p.add_argument("--target-size", type=positive_int, default=None, help="images to sample in balanced mode")
    p.add_argument("--index", default="auto",
                   help="faiss index_factory string for sample mode, or auto (Flat / IVF,Flat / IVF,PQ by pool size)")
    p.add_argument("--nprobe", type=positive_int, default=32, help="IVF lists searched per query (default: %(default)s)")
    p.add_argument("--kmeans-iters", type=positive_int, default=20, help="Lloyd iterations of k-means (default: %(default)s)")
    p.add_argument("--kmeans-init", choices=["auto", "random", "kmeans++"], default="auto",
                   help="k-means seeding: auto = k-means++ up to 2000 clusters, random above (default: %(default)s)")
    p.add_argument("--gpu", choices=["auto", "yes", "no"], default="auto", help="faiss on GPU (default: when present)")
    p.add_argument("--center", action="store_true",
                   help="subtract the pool mean from all embeddings first (for weak or untrained embedders)")
    p.add_argument("--seed", type=non_negative_int, default=0, help="seed of k-means, sampling and the report (default: %(default)s)")
    p.add_argument("--no-report", action="store_true", help="skip the image-grid report")
    add_runner_arguments(p)
    p.add_argument("--refresh", action="store_true", help="rerun even if a cached result exists")


def run(args: argparse.Namespace) -> int:
    pool = existing_dir(args.pool_embeddings, "pool embeddings")
    manifest = existing_path(args.pool_manifest, "pool manifest")
    queries = [existing_dir(q, "query embeddings") for q in args.queries]
    qman = [existing_path(q, "query manifest") for q in args.query_manifests or []]
    if args.mode != "balanced" and not queries:
        raise UserError(f"--mode {args.mode} needs --queries (only --mode balanced works without)")
    if args.mode == "balanced" and not args.target_size:
        raise UserError("--mode balanced needs --target-size")
    out = output_dir(args.out)
    params = {
        "mode": args.mode, "sample_threshold": args.sample_threshold, "k": args.k, "n_clusters": args.clusters,
        "clustering": args.clustering, "hierarchical_levels": args.levels, "min_queries": args.min_queries,
        "per_cluster": args.per_cluster, "per_source_cap": args.per_source_cap, "selection": args.selection,
        "target_size": args.target_size, "index_spec": args.index, "nprobe": args.nprobe,
        "kmeans_iters": args.kmeans_iters, "kmeans_init": args.kmeans_init, "gpu": {"auto": None, "yes": True, "no": False}[args.gpu],
        "seed": args.seed, "report": not args.no_report, "center": args.center,
    }
    from flows.retrieve import retrieve_flow

    print_result(retrieve_flow(pool_embeddings=str(pool), query_embeddings=[str(q) for q in queries] or None,
                               pool_manifest=str(manifest), out=str(out), params=params,
                               query_manifests=[str(q) for q in qman] or None,
                               runner=runner_config(args), refresh=["retrieve"] if args.refresh else None))
    return 0
