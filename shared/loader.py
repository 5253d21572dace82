"""Background loading of training batches: the batch of step t is a pure function of (seed, rank, t).

A method writes a `draw(rng) -> dict` that builds one whole batch (which cases, where the patches start, the
augmentation parameters) from a numpy Generator, and reads the patches from the memory-mapped cache.
`training_batches` runs it for the steps [start, stop) in `torch.utils.data.DataLoader` worker processes,
seeding each step's Generator from (seed, rank, step) alone. So the batches do not depend on the number of
workers (up to float rounding from thread counts), and `--resume` at step t continues bit-identically
without saving any loader state.

The augmentation runs where it is cheapest: on CPU inside the workers; on CUDA on the GPU, batched, after a
pinned, non-blocking copy that overlaps the previous step (nnU-Net runs it per sample in CPU workers and its
GPUs wait for them).
"""

import os
from collections.abc import Callable, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from shared.cli import non_negative_int
from shared.errors import InputError


def add_loader_args(group) -> None:
    """Add --workers and --cache (every training CLI) to a parser or argument group."""
    group.add_argument(
        "--workers",
        type=non_negative_int,
        default=None,
        help="loader processes (default: up to 8 on CUDA, 1 on CPU; 0: no workers)",
    )
    group.add_argument(
        "--cache", default=None, help="root of the preprocessed caches (default: $BRAINSEG_CACHE, else data/cache)"
    )


def step_rng(seed: int, rank: int, step: int) -> np.random.Generator:
    """The Generator of one training step: seeded from (seed, rank, step) only."""
    if min(seed, rank, step) < 0:
        raise InputError(f"seed, rank and step must be non-negative, got {seed}, {rank}, {step}.")
    return np.random.default_rng([int(seed), int(rank), int(step)])


def default_workers(device: torch.device) -> int:
    """Loader processes when `--workers` is not given: on CUDA up to 8, leaving one core for the main process
    (shared by the GPUs of this node); on CPU one, which overlaps reading and augmentation with compute."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if device.type == "cuda":
        per_gpu = max(1, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1"))))
        return max(1, min(8, per_gpu - 1))
    return 1 if cpus > 1 else 0


class StepBatches(Dataset):
    """Map-style dataset whose item `t` is the whole batch of training step `t` (use with `batch_size=None`)."""

    def __init__(self, draw: Callable[[np.random.Generator], dict], *, seed: int, rank: int = 0, augment=None):
        """Args:
        draw: builds one batch (a dict of tensors and plain values) from a Generator; must hold no open state
            that breaks in a forked worker (paths and small index arrays are fine).
        seed, rank: the run's seed and this process's rank.
        augment: None, or a function batch -> batch applied here (CPU training: inside the worker).
        """
        self.draw, self.seed, self.rank, self.augment = draw, int(seed), int(rank), augment

    def __getitem__(self, step: int) -> dict:
        batch = self.draw(step_rng(self.seed, self.rank, int(step)))
        batch["step"] = int(step)
        return self.augment(batch) if self.augment is not None else batch


def _worker_init(_worker_id: int) -> None:
    # one thread per worker: the workers already run in parallel, and the main process needs its cores
    torch.set_num_threads(1)


def _to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def training_batches(
    draw: Callable[[np.random.Generator], dict],
    *,
    seed: int,
    rank: int,
    start: int,
    stop: int,
    workers: int,
    device: torch.device,
    augment: Callable[[dict], dict] | None = None,
    prefetch: int = 2,
) -> Iterator[dict]:
    """Yield the batches of steps start .. stop-1 on `device`, augmented.

    Args:
        draw: see `StepBatches`.
        seed, rank: the run's seed and this process's rank (each rank draws its own batches).
        start, stop: the step range of this call (a resumed run starts at its checkpoint's step).
        workers: loader processes; 0 builds every batch in this process.
        device: where the batches go; on CUDA the memory is pinned, copies are non-blocking on a side stream
            one step ahead, and `augment` runs on the GPU after the copy.
        augment: batch -> batch (the method's augmentation), or None.
        prefetch: batches each worker keeps ready.
    """
    if workers < 0:
        raise InputError(f"--workers must be at least 0, got {workers}.")
    on_gpu = device.type == "cuda"
    dataset = StepBatches(draw, seed=seed, rank=rank, augment=None if on_gpu else augment)
    loader = DataLoader(
        dataset,
        batch_size=None,
        sampler=range(start, stop),
        num_workers=workers,
        pin_memory=on_gpu,
        prefetch_factor=prefetch if workers > 0 else None,
        worker_init_fn=_worker_init if workers > 0 else None,
        multiprocessing_context="fork" if workers > 0 else None,
    )
    if not on_gpu:
        yield from loader
        return
    copy_stream = torch.cuda.Stream(device)
    pending = None
    for batch in loader:
        with torch.cuda.stream(copy_stream):
            moved = _to_device(batch, device)
        if pending is not None:
            yield _ready(pending, copy_stream, augment)
        pending = moved
    if pending is not None:
        yield _ready(pending, copy_stream, augment)


def _ready(batch: dict, copy_stream, augment) -> dict:
    """Wait for the side-stream copy of `batch`, tell the allocator the compute stream uses it, augment it."""
    current = torch.cuda.current_stream()
    current.wait_stream(copy_stream)
    for value in batch.values():
        if torch.is_tensor(value):
            value.record_stream(current)
    return augment(batch) if augment is not None else batch
