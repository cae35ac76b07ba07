"""Retrieval curation: quality on the demo data, scale on synthetic embeddings, faiss vs scikit-learn k-means.

    .venv/bin/python -m bench.bench_retrieve                       # all three sections
    .venv/bin/python -m bench.bench_retrieve --only quality|scale|sklearn [--scale-n 1000000]

quality  Demo data (Fashion-MNIST in-domain; clipart, game tiles out of domain; planted copies), ingested,
         embedded with two fixed embedders (16x16 RGB pixels; the project's embed stage with a random-init
         ViT-tiny: no weights can be downloaded here), retrieved with the demo queries (held-out
         Fashion-MNIST images) in cluster mode and sample mode (k=4). Reports the in-domain fraction of the
         retrieved images against a uniform random sample of the same count, and the recall of the
         in-domain pool.
scale    n x 768 synthetic embeddings (mixture of 1000 Gaussians, float16): faiss k-means (k=1000) and its
         assignment of every point, then sample-based retrieval (10k queries, k=4) through the index chosen
         by size, with the recall@4 of that index against exact search. Each section runs in its own
         process, so peak RSS is that section's.
sklearn  100k x 768: faiss k-means (random and k-means++ seeds) vs scikit-learn MiniBatchKMeans, same k,
         time and inertia on all points, and agreement with the true mixture components (NMI).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench.common import peak_rss_mb, write_result

SECTIONS = ("quality", "scale", "sklearn")


# ---------------------------------------------------------------- synthetic data


def mixture(n: int, d: int, components: int, seed: int, spread: float = 0.6, chunk: int = 50_000):
    """n L2-normalised float16 points around `components` random centers, and their component labels."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((components, d), dtype=np.float32) / np.sqrt(d)
    labels = rng.integers(0, components, size=n)
    x = np.empty((n, d), dtype=np.float16)
    for s in range(0, n, chunk):
        lab = labels[s : s + chunk]
        block = centers[lab] + spread * rng.standard_normal((len(lab), d), dtype=np.float32) / np.sqrt(d)
        block /= np.linalg.norm(block, axis=1, keepdims=True)
        x[s : s + chunk] = block
    return x, labels


# ---------------------------------------------------------------- sections


def section_scale(n: int, d: int = 768, k: int = 1000, n_queries: int = 10_000) -> dict:
    from curation import knn
    from curation.kmeans import assign, train_centroids

    t = time.perf_counter()
    x, _ = mixture(n, d, 1000, seed=0)
    q, _ = mixture(n_queries, d, 1000, seed=1)
    out: dict = {"n": n, "d": d, "generate_s": round(time.perf_counter() - t, 1)}
    # 64 training points per centroid (faiss default 256): the CPU budget of this benchmark.
    t = time.perf_counter()
    # faiss' own random seeding, as the pipeline uses for large k (k-means++ seeding is measured in "sklearn").
    centroids, obj, _ = train_centroids(x, k, niter=10, seed=0, max_points_per_centroid=64, init="random")
    out["kmeans"] = {"k": k, "niter": 10, "train_points": min(n, 64 * k), "train_s": round(time.perf_counter() - t, 1)}
    t = time.perf_counter()
    labels, _ = assign(x, centroids)
    out["kmeans"]["assign_all_s"] = round(time.perf_counter() - t, 1)
    sizes = np.bincount(labels, minlength=k)
    out["kmeans"]["cluster_sizes"] = {"min": int(sizes.min()), "median": int(np.median(sizes)), "max": int(sizes.max())}
    out["peak_rss_after_kmeans_mb"] = round(peak_rss_mb())
    t = time.perf_counter()
    index = knn.build_index(x, spec="auto", nprobe=32, seed=0)
    out["index"] = {"spec": index.spec, "nprobe": 32, "build_s": round(time.perf_counter() - t, 1)}
    t = time.perf_counter()
    _, ids = knn.search(index, q, 4)
    out["index"]["search_s"] = round(time.perf_counter() - t, 1)
    out["index"]["queries_per_s"] = round(n_queries / max(out["index"]["search_s"], 1e-9))
    # Exact neighbours of 200 queries, by brute force in blocks, for the index's recall@4.
    sub = np.ascontiguousarray(q[:200], dtype=np.float32)
    best_s = np.full((200, 4), -np.inf, dtype=np.float32)
    best_i = np.zeros((200, 4), dtype=np.int64)
    for s in range(0, n, 100_000):
        sims = sub @ np.asarray(x[s : s + 100_000], dtype=np.float32).T
        cand_s = np.concatenate([best_s, sims], axis=1)
        cand_i = np.concatenate([best_i, np.arange(s, s + sims.shape[1])[None].repeat(200, 0)], axis=1)
        top = np.argsort(-cand_s, axis=1)[:, :4]
        best_s, best_i = np.take_along_axis(cand_s, top, 1), np.take_along_axis(cand_i, top, 1)
    out["index"]["recall_at_4"] = round(float(np.mean([len(set(ids[i]) & set(best_i[i])) / 4 for i in range(200)])), 3)
    out["peak_rss_mb"] = round(peak_rss_mb())
    out["vectors_float16_mb"] = round(x.nbytes / 2**20)
    return out


def section_sklearn(n: int = 100_000, d: int = 768, k: int = 100) -> dict:
    from sklearn.cluster import MiniBatchKMeans
    from sklearn.metrics import normalized_mutual_info_score

    from curation.kmeans import train_centroids

    x16, truth = mixture(n, d, k, seed=2)
    x = np.asarray(x16, dtype=np.float32)

    res = {"n": n, "d": d, "k": k}
    runs = {}
    for init in ("random", "kmeans++"):
        t = time.perf_counter()
        c, _, _ = train_centroids(x, k, niter=20, seed=0, max_points_per_centroid=n // k + 1, init=init)  # all points
        runs[init] = (c, time.perf_counter() - t)
    # Nearest centroid by euclidean distance for both, so the inertia is comparable.
    import faiss

    def l2_labels(c):
        idx = faiss.IndexFlatL2(d)
        idx.add(np.ascontiguousarray(c, dtype=np.float32))
        return idx.search(x, 1)[1][:, 0]

    def mean_inertia(lab):
        # Inertia with each cluster's mean as its centre: faiss' spherical centroids sit on the unit sphere,
        # away from the mean, which would inflate a plain distance-to-centroid inertia.
        means = np.zeros((k, d), dtype=np.float64)
        np.add.at(means, lab, x)
        means /= np.maximum(np.bincount(lab, minlength=k), 1)[:, None]
        return round(float(((x - means[lab]) ** 2).sum()), 1)

    for init, (c, secs) in runs.items():
        lab = l2_labels(c)
        res["faiss" if init == "random" else "faiss_kmeanspp"] = {
            "seconds": round(secs, 2), "niter": 20, "spherical": True, "init": init,
            "inertia": mean_inertia(lab), "nmi_vs_truth": round(float(normalized_mutual_info_score(truth, lab)), 4)}
    t = time.perf_counter()
    mb = MiniBatchKMeans(n_clusters=k, batch_size=4096, n_init=1, random_state=0, max_iter=100).fit(x)
    secs = time.perf_counter() - t
    lab = l2_labels(mb.cluster_centers_)
    res["sklearn_minibatch"] = {"seconds": round(secs, 2), "batch_size": 4096, "n_init": 1, "init": "k-means++",
                                "iterations": int(mb.n_iter_), "inertia": mean_inertia(lab),
                                "nmi_vs_truth": round(float(normalized_mutual_info_score(truth, lab)), 4)}
    res["speedup_faiss_vs_sklearn"] = round(res["sklearn_minibatch"]["seconds"] / max(res["faiss"]["seconds"], 1e-9), 2)
    res["speedup_faiss_kmeanspp_vs_sklearn"] = round(res["sklearn_minibatch"]["seconds"] / max(res["faiss_kmeanspp"]["seconds"], 1e-9), 2)
    res["peak_rss_mb"] = round(peak_rss_mb())
    return res


def _pixel_embeddings(manifest_dir: Path, out: Path, side: int = 16) -> None:
    """A fixed embedding with no learning at all: the image at side x side RGB, centred, L2-normalised."""
    import pyarrow.parquet as pq

    from curation import embedding_store
    from curation.decode import decode_rgb, read_record_bytes

    rows = pq.read_table(manifest_dir / "manifest.parquet").to_pylist()
    vecs = np.stack([np.asarray(decode_rgb(read_record_bytes(r)).resize((side, side)), dtype=np.float32).reshape(-1) / 255.0 for r in rows])
    vecs -= vecs.mean(axis=1, keepdims=True)
    embedding_store.write_shard(out, 0, [r["id"] for r in rows], vecs)
    embedding_store.write_index(out)


def section_quality(size: str = "small") -> dict:
    import pyarrow.parquet as pq

    from curation.demo_data import build_demo_data
    from curation.ingest import run_ingest
    from curation.retrieve import run_retrieve

    res: dict = {"demo_size": size}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        demo = build_demo_data(tmp / "demo", size=size)
        root = Path(demo["dir"])
        run_ingest([root / "pool"], tmp / "pool_ing", workers=2)
        run_ingest([root / "queries"], tmp / "q_ing", workers=2)
        gt = pq.read_table(root / "ground_truth.parquet").to_pylist()
        kind = {r["relpath"]: r["kind"] for r in gt}
        in_domain_rel = {r["relpath"] for r in gt if r["kind"] == "fmnist" or (r["kind"] == "copy" and kind.get(r["copy_of"]) == "fmnist")}
        manifest = pq.read_table(tmp / "pool_ing" / "manifest.parquet")
        rel_of = dict(zip(manifest["id"].to_pylist(), manifest["relpath"].to_pylist()))
        pool_ids = list(rel_of)
        in_dom = {i for i in pool_ids if rel_of[i] in in_domain_rel}
        res["pool"] = {"images": len(pool_ids), "in_domain": len(in_dom), "in_domain_share": round(len(in_dom) / len(pool_ids), 4)}
        res["queries"] = pq.read_metadata(tmp / "q_ing" / "manifest.parquet").num_rows
        embedders = {}
        t = time.perf_counter()
        _pixel_embeddings(tmp / "pool_ing", tmp / "pix_pool")
        _pixel_embeddings(tmp / "q_ing", tmp / "pix_q")
        embedders["pixels16_rgb"] = (tmp / "pix_pool", tmp / "pix_q", round(time.perf_counter() - t, 1))
        try:
            from curation.embed import run_embed

            t = time.perf_counter()
            kw = dict(arch="vit_tiny", patch_size=16, img_size=64, allow_random_init=True, batch_size=128, num_workers=0, device="cpu")
            run_embed(tmp / "pool_ing", None, tmp / "vit_pool", **kw)
            run_embed(tmp / "q_ing", None, tmp / "vit_q", **kw)
            embedders["vit_tiny_random_init_64px"] = (tmp / "vit_pool", tmp / "vit_q", round(time.perf_counter() - t, 1))
        except Exception as exc:  # the embed stage belongs to another module: report, do not hide the rest
            res["vit_embed_error"] = f"{type(exc).__name__}: {exc}"
        rng = np.random.default_rng(0)
        for name, (pool_e, q_e, embed_s) in embedders.items():
            res[name] = {"embed_s": embed_s}
            for mode, params in {
                "cluster": dict(mode="cluster", n_clusters=50, per_cluster=10_000),
                "sample_k4": dict(mode="sample", k=4),
                "cluster_centered": dict(mode="cluster", n_clusters=50, per_cluster=10_000, center=True),
                "sample_k4_centered": dict(mode="sample", k=4, center=True),
            }.items():
                t = time.perf_counter()
                m = run_retrieve(pool_e, q_e, tmp / "pool_ing", tmp / f"ret_{name}_{mode}", report=False, seed=0, **params)
                secs = time.perf_counter() - t
                got = pq.read_table(Path(m["dir"]) / "retrieved.parquet", columns=["id"])["id"].to_pylist()
                hits = sum(i in in_dom for i in got)
                rand = rng.choice(len(pool_ids), size=len(got), replace=False)
                rand_hits = sum(pool_ids[j] in in_dom for j in rand)
                res[name][mode] = {
                    "retrieved": len(got),
                    "in_domain_fraction": round(hits / max(len(got), 1), 4),
                    "random_sample_in_domain_fraction": round(rand_hits / max(len(got), 1), 4),
                    "recall_of_in_domain_pool": round(hits / max(len(in_dom), 1), 4),
                    "random_sample_recall": round(rand_hits / max(len(in_dom), 1), 4),
                    "collisions": m["counts"]["collisions"],
                    "seconds": round(secs, 2),
                    **({"clusters_chosen": m["query_sets"]["vit_q" if "vit" in name else "pix_q"].get("clusters_chosen")} if mode.startswith("cluster") else {}),
                }
    res["peak_rss_mb"] = round(peak_rss_mb())
    return res


def _run_section(name: str, args: argparse.Namespace) -> dict:
    """Each section in a fresh process, so its peak memory is its own."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        path = f.name
    cmd = [sys.executable, "-m", "bench.bench_retrieve", "--section", name, "--section-out", path,
           "--scale-n", str(args.scale_n), "--size", args.size]
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=Path(__file__).resolve().parent.parent)
    if proc.returncode != 0:
        return {"error": f"exit status {proc.returncode}"}
    out = json.loads(Path(path).read_text())
    os.unlink(path)
    out["wall_s"] = round(time.perf_counter() - t, 1)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--only", choices=SECTIONS, action="append")
    ap.add_argument("--scale-n", type=int, default=1_000_000)
    ap.add_argument("--size", default="small", help="demo data size for the quality section")
    ap.add_argument("--section", choices=SECTIONS, help=argparse.SUPPRESS)
    ap.add_argument("--section-out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.section:
        fn = {"quality": lambda: section_quality(args.size), "scale": lambda: section_scale(args.scale_n),
              "sklearn": section_sklearn}[args.section]
        Path(args.section_out).write_text(json.dumps(fn()))
        return
    import faiss

    sections = args.only or list(SECTIONS)
    result = {
        "command": "python -m bench.bench_retrieve" + "".join(f" --only {s}" for s in args.only or [])
        + (f" --scale-n {args.scale_n}" if args.scale_n != 1_000_000 else ""),
        "faiss": faiss.__version__, "faiss_threads": faiss.omp_get_max_threads(),
    }
    for s in sections:
        print(f"-- {s}", flush=True)
        result[s] = _run_section(s, args)
    name = "retrieve" if not args.only else "retrieve_" + "_".join(args.only)
    write_result(name, result)


if __name__ == "__main__":
    main()
