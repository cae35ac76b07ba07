"""The built-in copy detector: SIFT + VLAD retrieval, then RANSAC geometric verification.

No weights are needed. Keypoints are extracted at two working sizes (fine: 448 px long edge, coarse:
224 px). Candidates come from a flip-symmetric VLAD vector over both keypoint sets (codebook trained on
the pool); every candidate pair is then scored by the number of keypoint matches consistent with one
similarity transform (verify.py), on the scale that finds more, which is what separates a copy (a crop,
resize, rotation, recolouring of the same pixels) from a merely similar image. Local features live in
memory-mapped arrays in the stage's work directory, so the pool does not have to fit in memory.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import faiss
import numpy as np
from numpy.lib.format import open_memmap
from PIL import Image

from curation.dedup.descriptors import Descriptor
from curation.dedup.local_features import LocalFeatures, SiftExtractor
from curation.dedup.verify import inlier_count, inliers_to_score
from curation.dedup.vlad import Vlad, train_codebook


class BuiltinDescriptor(Descriptor):
    name = "builtin"
    # Geometric verification costs milliseconds per pair: verify each image's best 24 VLAD neighbours
    # (copies chain through components, so a family needs only a connected set of verified edges).
    max_candidates = 24

    def __init__(self, *, side: int = 448, max_keypoints: int = 400, coarse_side: int = 224,
                 coarse_keypoints: int = 300, coarse_px: float = 4.0, codebook: int = 32,
                 pca_dim: int = 256, pca_above: int = 20000, candidate_floor: float = 0.05,
                 threads: int | None = None, seed: int = 0):
        # Two keypoint sets per image. The fine one (long edge `side`) carries the detail of textured
        # images. The coarse one (long edge `coarse_side`, CLAHE over 4 x 4 tiles) describes the large
        # structure: on smooth photos (sky, bokeh, motion blur) and on JPEG-compressed or blurred copies
        # the fine detector spends its keypoints on compression noise that no two copies share, while the
        # coarse one still lands on the clouds, horizon and blobs. A pair is scored by the larger of its
        # two verified inlier counts (bench/bench_dedup.py: recall up, hard negatives unchanged).
        self.extract = SiftExtractor(side=side, max_keypoints=max_keypoints)
        self.extract_coarse = SiftExtractor(side=coarse_side, max_keypoints=coarse_keypoints, tiles=4)
        self.max_keypoints = max_keypoints
        self.coarse_keypoints = coarse_keypoints
        self.coarse_px = coarse_px  # RANSAC tolerance on the coarse scale, in its pixels
        self.codebook_size = codebook
        self.pca_dim = pca_dim
        self.pca_above = pca_above  # below this many images the full VLAD fits in memory: no PCA loss
        self.candidate_floor = candidate_floor
        self.threads = threads or os.cpu_count() or 1
        self.seed = seed

    def params(self) -> dict[str, Any]:
        return {"descriptor": self.name, "side": self.extract.side, "max_keypoints": self.max_keypoints,
                "coarse_side": self.extract_coarse.side, "coarse_keypoints": self.coarse_keypoints,
                "codebook": self.codebook_size, "pca_dim": self.pca_dim, "candidate_floor": self.candidate_floor}

    # --- extraction ---------------------------------------------------------------------------------
    def prepare(self, img: Image.Image) -> tuple[LocalFeatures, LocalFeatures]:
        return self.extract(img), self.extract_coarse(img)

    def begin(self, n: int, work: Path) -> None:
        self.n = n
        d = Path(work) / "builtin_features"
        d.mkdir(parents=True, exist_ok=True)
        self.stores = [_Store(d, "fine", n, self.max_keypoints), _Store(d, "coarse", n, self.coarse_keypoints)]

    def add(self, indices: list[int], items: list[tuple[LocalFeatures, LocalFeatures]]) -> None:
        for i, feats in zip(indices, items):
            for store, f in zip(self.stores, feats):
                store.put(i, f)

    def features(self, i: int, scale: int = 0) -> LocalFeatures:
        """Image i's keypoints: scale 0 fine, 1 coarse."""
        return self.stores[scale].get(i)

    # --- global vectors -----------------------------------------------------------------------------
    def _codebook_sample(self, limit: int = 100_000) -> np.ndarray:
        rng = np.random.default_rng(self.seed)
        order = rng.permutation(self.n)
        per = max(8, limit // max(1, min(self.n, 2000)))
        parts, total = [], 0
        for i in order:
            for scale in (0, 1):
                f = self.features(int(i), scale)
                if len(f.desc):
                    take = f.desc[rng.permutation(len(f.desc))[:per // 2]]
                    parts.append(take)
                    total += len(take)
            if total >= limit:
                break
        return np.concatenate(parts) if parts else np.zeros((0, 128), np.float32)

    def _vlad(self, vlad: Vlad, i: int) -> np.ndarray:
        # Summing the vectors of the image and of its mirror makes the vector identical for an image
        # and its horizontally flipped copy. Both scales contribute: the coarse keypoints find the
        # candidates of blurred, compressed and smooth images (true pairs among the 24 candidates on the
        # benchmark: 0.89 fine only, 0.94 both).
        v = np.zeros(vlad.dim, np.float32)
        for scale in (0, 1):
            f = self.features(i, scale)
            v += vlad.encode(f.desc) + vlad.encode(f.mirrored().desc)
        n = np.linalg.norm(v)
        return v / n if n > 0 else v

    def finish(self) -> np.ndarray:
        for store in self.stores:
            store.flush()
        sample = self._codebook_sample()
        if len(sample) < 16:  # nothing to describe (e.g. all images flat): every vector is zero
            return np.zeros((self.n, 1), np.float32)
        vlad = Vlad(train_codebook(sample, self.codebook_size, self.seed))
        pca = None
        out_dim = vlad.dim
        if self.n > self.pca_above and self.pca_dim < vlad.dim:
            # Millions of 4096-d vectors do not fit; a PCA fitted on a sample keeps the index small.
            rng = np.random.default_rng(self.seed)
            fit_ids = np.sort(rng.choice(self.n, size=min(self.n, 20000), replace=False))
            fit = np.stack([self._vlad(vlad, int(i)) for i in fit_ids])
            pca = faiss.PCAMatrix(vlad.dim, self.pca_dim)
            pca.train(fit)
            out_dim = self.pca_dim
        out = np.zeros((self.n, out_dim), np.float32)
        chunk = 4096
        with ThreadPoolExecutor(self.threads) as pool:
            for start in range(0, self.n, chunk):
                ids = range(start, min(self.n, start + chunk))
                vecs = np.stack(list(pool.map(lambda i: self._vlad(vlad, i), ids)))
                if pca is not None:
                    vecs = pca.apply(np.ascontiguousarray(vecs))
                    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True) + 1e-12
                out[start:start + len(vecs)] = vecs
        return out

    # --- verification -------------------------------------------------------------------------------
    def pair_scores(self, i: np.ndarray, j: np.ndarray, cos: np.ndarray) -> np.ndarray:
        scores = np.zeros(len(i), np.float32)
        todo = np.flatnonzero(cos >= self.candidate_floor)

        def one(k: int) -> int:
            a, b = int(i[k]), int(j[k])
            n = inlier_count(self.features(a), self.features(b))
            if n < 64:  # a clear fine-scale match needs no second look
                n = max(n, inlier_count(self.features(a, 1), self.features(b, 1), px=self.coarse_px))
            return n

        with ThreadPoolExecutor(self.threads) as pool:
            inl = np.fromiter(pool.map(one, todo), dtype=np.float32, count=len(todo))
        scores[todo] = inliers_to_score(inl)
        return scores


class _Store:
    """One scale's keypoints for every image, in memory-mapped arrays (the pool need not fit in memory)."""

    def __init__(self, folder: Path, name: str, n: int, max_keypoints: int):
        # RootSIFT entries lie in [0, 1]: 8 bits each is plenty (51 KB per image at 400 keypoints).
        self.desc = open_memmap(folder / f"{name}_desc.npy", "w+", np.uint8, (n, max_keypoints, 128))
        self.xy = open_memmap(folder / f"{name}_xy.npy", "w+", np.float32, (n, max_keypoints, 2))
        self.count = np.zeros(n, np.int32)
        self.size = np.zeros((n, 2), np.int32)

    def put(self, i: int, f: LocalFeatures) -> None:
        m = len(f.xy)
        self.count[i] = m
        self.size[i] = f.size
        if m:
            self.desc[i, :m] = np.round(f.desc * 255).astype(np.uint8)
            self.xy[i, :m] = f.xy

    def get(self, i: int) -> LocalFeatures:
        m = int(self.count[i])
        desc = self.desc[i, :m].astype(np.float32) / 255.0
        desc /= np.linalg.norm(desc, axis=1, keepdims=True) + 1e-7
        return LocalFeatures(np.array(self.xy[i, :m]), desc, (int(self.size[i, 0]), int(self.size[i, 1])))

    def flush(self) -> None:
        self.desc.flush()
        self.xy.flush()
