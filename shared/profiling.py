"""Measuring helpers of the benchmarks (`bash run.sh bench`): activation memory kept for backward."""

from collections.abc import Callable

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
