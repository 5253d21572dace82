"""Measuring helpers of the benchmarks (`bash run.sh bench`): activation memory kept for backward, and the
peak anonymous memory of a command's process tree."""

import subprocess
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch


def saved_tensor_bytes(fn: Callable) -> int:
    """Bytes of the distinct storages autograd saves for backward while `fn()` runs its forward.

    This is the activation memory of a training step, the part of peak memory that activation checkpointing
    removes; it is exact on any device (peak allocator statistics exist only on CUDA). Storages shared by
    several saved tensors (views, in-place results) count once.
    """
    storages = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    del out
    return sum(storages.values())


def _children(pid: int) -> list[int]:
    """Direct children of `pid` (every thread's list in /proc/PID/task/*/children)."""
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(c) for c in (task / "children").read_text().split()]
        except OSError:  # the task ended while we read
            continue
    return kids


def _rss_anon_kib(pid: int) -> int:
    """RssAnon of one process in KiB (0 once it has exited)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_anon_kib(pid: int) -> int:
    """RssAnon of `pid` and all its descendants, in KiB.

    RssAnon is the process's private memory (heap, tensors, numpy arrays); it leaves out file-backed pages,
    so the page cache of memory-mapped .npy files is not counted: it measures what a data path holds, not
    what the kernel caches for it.
    """
    total, todo = 0, [pid]
    while todo:
        current = todo.pop()
        total += _rss_anon_kib(current)
        todo += _children(current)
    return total


def peak_tree_rss_anon(command: Sequence[str], *, interval: float = 0.05, env=None, cwd=None) -> dict:
    """Run `command` and sample the RssAnon of its process tree every `interval` seconds (Linux /proc).

    Returns:
        {"returncode", "peak_mib" (largest sampled total), "seconds", "output" (stdout + stderr text)}.
    """
    start = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as log:  # a file, not a pipe: a full pipe would stall the command
        proc = subprocess.Popen(list(command), stdout=log, stderr=subprocess.STDOUT, env=env, cwd=cwd, text=True)
        peak = 0
        while proc.poll() is None:
            peak = max(peak, tree_rss_anon_kib(proc.pid))
            time.sleep(interval)
        log.seek(0)
        output = log.read()
    return {"returncode": proc.returncode, "peak_mib": peak / 1024, "seconds": time.perf_counter() - start,
            "output": output}  # fmt: skip
