"""Training batches from a resumable sample stream: decode, multi-crop, mask, collate.

The stream is any iterable of images with `state_dict()` / `load_state_dict()` (shards.reader's
ShardDataset in training; tests use small in-memory ones). It is iterated in the training process itself,
in order, and the position saved with a checkpoint is exactly the samples of the batches handed to
training; that is what makes kill-and-resume reproduce the uninterrupted run.

Every batch's randomness (crops, colour, blur, masks) is drawn under a seed derived from (run seed,
iteration, rank), so a batch is a function of its samples and its iteration alone: `make_batch` gives the
same tensors in any process. With `workers` > 0, processes decode and augment the next batches while the
model trains: one process makes ~25-30 images/s of 2 + 8 crops from 500x375 JPEGs, against the ~145 images/s
of a ViT-L/14 step on one H100; the training process only reads samples and hands them out.
"""

from __future__ import annotations

import collections
import copy
import io
import os
from concurrent.futures import Future, ProcessPoolExecutor
from typing import Any

import numpy as np
import torch
from PIL import Image

from lvdflow.errors import UserError
from pretrain.masking import MaskingGenerator, collate_crops

_IMAGE_KEYS = ("image", "img", "jpg", "jpeg", "png", "webp", "ppm", "bmp", "tif", "tiff")


def to_pil(sample: Any) -> Image.Image:
    """An RGB PIL image from what a stream yields: PIL image, encoded bytes, uint8 CHW tensor, or a dict /
    tuple holding one (WebDataset samples are dicts keyed by extension)."""
    if isinstance(sample, Image.Image):
        return sample if sample.mode == "RGB" else sample.convert("RGB")
    if isinstance(sample, (bytes, bytearray, memoryview)):
        from curation.decode import DecodeError, decode_rgb

        try:
            return decode_rgb(bytes(sample))
        except DecodeError as exc:  # shards hold ingested (decodable) images: this one was damaged since
            raise UserError(f"a training sample cannot be decoded ({exc}); rebuild the shards") from exc
    if isinstance(sample, torch.Tensor):
        from torchvision.transforms.v2.functional import to_pil_image

        return to_pil_image(sample).convert("RGB")
    if isinstance(sample, dict):
        for key in _IMAGE_KEYS:
            if key in sample:
                return to_pil(sample[key])
        for key, value in sample.items():  # e.g. "0.jpg" or "image.png" style keys
            if isinstance(key, str) and key.rsplit(".", 1)[-1].lower() in _IMAGE_KEYS:
                return to_pil(value)
        raise UserError(f"sample has no image field (keys: {sorted(sample)[:8]})")
    if isinstance(sample, (tuple, list)) and sample:
        return to_pil(sample[0])
    if isinstance(sample, io.IOBase):
        return to_pil(sample.read())
    raise UserError(f"cannot read an image from a {type(sample).__name__} sample")


class ShardStream:
    """Adapter from shards.reader.ShardDataset to the stream protocol of BatchStream.

    Samples are marked consumed (`record`) as they are drawn, so the position saved with a checkpoint is
    exactly the samples that went into trained batches; at the end of an epoch the next one starts. The
    reader splits each epoch by sample, the same count to every rank (its `drop_remainder`), so ranks that
    draw equal batches go through their epochs in step and no epoch needs cutting short here.
    """

    def __init__(self, dataset):
        self.dataset = dataset

    def __iter__(self):
        for sample in self.dataset:
            self.dataset.record(sample)
            yield sample["image"]
        self.dataset.set_epoch(self.dataset.epoch + 1)

    def state_dict(self) -> dict:
        return self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.dataset.load_state_dict(state)

    def start_after_epoch(self, epoch: int) -> None:
        """Resume on another process count: positions do not translate, so start the next epoch."""
        self.dataset.set_epoch(int(epoch) + 1)


def batch_seed(seed: int, iteration: int, rank: int) -> int:
    # Distinct, reproducible per (seed, iteration, rank); SeedSequence mixes the three well.
    return int(np.random.SeedSequence([seed, iteration, rank]).generate_state(1, dtype=np.uint64)[0] >> 1)


def make_batch(samples: list, seed: int, augmentation, patch_size: int, mask_probability: float,
               mask_ratio: tuple[float, float]) -> dict:
    """One collated batch: every random draw under `seed`, so the result does not depend on the process."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        crops = [augmentation(to_pil(s)) for s in samples]
    grid = augmentation.global_crops_size // patch_size
    n_tokens = grid * grid
    generator = MaskingGenerator((grid, grid), max_num_patches=0.5 * n_tokens)
    return collate_crops(crops, n_tokens=n_tokens, mask_generator=generator, rng=np.random.default_rng(seed),
                         mask_ratio=mask_ratio, mask_probability=mask_probability)


def _worker_init() -> None:
    torch.set_num_threads(1)  # the workers run side by side: one thread each


def auto_workers() -> int:
    """Data processes when a config leaves it to the trainer: none on CPU (the model's own threads use the
    cores); on a GPU this rank's share of the CPUs (torchrun's local ranks split them) less one for the
    training process. One worker makes ~25 images/s of DINOv2 crops (bench/results/pretrain_data.json) while
    one H100 trains ViT-L/14 on ~145 images/s: a GPU needs all the cores it can get."""
    if not torch.cuda.is_available():
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    local_ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(1, cpus // local_ranks - 1)


def data_workers(configured: int) -> int:
    """The batch-making processes for a config's `data_workers` (-1: `auto_workers()`); none where a
    daemonic process could not start them."""
    from lvdflow.parts import in_daemon_process

    workers = auto_workers() if configured < 0 else configured
    if workers and in_daemon_process():
        if configured > 0:
            print(f"data_workers={configured} ignored: a daemonic process (a Dask worker) cannot start "
                  "processes; batches are made in the training process", flush=True)
        return 0
    return workers


class _Job:
    """A batch being made: its samples (kept, to remake it with another augmentation), the stream's state
    after them, and the worker's future."""

    def __init__(self, iteration: int, samples: list, state_after: dict, augmentation, future: Future):
        self.iteration, self.samples, self.state_after = iteration, samples, state_after
        self.augmentation, self.future = augmentation, future


class BatchStream:
    """Batches of `batch_size` samples of `dataset`, made in this process or by `workers` processes that
    keep `prefetch` batches each in the making (one job per batch: with fewer jobs than workers, workers
    would idle). The result is the same either way, bitwise; so is a resume."""

    def __init__(self, dataset, *, batch_size: int, seed: int, rank: int, mask_probability: float = 0.5,
                 mask_ratio: tuple[float, float] = (0.1, 0.5), workers: int = 0, prefetch: int = 2):
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self.mask_probability = mask_probability
        self.mask_ratio = tuple(mask_ratio)
        self.workers = workers
        self.ahead = max(1, prefetch) * max(1, workers)  # batches being made beyond the one asked for
        self._iter = None
        self._pool: ProcessPoolExecutor | None = None
        self._jobs: collections.deque[_Job] = collections.deque()
        self._state: dict | None = None  # the stream's state after the last batch handed out, when read ahead

    def state_dict(self) -> dict:
        return copy.deepcopy(self._state) if self._state is not None else self.dataset.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self._drop_jobs()
        self.dataset.load_state_dict(state)
        self._iter = None

    def start_after_epoch(self, epoch: int) -> None:
        self._drop_jobs()
        if hasattr(self.dataset, "start_after_epoch"):
            self.dataset.start_after_epoch(epoch)
        self._iter = None

    def close(self) -> None:
        """Stop the worker processes. Batches read ahead are dropped and the stream rewound to the last batch
        handed out, so a later `next_batch` (which starts new workers) or `state_dict` continues from there."""
        self._drop_jobs()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None

    def _next_sample(self):
        for attempt in range(2):
            if self._iter is None:
                self._iter = iter(self.dataset)
            try:
                return next(self._iter)
            except StopIteration:
                self._iter = None  # end of an epoch: the stream starts its next one
        raise UserError("the training stream yielded no samples (empty or fully filtered shards?)")

    def next_batch(self, iteration: int, augmentation, patch_size: int) -> dict:
        if self.workers <= 0:
            samples = [self._next_sample() for _ in range(self.batch_size)]
            return make_batch(samples, batch_seed(self.seed, iteration, self.rank), augmentation, patch_size,
                              self.mask_probability, self.mask_ratio)
        if self._jobs and self._jobs[0].iteration != iteration:  # not the next batch: the read-ahead is void
            self._drop_jobs()
        if self._state is None:  # where to rewind to if the read-ahead is dropped before a batch is handed out
            self._state = copy.deepcopy(self.dataset.state_dict())
        if self._jobs and self._jobs[0].augmentation is not augmentation:
            # The crops changed (the high-resolution phase began): every batch read ahead is remade from the
            # same samples, all at once so the workers share the work.
            for job in self._jobs:
                job.future.cancel()
            self._jobs = collections.deque(self._submit(job.iteration, (job.samples, job.state_after), augmentation,
                                                        patch_size) for job in self._jobs)
        while len(self._jobs) < self.ahead + 1:
            ahead = self._jobs[-1].iteration + 1 if self._jobs else iteration
            self._jobs.append(self._submit(ahead, self._draw(), augmentation, patch_size))
        job = self._jobs.popleft()
        batch = job.future.result()
        self._state = job.state_after
        return batch

    # ---- read-ahead -----------------------------------------------------------------------------------
    def _draw(self) -> tuple[list, dict]:
        samples = [self._next_sample() for _ in range(self.batch_size)]
        return samples, copy.deepcopy(self.dataset.state_dict())

    def _submit(self, iteration: int, drawn: tuple[list, dict], augmentation, patch_size: int) -> _Job:
        if self._pool is None:
            import torch.multiprocessing as mp  # its pickler moves the workers' tensors through shared memory

            # spawn, not fork: the training process may hold CUDA, OpenMP and Prefect's threads.
            self._pool = ProcessPoolExecutor(self.workers, mp_context=mp.get_context("spawn"),
                                             initializer=_worker_init)
        samples, state_after = drawn
        future = self._pool.submit(make_batch, samples, batch_seed(self.seed, iteration, self.rank), augmentation,
                                   patch_size, self.mask_probability, self.mask_ratio)
        return _Job(iteration, samples, state_after, augmentation, future)

    def _drop_jobs(self) -> None:
        """Forget the batches read ahead and rewind the stream to the last batch handed out."""
        if not self._jobs and self._state is None:
            return
        for job in self._jobs:
            job.future.cancel()
        self._jobs.clear()
        if self._state is not None:
            self.dataset.load_state_dict(self._state)
            self._state = None
        self._iter = None
