"""VLAD: one global vector per image from its local descriptors, for candidate retrieval.

Each local descriptor is assigned to its nearest codeword and the residuals are summed per codeword
(Jegou et al. 2010). Unlike a global hash, the sum is over local patches, so a crop or a small rotation
keeps most of the vector. Power- and intra-normalisation tame bursty textures. The codebook is trained on
the pool itself with faiss k-means, so no weights are needed.
"""

from __future__ import annotations

import faiss
import numpy as np


def train_codebook(sample: np.ndarray, k: int, seed: int = 0) -> np.ndarray:
    """k codewords from a (m, 128) float32 sample of local descriptors (fewer if the sample is tiny)."""
    k = max(1, min(k, len(sample) // 8))
    km = faiss.Kmeans(sample.shape[1], k, niter=20, seed=seed, spherical=False, verbose=False)
    km.train(np.ascontiguousarray(sample, dtype=np.float32))
    return km.centroids.copy()


class Vlad:
    def __init__(self, codebook: np.ndarray):
        self.codebook = np.ascontiguousarray(codebook, dtype=np.float32)
        self.k, self.d = self.codebook.shape
        self.index = faiss.IndexFlatL2(self.d)
        self.index.add(self.codebook)

    @property
    def dim(self) -> int:
        return self.k * self.d

    def encode(self, desc: np.ndarray) -> np.ndarray:
        """(n, d) local descriptors -> (k*d,) float32 unit vector (zeros when n == 0)."""
        out = np.zeros((self.k, self.d), np.float32)
        if len(desc):
            desc = np.ascontiguousarray(desc, dtype=np.float32)
            _, assign = self.index.search(desc, 1)
            np.add.at(out, assign[:, 0], desc - self.codebook[assign[:, 0]])
            # intra-normalisation: each codeword's block to unit norm, so one busy texture cannot
            # dominate the vector
            norms = np.linalg.norm(out, axis=1, keepdims=True)
            out = np.where(norms > 0, out / np.maximum(norms, 1e-12), 0.0)
        v = out.reshape(-1)
        v = np.sign(v) * np.sqrt(np.abs(v))  # power normalisation
        n = np.linalg.norm(v)
        return (v / n).astype(np.float32) if n > 0 else v.astype(np.float32)
