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


def test_peak_tree_rss_anon_counts_descendants_but_not_memory_mapped_files(tmp_path):
    import sys

    import numpy as np

    from shared.profiling import peak_tree_rss_anon

    # a grandchild holds 120 MiB of private memory for a moment
    hold = "import time; b = bytearray(120 * 2**20); b[::4096] = b'x' * len(b[::4096]); time.sleep(0.6)"
    spawn = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {hold!r}])"
    result = peak_tree_rss_anon([sys.executable, "-c", spawn], interval=0.02)
    assert result["returncode"] == 0 and result["peak_mib"] > 115

    # reading a 120 MiB .npy through a memory map touches every page but adds no anonymous memory
    path = tmp_path / "big.npy"
    np.save(path, np.ones(30 * 2**20, dtype=np.float32))
    read = (
        f"import numpy as np, time; a = np.load({str(path)!r}, mmap_mode='r'); print(float(a.sum())); time.sleep(0.4)"
    )
    mapped = peak_tree_rss_anon([sys.executable, "-c", read], interval=0.02)
    assert mapped["returncode"] == 0 and float(mapped["output"]) == 30 * 2**20
    assert mapped["peak_mib"] < 80  # numpy itself, far from the 120 MiB read through the map
