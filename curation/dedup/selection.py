"""From copy edges to decisions: components, the kept image of each, and why every other one goes.

Rules (deterministic for a given input order):
- exact duplicates (same decoded pixels) and copy edges (score >= threshold) join components;
- each component keeps its largest image (width x height), ties to the first seen (input order);
- a removed image says why: `exact-duplicate` (same pixels as `matched`) or `near-copy` (`matched` is
  the kept image when it is directly linked to it, else its best-scoring linked neighbour);
- decontamination: a component with any member near a reference image (score >= the reference
  threshold) is dropped whole, reason `reference-copy`, `matched` the reference image;
- images that could not be read keep their reason and component -1.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np

from curation.dedup.components import connected_components


@dataclass
class Decisions:
    component: np.ndarray  # int64, -1 for unusable images
    keep: np.ndarray  # bool
    reason: list[str | None]
    matched: list[int | None]  # pool index, or ref index when reason == "reference-copy"
    score: np.ndarray  # float32 similarity to `matched` (nan when none)
    group_size: np.ndarray  # members in the component


def exact_edges(hashes: list[str | None]) -> tuple[np.ndarray, np.ndarray]:
    first: dict[str, int] = {}
    a, b = [], []
    for i, h in enumerate(hashes):
        if h is None:
            continue
        j = first.setdefault(h, i)
        if j != i:
            a.append(j)
            b.append(i)
    return np.asarray(a, np.int64), np.asarray(b, np.int64)


def decide(hashes: list[str | None], area: np.ndarray, errors: list[str | None],
           edges: tuple[np.ndarray, np.ndarray, np.ndarray],
           ref_hits: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> Decisions:
    n = len(hashes)
    valid = np.array([h is not None for h in hashes], bool)
    ea, eb = exact_edges(hashes)
    ci, cj, cs = edges
    label = connected_components(n, np.concatenate([ea, ci]), np.concatenate([eb, cj]))
    label = np.where(valid, label, -1)

    # kept image per component: largest area, then first seen
    order = np.lexsort((np.arange(n), -area.astype(np.int64), label))
    kept_of: dict[int, int] = {}
    for i in order:
        if valid[i]:
            kept_of.setdefault(int(label[i]), int(i))
    sizes = defaultdict(int)
    for lab in label[valid]:
        sizes[int(lab)] += 1

    keep = np.zeros(n, bool)
    reason: list[str | None] = [None] * n
    matched: list[int | None] = [None] * n
    score = np.full(n, np.nan, np.float32)
    group = np.zeros(n, np.int64)

    best_edge: dict[int, tuple[float, int]] = {}  # node -> (score, neighbour) of its best copy edge
    direct: dict[tuple[int, int], float] = {}  # (low, high) -> score
    for a, b, s in zip(ci.tolist(), cj.tolist(), cs.tolist()):
        direct[(min(a, b), max(a, b))] = max(s, direct.get((min(a, b), max(a, b)), s))
        for x, y in ((a, b), (b, a)):
            if x not in best_edge or s > best_edge[x][0] or (s == best_edge[x][0] and y < best_edge[x][1]):
                best_edge[x] = (s, y)
    first_with_hash: dict[str, int] = {}
    with_hash: dict[str, list[int]] = defaultdict(list)
    for i, h in enumerate(hashes):
        if h is not None:
            first_with_hash.setdefault(h, i)
            with_hash[h].append(i)

    for i in range(n):
        if not valid[i]:
            reason[i] = errors[i] or "unusable"
            continue
        lab = int(label[i])
        group[i] = sizes[lab]
        k = kept_of[lab]
        if i == k:
            keep[i] = True
            continue
        if hashes[i] == hashes[k]:
            reason[i], matched[i], score[i] = "exact-duplicate", k, 1.0
        elif first_with_hash[hashes[i]] != i:
            reason[i], matched[i], score[i] = "exact-duplicate", first_with_hash[hashes[i]], 1.0
        elif (min(i, k), max(i, k)) in direct:
            reason[i], matched[i], score[i] = "near-copy", k, direct[(min(i, k), max(i, k))]
        else:
            # Its own best copy edge, or (joined only through an exact twin later in the order) the twin's.
            linked = next((t for t in [i] + with_hash[hashes[i]] if t in best_edge), None)
            s, j = best_edge[linked] if linked is not None else (float("nan"), k)
            reason[i], matched[i], score[i] = "near-copy", j, s

    if ref_hits is not None and len(ref_hits[0]):
        pi, rj, rs = ref_hits
        best_ref: dict[int, tuple[float, int]] = {}
        comp_ref: dict[int, tuple[float, int]] = {}
        for a, r, s in zip(pi.tolist(), rj.tolist(), rs.tolist()):
            if not valid[a]:
                continue
            if a not in best_ref or s > best_ref[a][0]:
                best_ref[a] = (s, r)
            lab = int(label[a])
            if lab not in comp_ref or s > comp_ref[lab][0]:
                comp_ref[lab] = (s, r)
        for i in np.flatnonzero(valid & np.isin(label, list(comp_ref))):
            s, r = best_ref.get(int(i), comp_ref[int(label[i])])
            keep[i] = False
            reason[i], matched[i], score[i] = "reference-copy", r, s
    return Decisions(label, keep, reason, matched, score, group)

