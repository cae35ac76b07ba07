"""Running a stage's independent units of work through a pluggable executor.

A curation stage splits its input into units (ingest: batches of inputs; dedup: chunks of images to
describe; embed: output shards; retrieve: chunks of queries; shard: output tars). Each unit is a pure
function of its inputs, so where it runs does not change what it computes, and the stage assembles the
unit results in unit order: any executor gives the same output as the serial one.

The library never imports an orchestrator. A stage takes an optional `map_units` callable
(`map_units(fn, units) -> [fn(u) for u in units]`, results in order); the Prefect flows pass one that
submits every unit as a task on the configured task runner (threads, processes, Dask, Ray), see
flows/runners.py. `fn` is always a module-level function or a `functools.partial` of one, so it pickles
to other processes and machines; units write their files under the stage's work directory, which must
be on storage every worker sees.
"""

from __future__ import annotations

import multiprocessing
from typing import Any, Callable, Sequence, TypeVar

R = TypeVar("R")
MapUnits = Callable[[Callable[[Any], R], Sequence[Any]], list[R]]


def in_daemon_process() -> bool:
    """True inside a daemonic process (a Dask worker, a multiprocessing pool worker), which may not start
    child processes of its own: stages then decode in-process instead of in a worker pool."""
    return multiprocessing.current_process().daemon


def windows(units: Sequence[Any], size: int) -> list[Sequence[Any]]:
    """`units` cut into consecutive windows of at most `size`: bounds how much is in flight at once."""
    size = max(1, size)
    return [units[i:i + size] for i in range(0, len(units), size)]
