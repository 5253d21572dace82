"""Activation-memory counter of the benchmarks; run: .venv/bin/python -m pytest -q tests/test_shared_profiling.py"""

import torch

from shared.profiling import saved_tensor_bytes


def test_saved_tensor_bytes_counts_each_saved_storage_once():
    x = torch.randn(10, 3, requires_grad=True)  # 30 float32 = 120 bytes
    w = torch.randn(10, 3, requires_grad=True)
    # x * w saves both factors for backward: 240 bytes; sum saves nothing
    assert saved_tensor_bytes(lambda: (x * w).sum()) == 240
    # x * x saves the same storage twice: counted once
    assert saved_tensor_bytes(lambda: (x * x).sum()) == 120
    # exp saves its 120-byte output; the product saves x and that output again
    assert saved_tensor_bytes(lambda: (x.exp() * x).sum()) == 240
    with torch.no_grad():
        assert saved_tensor_bytes(lambda: (x * w).sum()) == 0
