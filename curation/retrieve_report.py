"""Curation report of a retrieval: markdown summary plus PNG image grids a person can eyeball.

- clusters.png: a random sample of the retrieved images of each of the biggest clusters (one row each);
- queries.png: for a few queries, the query image (when its manifest is given) and the images it retrieved,
  nearest first.
Images are read back through curation.decode, so the grids show exactly what the shards will hold.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageOps

TILE = 96
PAD = 4
LABEL_W = 150


def _thumb(row: dict | None) -> Image.Image:
    """A TILE x TILE thumbnail of a manifest row; a grey tile with an x when the image cannot be read."""
    tile = Image.new("RGB", (TILE, TILE), (200, 200, 200))
    if row is None:
        return tile
    try:
        from curation.decode import decode_rgb, read_record_bytes

        # Fit the tile both ways: 28-pixel Fashion-MNIST images are as useless at their size as huge photos.
        img = ImageOps.contain(decode_rgb(read_record_bytes(row)), (TILE, TILE))
        tile.paste(img, ((TILE - img.width) // 2, (TILE - img.height) // 2))
    except Exception:
        d = ImageDraw.Draw(tile)
        d.line((0, 0, TILE, TILE), fill=(120, 0, 0), width=2)
        d.line((0, TILE, TILE, 0), fill=(120, 0, 0), width=2)
    return tile


def image_grid(rows: list[tuple[str, list[Image.Image]]], path: Path) -> None:
    """One labelled row of tiles per entry."""
    ncol = max((len(t) for _, t in rows), default=1)
    w = LABEL_W + ncol * (TILE + PAD) + PAD
    h = len(rows) * (TILE + PAD) + PAD
    canvas = Image.new("RGB", (w, max(h, TILE)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for r, (label, tiles) in enumerate(rows):
        y = PAD + r * (TILE + PAD)
        draw.text((PAD, y + TILE // 2 - 6), label[:24], fill=(0, 0, 0))
        for c, t in enumerate(tiles):
            canvas.paste(t, (LABEL_W + PAD + c * (TILE + PAD), y))
    canvas.save(path)


def _rows(table: pa.Table, idx: Sequence[int]) -> list[dict]:
    return table.take(pa.array(list(idx), pa.int64())).to_pylist()


def write_report(
    work: Path,
    table: pa.Table,
    *,
    pool_manifest_table: pa.Table | None = None,
    query_manifests: Sequence[str | os.PathLike] | None = None,
    n_clusters: int = 6,
    per_row: int = 8,
    n_queries: int = 4,
    seed: int = 0,
) -> Path:
    """Write <work>/report/{report.md, clusters.png, queries.png}; returns the report directory."""
    rdir = Path(work) / "report"
    rdir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = ["# Curation report", "", f"Retrieved images: {table.num_rows}", ""]

    n_q = pc.list_value_length(table["queries"]).to_numpy(zero_copy_only=False)
    lines += [
        f"Images retrieved by more than one query (collisions): {int((n_q > 1).sum())} "
        "(in cluster mode every image lists the nearest queries of its cluster, so most are)",
        f"Queries listed per image: mean {n_q.mean():.2f}, max {int(n_q.max()) if len(n_q) else 0}",
        "",
    ]
    sets = pc.list_flatten(table["query_sets"])
    if len(sets):
        vc = pc.value_counts(sets).to_pylist()
        lines += ["| query set | (image, query) pairs |", "| --- | --- |"]
        lines += [f"| {v['values']} | {v['counts']} |" for v in sorted(vc, key=lambda v: -v["counts"])]
        lines.append("")

    clusters = table["cluster"].to_numpy()
    if (clusters >= 0).any():
        ids, counts = np.unique(clusters[clusters >= 0], return_counts=True)
        top = ids[np.argsort(-counts, kind="stable")][:n_clusters]
        grid = []
        lines += ["## Biggest clusters", "", "| cluster | retrieved images |", "| --- | --- |"]
        for c in top:
            where = np.flatnonzero(clusters == c)
            lines.append(f"| {int(c)} | {len(where)} |")
            pick = rng.choice(where, size=min(per_row, len(where)), replace=False)
            grid.append((f"cluster {int(c)} (n={len(where)})", [_thumb(r) for r in _rows(table, pick)]))
        image_grid(grid, rdir / "clusters.png")
        lines += ["", "![biggest clusters](clusters.png)", ""]

    flat_q = pc.list_flatten(table["queries"]).to_numpy(zero_copy_only=False)
    if len(flat_q):
        parent = pc.list_parent_indices(table["queries"]).to_numpy()
        dist = pc.list_flatten(table["distances"]).to_numpy()
        uq = np.unique(flat_q)
        chosen = rng.choice(uq, size=min(n_queries, len(uq)), replace=False)
        qrows = _query_rows(query_manifests, set(chosen.tolist()))
        grid = []
        lines += ["## Neighbours of a few queries", "", "First tile: the query (grey when its manifest was not given).", ""]
        for q in chosen:
            sel = np.flatnonzero(flat_q == q)
            sel = sel[np.argsort(dist[sel], kind="stable")][: per_row - 1]
            tiles = [_thumb(qrows.get(q))] + [_thumb(r) for r in _rows(table, parent[sel])]
            grid.append((f"query {q}", tiles))
            lines.append(f"- query `{q}`: {int((flat_q == q).sum())} images, nearest distance {float(dist[sel[0]]):.3f}")
        image_grid(grid, rdir / "queries.png")
        lines += ["", "![query neighbours](queries.png)", ""]
    (rdir / "report.md").write_text("\n".join(lines) + "\n")
    return rdir


def _query_rows(query_manifests: Sequence[str | os.PathLike] | None, wanted: set[str]) -> dict[str, dict]:
    found: dict[str, dict] = {}
    for m in query_manifests or []:
        p = Path(m)
        if p.is_dir():
            p = p / "manifest.parquet"
        if not p.is_file():
            continue
        t = pq.read_table(p)
        mask = pc.is_in(t["id"], value_set=pa.array(sorted(wanted), pa.string()))
        for row in t.filter(mask).to_pylist():
            found.setdefault(row["id"], row)
    return found
