"""The human side of the dedup output: a markdown summary and image grids of the largest groups.

A person deciding whether to trust the thresholds needs to *see* what was removed: each grid row is one
component, the kept image first (green frame), the removed ones after it (red frame), and for
decontaminated components the reference image they matched (blue frame) at the start.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from pathlib import Path
from typing import Callable

from PIL import Image, ImageDraw

GREEN, RED, BLUE = (40, 160, 60), (200, 40, 40), (40, 90, 200)


def _tile(img: Image.Image | None, colour: tuple[int, int, int], side: int) -> Image.Image:
    tile = Image.new("RGB", (side, side), colour)
    inner = side - 8
    if img is None:
        ImageDraw.Draw(tile).rectangle((4, 4, side - 5, side - 5), fill=(230, 230, 230))
        return tile
    im = img.copy()
    im.thumbnail((inner, inner))
    canvas = Image.new("RGB", (inner, inner), (255, 255, 255))
    canvas.paste(im, ((inner - im.width) // 2, (inner - im.height) // 2))
    tile.paste(canvas, (4, 4))
    return tile


def group_grid(groups: list[list[tuple[str, str]]], load: Callable[[str], Image.Image | None], out: Path,
               *, side: int = 128, per_row: int = 8) -> None:
    """groups: rows of (key, role) with role in kept/removed/reference; `load(key)` gives the image."""
    colour = {"kept": GREEN, "removed": RED, "reference": BLUE}
    sheet = Image.new("RGB", (per_row * side, max(1, len(groups)) * side), (255, 255, 255))
    for r, row in enumerate(groups):
        for c, (key, role) in enumerate(row[:per_row]):
            try:
                img = load(key)
            except Exception:  # a grid must not fail the stage; an unreadable image shows grey
                img = None
            sheet.paste(_tile(img, colour[role], side), (c * side, r * side))
    sheet.save(out)


def write_report(work: Path, rows: list[dict], params: dict, load_pool: Callable[[str], Image.Image | None],
                 load_ref: Callable[[str], Image.Image | None], *, max_groups: int = 12,
                 sweep: list[dict] | None = None) -> dict:
    """Write report.md and the PNG grids into `work`; returns counts for the stage manifest. `sweep`: rows
    of (threshold, copy_edges, kept) at other thresholds, shown as a table."""
    reasons = Counter(r["reason"] or "kept" for r in rows)
    members = defaultdict(list)
    for r in rows:
        if r["component"] >= 0:
            members[r["component"]].append(r)
    dup_groups = sorted((m for m in members.values() if len(m) > 1 and any(x["keep"] for x in m)),
                        key=lambda m: (-len(m), m[0]["component"]))[:max_groups]
    ref_groups = sorted((m for m in members.values() if any(x["reason"] == "reference-copy" for x in m)),
                        key=lambda m: (-len(m), m[0]["component"]))[:max_groups]

    def rows_for(groups, with_ref):
        out = []
        for m in groups:
            row = []
            if with_ref:
                refs = sorted({x["matched"] for x in m if x["reason"] == "reference-copy" and x["matched"]})
                row += [("ref:" + p, "reference") for p in refs[:2]]
            row += [(x["path"], "kept" if x["keep"] else "removed") for x in sorted(m, key=lambda x: not x["keep"])]
            out.append(row)
        return out

    def load(key: str):
        return load_ref(key[4:]) if key.startswith("ref:") else load_pool(key)

    files = []
    if dup_groups:
        group_grid(rows_for(dup_groups, False), load, work / "largest_groups.png")
        files.append("largest_groups.png")
    if ref_groups:
        group_grid(rows_for(ref_groups, True), load, work / "reference_copies.png")
        files.append("reference_copies.png")

    lines = [
        "# Dedup report",
        "",
        f"Descriptor `{params.get('descriptor')}`, threshold {params.get('threshold')}, "
        f"reference threshold {params.get('reference_threshold')}, k = {params.get('k')}.",
        "",
        "| outcome | images |",
        "| --- | ---: |",
    ]
    lines += [f"| {k} | {v} |" for k, v in sorted(reasons.items(), key=lambda kv: (-kv[1], kv[0]))]
    lines += ["", f"Components with more than one image: {sum(1 for m in members.values() if len(m) > 1)}.", ""]
    if sweep:
        lines += ["## Other thresholds", "",
                  "From the same scored candidate pairs, at the same reference threshold, before the NSFW pass. "
                  "Rerunning at another threshold reuses the candidates and reruns only this decision.", "",
                  "| threshold | copy edges | images kept |", "| ---: | ---: | ---: |"]
        lines += [f"| {r['threshold']}{' (this run)' if r['threshold'] == params.get('threshold') else ''} "
                  f"| {r['copy_edges']} | {r['kept']} |" for r in sweep]
        lines.append("")
    if dup_groups:
        lines += ["## Largest duplicate groups", "",
                  "Each row of `largest_groups.png` is one group, in the order below: kept image first "
                  "(green frame), removed copies after it (red frame).", "",
                  "| component | images | kept | removed (first 5) |", "| ---: | ---: | --- | --- |"]
        for m in dup_groups:
            kept = next(x["path"] for x in m if x["keep"])
            gone = [x["path"] for x in m if not x["keep"]][:5]
            lines.append(f"| {m[0]['component']} | {len(m)} | `{kept}` | {', '.join(f'`{g}`' for g in gone)} |")
        lines.append("")
    if ref_groups:
        lines += ["## Dropped for matching a reference image", "",
                  "`reference_copies.png`: reference image (blue) then the pool images dropped with it.", "",
                  "| component | images | reference matched |", "| ---: | ---: | --- |"]
        for m in ref_groups:
            ref = next(x["matched"] for x in m if x["matched"])
            lines.append(f"| {m[0]['component']} | {len(m)} | `{ref}` |")
        lines.append("")
    (work / "report.md").write_text("\n".join(lines))
    return {"report": "report.md", "grids": files}
