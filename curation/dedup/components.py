"""Connected components of the copy graph: a vectorised union-find.

Millions of edges make a Python union-find loop too slow, so roots are hooked in bulk: for every edge
whose endpoints have different roots, the larger root is pointed at the smaller one (np.minimum.at, so
concurrent hooks of one root keep the smallest), then pointers are jumped until every node points at its
root. Roots only ever decrease, so no cycle can form; the loop ends when no edge joins two roots.
Each component is labelled by its smallest member index, which makes labels deterministic.
"""

from __future__ import annotations

import numpy as np


def connected_components(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Label (n,) int64: the smallest node index of each node's component."""
    parent = np.arange(n, dtype=np.int64)
    a = np.asarray(a, dtype=np.int64)
    b = np.asarray(b, dtype=np.int64)
    while len(a):
        ra, rb = parent[a], parent[b]
        differ = ra != rb
        if not differ.any():
            break
        a, b, ra, rb = a[differ], b[differ], ra[differ], rb[differ]
        np.minimum.at(parent, np.maximum(ra, rb), np.minimum(ra, rb))
        while True:  # pointer jumping: every node to its root
            grand = parent[parent]
            if np.array_equal(grand, parent):
                break
            parent = grand
    return parent
