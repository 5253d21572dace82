"""The benchmark scripts of `bash run.sh bench` are not run by the suite (they take minutes); this keeps them
importable, so a moved or renamed function breaks a test and not only the next benchmark run."""

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHES = sorted(Path(__file__).parent.glob("bench_*.py"))


def test_there_are_benchmarks():
    assert len(BENCHES) >= 8


@pytest.mark.parametrize("path", BENCHES, ids=lambda p: p.name)
def test_benchmark_script_imports(path, monkeypatch):
    monkeypatch.syspath_prepend(str(path.parent))
    spec = importlib.util.spec_from_file_location(f"_bench_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)  # top-level imports and definitions only: main() is behind __name__
    assert callable(getattr(module, "main", None))
