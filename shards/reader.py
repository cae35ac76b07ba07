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

Order. Each epoch, shards are permuted with (seed, epoch), the same permutation on every rank, and the
split is by sample over that order: with N samples (from the shard indexes) and W ranks, rank r reads the
contiguous range [r*M, (r+1)*M) of the concatenated permuted shards, M = N // W, so every rank gets exactly
M samples per epoch whatever the shard sizes (fewer shards than ranks works; a rank reads whole shards plus
at most two partial ones at its range's ends). The last N - W*M (< W) samples of each epoch's order are
dropped: equal epochs keep the ranks of a lockstep (DDP/FSDP) run in the same epoch, and the permutation
drops different samples each epoch. With `drop_remainder=False` nothing is dropped: rank r reads
[r*N//W, (r+1)*N//W) (M or M+1 samples). N < W raises a UserError. The pieces of a rank (whole shards or
shard slices, in order) are dealt to its DataLoader workers: worker w of K reads pieces w, w+K, ...; a slice
is read from its tar's start, skipping the samples before it. Every sample of the epoch's ranges is thus
read by exactly one (rank, worker). Within a worker, samples pass a shuffle buffer of `shuffle_buffer`
samples seeded by (seed, epoch, rank, worker). The emission order is computed from the shard indexes before
any tar is opened, which is what makes the position resumable: resuming after n samples re-reads only from
the piece of the oldest sample still in the buffer. Positions saved before the per-sample split (no
"split" key) resume exactly with one rank; with several, whose shards were dealt whole, they start the
next epoch (logged).

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

from lvdflow.errors import UserError

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
        drop_remainder: bool = True,
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
        self.drop_remainder = bool(drop_remainder)
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
        self.samples = sum(len(k) for k in self.keys)
        if self.samples < world_size:
            raise UserError(
                f"the shards in {self.root} hold {self.samples} samples, fewer than the world size of {world_size} "
                f"processes: the split is per sample and every rank needs at least one per epoch; train with at "
                f"most {self.samples} processes or on more images (the shard writer's max_count, the samples "
                f"per shard, does not change this)")
        self.epoch = 0
        self._resume: dict[str, Any] | None = None
        self._consumed: dict[int, int] = {}
        self._workers_seen: int | None = None
        self.errors: list[dict[str, Any]] = []

    # ------------------------------------------------------------ plan

    def epoch_order(self, epoch: int) -> list[int]:
        """The shards in this epoch's order: a permutation by (seed, epoch), the same on every rank."""
        if not self.shuffle_shards:
            return list(range(len(self.shards)))
        return [int(s) for s in np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))]

    def rank_range(self, rank: int | None = None) -> tuple[int, int]:
        """[start, stop) of a rank's samples in the concatenation of an epoch's permuted shards."""
        rank = self.rank if rank is None else rank
        n, w = self.samples, self.world_size
        if self.drop_remainder:
            return rank * (n // w), (rank + 1) * (n // w)
        return rank * n // w, (rank + 1) * n // w

    def rank_pieces(self, epoch: int, rank: int | None = None) -> list[tuple[int, int, int]]:
        """(shard, start, stop) of each shard or shard slice a rank reads this epoch, in order: the shards of
        its sample range, the first and last possibly cut."""
        lo, hi = self.rank_range(rank)
        pieces, pos = [], 0
        for s in self.epoch_order(epoch):
            n = len(self.keys[s])
            a, b = max(lo, pos), min(hi, pos + n)
            if a < b:
                pieces.append((s, a - pos, b - pos))
            pos += n
            if pos >= hi:
                break
        return pieces

    def worker_pieces(self, epoch: int, worker: int, num_workers: int) -> list[tuple[int, int, int]]:
        return self.rank_pieces(epoch)[worker::num_workers]

    def rank_shards(self, epoch: int, rank: int | None = None) -> list[int]:
        """The shards a rank reads (wholly or in part) this epoch."""
        return [s for s, _, _ in self.rank_pieces(epoch, rank)]

    def worker_shards(self, epoch: int, worker: int, num_workers: int) -> list[int]:
        return [s for s, _, _ in self.worker_pieces(epoch, worker, num_workers)]

    def samples_per_rank(self, epoch: int) -> list[int]:
        """Samples each rank reads in an epoch (the same every epoch): all equal with drop_remainder."""
        return [hi - lo for lo, hi in map(self.rank_range, range(self.world_size))]

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
            "split": "samples", "samples": self.samples, "drop_remainder": self.drop_remainder,
            "consumed": {int(w): int(n) for w, n in consumed.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k in ("seed", "rank", "world_size", "shuffle_buffer", "shards", "samples", "drop_remainder"):
            if k in state and state[k] != getattr(self, k if k != "shards" else "_n_shards"):
                raise ValueError(f"cannot resume: {k} was {state[k]}, now {getattr(self, k if k != 'shards' else '_n_shards')}")
        if state.get("split") != "samples" and self.world_size > 1:
            # Saved before the per-sample split, when ranks were dealt whole shards: the position means nothing
            # in today's plan. (With one rank both plans are every shard in order: it resumes exactly.)
            log.warning("the saved data position (epoch %s) is from the reader's earlier whole-shard rank split; "
                        "this rank starts epoch %s", state["epoch"], int(state["epoch"]) + 1)
            self._resume = None
            self.set_epoch(int(state["epoch"]) + 1)
            self._workers_seen = None
            return
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

    def _read_shard(self, s: int, lo: int = 0, hi: int | None = None) -> Iterator[tuple[int, dict[str, Any]]]:
        """(offset, sample) of the good samples at offsets [lo, hi) of shard s, in tar order; bad ones are
        reported. The tar is read from its start (samples before `lo` are skipped unchecked) and left after
        offset hi - 1."""
        path = self.shards[s]
        n = len(self.keys[s])
        hi = n if hi is None else hi
        offsets = {k: i for i, k in enumerate(self.keys[s])}
        last = -1  # offset of the last indexed sample passed
        seen = 0  # of [lo, hi)
        try:
            with open(path, "rb") as f:
                for sample in group_by_keys(tar_file_expander([{"url": str(path), "stream": f}])):
                    key = sample["__key__"]
                    off = offsets.get(key)
                    if off is None:
                        # Reported by the piece that holds the position it sits at, so once per shard.
                        if lo <= last + 1 < hi or last + 1 == hi == n:
                            self._error(path, key, "sample not in the shard index")
                        continue
                    last = off
                    if lo <= off < hi:
                        seen += 1
                        bad = self._check(sample)
                        if bad:
                            self._error(path, key, bad)
                        else:
                            yield off, sample
                    if off >= hi - 1 and hi < n:
                        return  # the rest of the shard is another piece's
        except CorruptShardError:
            raise
        except Exception as exc:  # truncated tar, unreadable file, bad member names
            self._error(path, None, f"unreadable after {last + 1} samples: {type(exc).__name__}: {exc}")
            return
        if seen < hi - lo:
            self._error(path, None, f"{hi - lo - seen} indexed samples missing from the tar")

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
        pieces = self.worker_pieces(epoch, worker, nworkers)
        sizes = np.array([hi - lo for _, lo, hi in pieces], dtype=np.int64)
        bounds = np.concatenate([[0], np.cumsum(sizes)])  # input ordinal range of each piece
        rng = np.random.default_rng([self.seed, epoch, self.rank, worker])
        order = emission_order(int(bounds[-1]), self.shuffle_buffer, rng)
        remaining = order[start:]
        if len(remaining) == 0:
            return
        first_piece = int(np.searchsorted(bounds, remaining.min(), side="right") - 1)
        pending = set(remaining.tolist())
        held: dict[int, dict[str, Any]] = {}
        read_upto = int(bounds[first_piece])  # every ordinal below this has been read (or found missing)
        reader = self._ordinals(pieces, bounds, first_piece)
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
            yield self._output(sample, pieces, bounds, ordinal, epoch, worker, nworkers, index)

    def _ordinals(self, pieces: list[tuple[int, int, int]], bounds: np.ndarray,
                  first: int) -> Iterator[tuple[int | None, Any, int]]:
        """(ordinal, sample, read_upto) for each good sample, then (None, None, end) at each piece's end."""
        for i in range(first, len(pieces)):
            s, lo, hi = pieces[i]
            base = int(bounds[i]) - lo
            for off, sample in self._read_shard(s, lo, hi):
                yield base + off, sample, base + off + 1  # tar order: everything up to this one is read
            yield None, None, int(bounds[i + 1])

    def _output(self, sample, pieces, bounds, ordinal, epoch, worker, nworkers, index) -> dict[str, Any]:
        meta = sample["__meta__"]
        i = int(np.searchsorted(bounds, ordinal, side="right") - 1)
        image = self.decode(sample[meta["ext"]], meta["ext"])
        if self.transform is not None:
            image = self.transform(image)
        shard, start = pieces[i][0], pieces[i][1]
        out = {"image": image, "key": sample["__key__"], "shard": shard, "offset": int(start + ordinal - bounds[i]),
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
