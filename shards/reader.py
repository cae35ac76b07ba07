"""Stream the shards of `run_shard` for training: rank/worker split, shuffle buffer, exact resume.

Usage (one dataset object per rank):

    ds = ShardDataset(root, rank=rank, world_size=world, seed=0, shuffle_buffer=2000,
                      decode="pil", transform=train_transform)
    loader = DataLoader(ds, batch_size=64, num_workers=4)   # persistent_workers=False (the default)
    for epoch in range(start_epoch, epochs):
        ds.set_epoch(epoch)
        for batch in loader:
            ...train...
            ds.record(batch)                      # mark these samples consumed
            if time_to_checkpoint:
                save({"data": ds.state_dict(), ...})
    # resume: ds.load_state_dict(saved["data"]); the next iteration of that epoch continues exactly after
    # the last recorded sample (prefetched but unrecorded batches are replayed).

Each sample is a dict: `image` (decoded, transformed), `key`, `shard`, `offset` (position in its shard),
`epoch`, `worker`, `workers` and `index` (its position in this worker's stream for the epoch; `record` uses
these three), plus `meta` (the sample's json) with `with_meta=True`.

Order. Each epoch, shards are permuted with (seed, epoch); rank r reads shards r, r+W, ...; DataLoader
worker w of that rank reads every num_workers-th of those. Every sample of the dataset is therefore read by
exactly one (rank, worker) per epoch. Ranks can differ by up to one shard of samples:
`min_samples_per_rank(epoch)` gives the count every rank can reach (stop the epoch there for DDP).
Within a worker, samples pass a shuffle buffer of `shuffle_buffer` samples seeded by (seed, epoch, rank,
worker). The emission order is computed from the shard indexes before any tar is opened, which is what
makes the position resumable: resuming after n samples re-reads only from the shard of the oldest
sample still in the buffer.

Integrity. Each sample's image bytes are hashed and compared with the sha256 in its json. With
`on_error="skip"` (default) a bad sample, an unreadable or truncated shard, or a sample missing from its
tar is logged with the shard's file name, appended to `errors` (and to `error_log`, a JSON-lines file,
when given, since DataLoader workers are separate processes) and skipped; with `on_error="raise"` a
`CorruptShardError` naming the shard is raised instead.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import IterableDataset, get_worker_info
from webdataset.tariterators import group_by_keys, tar_file_expander

log = logging.getLogger(__name__)


class CorruptShardError(RuntimeError):
    """A shard that cannot be read or whose content does not match its checksums; names the shard."""


def _decode_pil(data: bytes, ext: str):
    from curation.decode import decode_rgb

    return decode_rgb(data)


def _raw_bytes(data: bytes, ext: str) -> bytes:
    return data


# Module-level functions, not lambdas: datasets must pickle for spawn/forkserver DataLoader workers.
DECODERS: dict[str, Callable[[bytes, str], Any]] = {
    "pil": _decode_pil,
    "bytes": _raw_bytes,
}


def emission_order(n: int, buffer: int, rng: np.random.Generator) -> np.ndarray:
    """Order in which a shuffle buffer of `buffer` slots emits inputs 0..n-1 (the webdataset rule).

    Each input is appended; once the buffer is full a random slot is swapped to the end and emitted.
    """
    if buffer <= 1 or n <= 1:
        return np.arange(n, dtype=np.int64)
    out = np.empty(n, dtype=np.int64)
    buf: list[int] = []
    picks = rng.random(n)
    k = 0
    for i in range(n):
        buf.append(i)
        if len(buf) >= buffer:
            j = int(picks[k] * len(buf))
            buf[j], buf[-1] = buf[-1], buf[j]
            out[k] = buf.pop()
            k += 1
    while buf:
        j = int(picks[k] * len(buf))
        buf[j], buf[-1] = buf[-1], buf[j]
        out[k] = buf.pop()
        k += 1
    return out


class ShardDataset(IterableDataset):
    def __init__(
        self,
        root: str | os.PathLike,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        shuffle_shards: bool = True,
        decode: str | Callable[[bytes, str], Any] = "pil",
        transform: Callable[[Any], Any] | None = None,
        verify: bool = True,
        on_error: str = "skip",
        error_log: str | os.PathLike | None = None,
        with_meta: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world size {world_size}")
        if on_error not in ("skip", "raise"):
            raise ValueError("on_error must be 'skip' or 'raise'")
        self.root = Path(root)
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.shuffle_buffer, self.shuffle_shards = shuffle_buffer, shuffle_shards
        self.decode = DECODERS[decode] if isinstance(decode, str) else decode
        self.transform, self.verify, self.on_error = transform, verify, on_error
        self.error_log = Path(error_log) if error_log else None
        self.with_meta = with_meta
        self.shards = sorted(p for p in self.root.glob("*.tar") if p.stem.isdigit())
        if not self.shards:
            raise FileNotFoundError(f"no shards ({{shard:06d}}.tar) in {self.root}")
        # Keys in tar order, per shard, from the shard indexes: the plan of every epoch is built from these.
        self.keys: list[list[str]] = []
        for p in self.shards:
            idx = p.with_suffix(".parquet")
            if not idx.is_file():
                raise FileNotFoundError(f"shard {p.name} has no index {idx.name}: the shard write did not finish")
            self.keys.append(pq.read_table(idx, columns=["key"])["key"].to_pylist())
        self.epoch = 0
        self._resume: dict[str, Any] | None = None
        self._consumed: dict[int, int] = {}
        self._workers_seen: int | None = None
        self.errors: list[dict[str, Any]] = []

    # ------------------------------------------------------------ plan

    def rank_shards(self, epoch: int, rank: int | None = None) -> list[int]:
        rank = self.rank if rank is None else rank
        order = np.arange(len(self.shards))
        if self.shuffle_shards:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
        return [int(s) for s in order[rank :: self.world_size]]

    def worker_shards(self, epoch: int, worker: int, num_workers: int) -> list[int]:
        return self.rank_shards(epoch)[worker::num_workers]

    def samples_per_rank(self, epoch: int) -> list[int]:
        return [sum(len(self.keys[s]) for s in self.rank_shards(epoch, r)) for r in range(self.world_size)]

    def min_samples_per_rank(self, epoch: int) -> int:
        return min(self.samples_per_rank(epoch))

    def __len__(self) -> int:
        return self.samples_per_rank(self.epoch)[self.rank]

    # ------------------------------------------------------------ state

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)
        self._consumed = {}
        if self._resume is not None and self._resume["epoch"] != self.epoch:
            self._resume = None

    def record(self, batch: dict[str, Any]) -> None:
        """Mark the samples of a batch (or one sample) as consumed by training."""
        workers = _as_list(batch["worker"])
        indices = _as_list(batch["index"])
        self._workers_seen = int(_as_list(batch["workers"])[0])
        for w, i in zip(workers, indices):
            w, i = int(w), int(i)
            if i + 1 > self._consumed.get(w, 0):
                self._consumed[w] = i + 1

    def state_dict(self) -> dict[str, Any]:
        consumed = dict(self._consumed)
        if self._resume is not None:  # not yet iterated since the load: keep the loaded position
            for w, n in self._resume["consumed"].items():
                consumed[int(w)] = max(consumed.get(int(w), 0), n)
        return {
            "epoch": self.epoch, "seed": self.seed, "rank": self.rank, "world_size": self.world_size,
            "num_workers": self._workers_seen if self._workers_seen is not None else (self._resume or {}).get("num_workers"),
            "shuffle_buffer": self.shuffle_buffer, "shards": len(self.shards),
            "consumed": {int(w): int(n) for w, n in consumed.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("seed", "rank", "world_size", "shuffle_buffer", "shards"):
            if k in state and state[k] != getattr(self, k if k != "shards" else "_n_shards"):
                raise ValueError(f"cannot resume: {k} was {state[k]}, now {getattr(self, k if k != 'shards' else '_n_shards')}")
        self.epoch = int(state["epoch"])
        self._resume = {"epoch": self.epoch, "num_workers": state.get("num_workers"),
                        "consumed": {int(w): int(n) for w, n in state["consumed"].items()}}
        self._consumed = dict(self._resume["consumed"])
        self._workers_seen = state.get("num_workers")

    @property
    def _n_shards(self) -> int:
        return len(self.shards)

    # ------------------------------------------------------------ reading

    def _error(self, shard: Path, key: str | None, reason: str) -> None:
        msg = f"shard {shard.name}: {reason}" + (f" (sample {key})" if key else "")
        if self.on_error == "raise":
            raise CorruptShardError(msg)
        log.warning("skipping: %s", msg)
        rec = {"shard": shard.name, "key": key, "reason": reason, "epoch": self.epoch, "rank": self.rank}
        self.errors.append(rec)
        if self.error_log is not None:
            with open(self.error_log, "a") as f:
                f.write(json.dumps(rec) + "\n")

    def _read_shard(self, s: int) -> Iterator[tuple[int, dict[str, Any]]]:
        """(offset, sample) of the good samples of shard s, in tar order; bad ones are reported."""
        path = self.shards[s]
        offsets = {k: i for i, k in enumerate(self.keys[s])}
        seen = set()
        try:
            with open(path, "rb") as f:
                for sample in group_by_keys(tar_file_expander([{"url": str(path), "stream": f}])):
                    key = sample["__key__"]
                    off = offsets.get(key)
                    if off is None:
                        self._error(path, key, "sample not in the shard index")
                        continue
                    seen.add(off)
                    bad = self._check(sample)
                    if bad:
                        self._error(path, key, bad)
                        continue
                    yield off, sample
        except CorruptShardError:
            raise
        except Exception as exc:  # truncated tar, unreadable file, bad member names
            self._error(path, None, f"unreadable after {len(seen)} samples: {type(exc).__name__}: {exc}")
            return
        if len(seen) < len(offsets):
            self._error(path, None, f"{len(offsets) - len(seen)} indexed samples missing from the tar")

    def _check(self, sample: dict[str, Any]) -> str | None:
        if "json" not in sample:
            return "no json member"
        try:
            meta = json.loads(sample["json"])
        except ValueError:
            return "json member is not valid JSON"
        ext = meta.get("ext")
        if ext not in sample:
            return f"no image member .{ext}"
        sample["__meta__"] = meta
        if self.verify and hashlib.sha256(sample[ext]).hexdigest() != meta.get("sha256"):
            return "sha256 of the image bytes does not match its json"
        return None

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        worker, nworkers = (info.id, info.num_workers) if info is not None else (0, 1)
        epoch = self.epoch
        start = 0
        if self._resume is not None and self._resume["epoch"] == epoch:
            saved = self._resume.get("num_workers")
            if saved is not None and saved != nworkers:
                raise ValueError(f"cannot resume: the position was saved with {saved} dataloader workers, now {nworkers}")
            start = self._resume["consumed"].get(worker, 0)
        shards = self.worker_shards(epoch, worker, nworkers)
        sizes = np.array([len(self.keys[s]) for s in shards], dtype=np.int64)
        bounds = np.concatenate([[0], np.cumsum(sizes)])  # input ordinal range of each shard
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        order = emission_order(int(bounds[-1]), self.shuffle_buffer, rng)
        remaining = order[start:]
        if len(remaining) == 0:
            return
        first_shard = int(np.searchsorted(bounds, remaining.min(), side="right") - 1)
        pending = set(remaining.tolist())
        held: dict[int, dict[str, Any]] = {}
        read_upto = int(bounds[first_shard])  # every ordinal below this has been read (or found missing)
        reader = self._ordinals(shards, bounds, first_shard)
        for index, ordinal in enumerate(remaining.tolist(), start=start):
            while ordinal not in held and ordinal >= read_upto:
                try:
                    ordinal_read, sample, read_upto = next(reader)
                except StopIteration:
                    read_upto = int(bounds[-1])
                    break
                if ordinal_read is not None and ordinal_read in pending:
                    held[ordinal_read] = sample
            sample = held.pop(ordinal, None)
            pending.discard(ordinal)
            if sample is None:
                continue  # reported as corrupt when its shard was read
            yield self._output(sample, shards, bounds, ordinal, epoch, worker, nworkers, index)

    def _ordinals(self, shards: list[int], bounds: np.ndarray, first: int) -> Iterator[tuple[int | None, Any, int]]:
        """(ordinal, sample, read_upto) for each good sample, then (None, None, end) at each shard's end."""
        for i in range(first, len(shards)):
            base = int(bounds[i])
            for off, sample in self._read_shard(shards[i]):
                yield base + off, sample, base + off + 1  # tar order: everything up to this one is read
            yield None, None, int(bounds[i + 1])

    def _output(self, sample, shards, bounds, ordinal, epoch, worker, nworkers, index) -> dict[str, Any]:
        meta = sample["__meta__"]
        i = int(np.searchsorted(bounds, ordinal, side="right") - 1)
        image = self.decode(sample[meta["ext"]], meta["ext"])
        if self.transform is not None:
            image = self.transform(image)
        out = {"image": image, "key": sample["__key__"], "shard": shards[i], "offset": int(ordinal - bounds[i]),
               "epoch": epoch, "worker": worker, "workers": nworkers, "index": index}
        if self.with_meta:
            out["meta"] = meta
        return out


def _as_list(x: Any) -> list:
    if isinstance(x, torch.Tensor):
        return x.reshape(-1).tolist()
    if isinstance(x, (list, tuple)):
        return list(x)
    return [x]
