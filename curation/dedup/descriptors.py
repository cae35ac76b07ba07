"""The descriptor interface of the dedup stage, and the registry of implementations.

A descriptor turns images into unit vectors whose inner product says "copy" (kNN candidates), and may
re-score candidate pairs more precisely (the built-in one checks geometry). The stage drives it in three
steps so that images are decoded once and never all held in memory:
  prepare(img)          in worker threads, per decoded image -> something small (features, a tensor)
  add(indices, items)   in the main thread, per chunk
  finish() -> (n, d)    float32 rows, unit norm (all-zero rows for images that could not be described)
and then pair_scores(i, j, cos) for the kNN candidate pairs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from lvdflow.errors import UserError

DESCRIPTORS = ("builtin", "sscd", "backbone")


class Descriptor:
    name = "base"
    # Below this cosine a candidate pair is not worth scoring (saves verification work).
    candidate_floor = -1.0

    def prepare(self, img: Image.Image) -> Any:
        raise NotImplementedError

    def begin(self, n: int, work: Path) -> None:
        raise NotImplementedError

    def add(self, indices: list[int], items: list[Any]) -> None:
        raise NotImplementedError

    def finish(self) -> np.ndarray:
        raise NotImplementedError

    def pair_scores(self, i: np.ndarray, j: np.ndarray, cos: np.ndarray) -> np.ndarray:
        """Similarity of candidate pairs on the threshold's scale; learned descriptors use the cosine."""
        return cos

    def params(self) -> dict[str, Any]:
        return {"descriptor": self.name}


def make_descriptor(name: str, weights: str | Path | None = None, *, device: str | None = None,
                    batch_size: int = 64, threads: int | None = None) -> Descriptor:
    """Build the descriptor called `name`; raises UserError for bad names or missing weights."""
    if name == "builtin":
        from curation.dedup.builtin import BuiltinDescriptor

        return BuiltinDescriptor(threads=threads)
    if name in ("sscd", "backbone"):
        if not weights:
            raise UserError(f"--descriptor {name} needs --weights FILE")
        if not Path(weights).is_file():
            raise UserError(f"weights file does not exist: {weights}")
        if name == "sscd":
            from curation.dedup.torch_descriptors import SscdDescriptor

            return SscdDescriptor(Path(weights), device=device, batch_size=batch_size)
        from curation.dedup.torch_descriptors import BackboneDescriptor

        return BackboneDescriptor(Path(weights), device=device, batch_size=batch_size)
    raise UserError(f"unknown descriptor {name!r}: choose one of {', '.join(DESCRIPTORS)}")
