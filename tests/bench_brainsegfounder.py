"""Benchmark: our SwinUNETR vs MONAI's on the same weights and input (CPU), with and without activation
checkpointing; and the memory of fine-tuning on 6 vs 30 cases.

    .venv/bin/python tests/bench_brainsegfounder.py [--size 64] [--repeats 1] [--no-memory]

1. Forward + backward wall time (median over repeats after one forward as warm-up, the configurations
   interleaved in one process; a few minutes on 2 cores) and the activation memory kept for backward (bytes of
   the distinct tensors autograd saves during the forward, the part of peak memory that checkpointing removes).
   Goal: ours at most as slow as MONAI.
2. Peak anonymous memory (RssAnon, which leaves out the memory-mapped cache pages) of the process tree of a
   2-step `brainsegfounder.finetune` run (1 loader worker, validation off) on 6 and on 30 phantom cases of
   4 x 128^3, the two runs side by side in this process. Goal of the data engine: no growth with the cases
   (the in-RAM design it replaced held 4 x 128^3 float32 = 32 MiB per case).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from brainsegfounder.model import SwinUNETR
from shared.profiling import saved_tensor_bytes


def step_seconds(model, x) -> float:
    """Wall time of one forward + backward."""
    t0 = time.perf_counter()
    model(x).float().square().mean().backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - t0


def monai_models(feature_size: int):
    """MONAI's SwinUNETR without and with checkpointing, or {} when MONAI is not installed."""
    try:
        import monai.networks.nets.swin_unetr as swin_unetr
    except ImportError:
        return {}

    def rearrange(x, pattern):  # einops is not a dependency; MONAI only permutes axes with it
        src, dst = (side.split() for side in pattern.split("->"))
        return x.permute(*[src.index(axis) for axis in dst])

    swin_unetr.rearrange = rearrange
    return {
        f"MONAI{' + ckpt' * ckpt}": swin_unetr.SwinUNETR(
            in_channels=4, out_channels=3, feature_size=feature_size, use_checkpoint=ckpt
        )  # fmt: skip
        for ckpt in (False, True)
    }


def _tree_rss_anon_kib(pid: int) -> int:
    """RssAnon of a process and all its descendants, KiB (0 for processes that ended meanwhile)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            status = Path(f"/proc/{p}/status").read_text()
            total += int(next(line.split()[1] for line in status.splitlines() if line.startswith("RssAnon:")))
            for task in Path(f"/proc/{p}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
        except (OSError, StopIteration, ValueError):
            continue
    return total


def peak_memory_mib(argv: list, env: dict) -> float:
    """Peak RssAnon (MiB) of the process tree of `python -m brainsegfounder.finetune argv`, sampled every 20 ms."""
    child = subprocess.Popen([sys.executable, "-m", "brainsegfounder.finetune", *argv], env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip
    peak = 0
    while child.poll() is None:
        peak = max(peak, _tree_rss_anon_kib(child.pid))
        time.sleep(0.02)
    if child.returncode != 0:
        raise SystemExit(f"finetune failed: {child.stderr.read().decode()[-500:]}")
    return peak / 1024


def memory_table() -> None:
    from shared.phantom import write_phantom_datasets

    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "BRAINSEG_CACHE": str(Path(tmp) / "cache")}
        rows = []
        for n in (6, 30):
            data = write_phantom_datasets(Path(tmp) / f"n{n}", datasets=["tumour"], cases=n, shape=(128, 128, 128),
                                          seed=0)[0]  # fmt: skip
            run = ["--data", str(data), "--channels", "T1", "T1ce", "T2", "FLAIR", "--patch", "64", "64", "64",
                   "--batch-size", "2", "--steps", "2", "--warmup", "0", "--fold", "-1", "--feature-size", "12",
                   "--window-size", "4", "--device", "cpu", "--workers", "1", "--log-every", "1"]  # fmt: skip
            peak_memory_mib([*run, "--out", str(Path(tmp) / f"build{n}")], env)  # builds the cache first
            rows.append((n, peak_memory_mib([*run, "--out", str(Path(tmp) / f"run{n}")], env)))
    print("\nfine-tuning, 2 steps, 1 worker, cases of 4 x 128^3 (cache built beforehand)")
    print(f"{'cases':>6} {'peak RssAnon MiB':>17} {'vs 6 cases':>11}")
    for n, mib in rows:
        print(f"{n:>6} {mib:>17.0f} {mib / rows[0][1]:>11.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="cubic input side (multiple of 32, >= 64)")
    parser.add_argument("--feature-size", type=int, default=48, help="SwinUNETR feature size (paper: 48)")
    parser.add_argument("--repeats", type=int, default=1, help="timed repeats per configuration")
    parser.add_argument("--memory", action=argparse.BooleanOptionalAction, default=True,
                        help="also measure the fine-tuning memory on 6 vs 30 cases (about 3 minutes)")  # fmt: skip
    args = parser.parse_args()
    torch.manual_seed(0)
    models = monai_models(args.feature_size)
    reference = next(iter(models.values()), None)
    for ckpt in (False, True):
        ours = SwinUNETR(4, 3, feature_size=args.feature_size, use_checkpoint=ckpt)
        if reference is not None:
            ours.load_state_dict(reference.state_dict(), strict=True)
        models[f"ours{' + ckpt' * ckpt}"] = ours
    for model in models.values():
        model.load_state_dict(next(iter(models.values())).state_dict())
        model.train()
    x = torch.randn(1, 4, args.size, args.size, args.size)
    memory = {
        name: saved_tensor_bytes(lambda m=model: m(x).float().square().mean()) for name, model in models.items()
    }  # doubles as warm-up
    times = {name: [] for name in models}
    for _ in range(args.repeats):  # interleaved, so load changes hit every configuration alike
        for name, model in models.items():
            times[name].append(step_seconds(model, x))
    base = "MONAI" if "MONAI" in models else "ours"
    base_time = statistics.median(times[base])
    print(f"SwinUNETR fs={args.feature_size}, input 1x4x{args.size}^3, CPU {torch.get_num_threads()} threads, "
          f"median of {args.repeats}")  # fmt: skip
    print(f"{'model':>14} {'fwd+bwd s':>10} {'vs ' + base:>10} {'saved MB':>10}")
    for name in models:
        t = statistics.median(times[name])
        print(f"{name:>14} {t:>10.2f} {t / base_time:>10.2f} {memory[name] / 2**20:>10.0f}")
    if args.memory:
        memory_table()


if __name__ == "__main__":
    main()
