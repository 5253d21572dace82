"""Data-engine benchmark: loader throughput, the share of a training step spent waiting for data, and the peak
anonymous memory of each package's training run as the number of cases grows.

    python tests/bench_data_engine.py [--quick] [--work DIR]

- Loader: batches per second of an nnU-Net-style batch (2 patches of 4 x 128^3 read from the memory-mapped
  cache with the 205^3 initial patch, oversampling, nnU-Net's augmentation in the workers) with 0, 1 and 2
  worker processes.
- Waiting: a small UNet (mome's PlainUNet, widths 8-64) trains on such batches of 64^3; the share of each step
  spent in `next(batches)` with 0 and 1 workers.
- Memory: peak RssAnon of the process tree (private memory; the page cache of the memory maps is not counted)
  of a 2-step training run of every package on 6 and on 30 phantom cases of 4 x 128^3 (tiny models, 64^3
  patches: the data path is what is measured). The goal is no growth with the number of cases.
Timings on a shared machine are noisy; the rows of a table are measured side by side in one process.
"""

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the nnU-Net-style batch of the loader tests

from test_shared_loader import DrawForAugmentation  # noqa: E402

from mome.config import MoMEConfig  # noqa: E402
from mome.losses import deep_supervised_loss, deep_supervision_weights, downsample_target  # noqa: E402
from mome.model import build_expert  # noqa: E402
from shared.augment import PIPELINES, BatchAugmentation  # noqa: E402
from shared.cache import Preprocessing, build_cache  # noqa: E402
from shared.loader import training_batches  # noqa: E402
from shared.phantom import write_phantom_datasets  # noqa: E402
from shared.profiling import peak_tree_rss_anon  # noqa: E402


def make_data(work: Path, cases: int) -> Path:
    """Phantom tumour (4 channels) and anatomy datasets of `cases` cases at 128^3 (written once)."""
    out = work / f"phantoms_{cases}"
    if not (out / "Dataset906_PhantomAnatomy" / "dataset.json").is_file():
        write_phantom_datasets(out, datasets=["tumour", "anatomy"], cases=cases, shape=(128, 128, 128), seed=0)
    return out


def nnunet_batches(entries, patch, workers: int, steps: int):
    """The CPU batches of steps 0 .. steps (augmented in the workers, or in this process with 0 workers)."""
    augment = BatchAugmentation(PIPELINES["nnunet"], patch)
    draw = DrawForAugmentation(entries, tuple(patch))
    return training_batches(draw, seed=0, rank=0, start=0, stop=steps + 1, workers=workers,
                            device=torch.device("cpu"), augment=augment)  # fmt: skip


def loader_rate(entries, patch, workers: int, steps: int) -> float:
    """Batches per second over `steps` batches (after the first, which includes starting the workers)."""
    batches = nnunet_batches(entries, patch, workers, steps)
    next(batches)
    t0 = time.perf_counter()
    for _ in batches:
        pass
    return steps / (time.perf_counter() - t0)


def waiting_share(entries, workers: int, steps: int) -> tuple[float, float]:
    """(share of the step time spent waiting for data, seconds per step) of a small UNet on 64^3 patches."""
    torch.manual_seed(0)
    cfg = MoMEConfig(in_channels=4, features=(8, 16, 32, 64), strides=(1, 2, 2, 2))
    model = build_expert(cfg)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.99, nesterov=True)
    weights = deep_supervision_weights(cfg.num_levels)
    batches = nnunet_batches(entries, (64, 64, 64), workers, steps)
    waited, total = 0.0, 0.0
    for i in range(steps + 1):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        outputs = model(batch["image"])
        targets = downsample_target((batch["label"] > 0).long(), [o.shape[2:] for o in outputs])
        loss = deep_supervised_loss(outputs, targets, weights)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step starts the workers
            waited += t1 - t0
            total += time.perf_counter() - t0
    return waited / total, total / steps


def memory_commands(data: Path, out: Path) -> dict:
    """A 2-step training run of each package on the phantoms in `data` (tiny models, 64^3 patches)."""
    py = sys.executable
    tumour, anatomy = str(data / "Dataset901_PhantomTumour"), str(data / "Dataset906_PhantomAnatomy")
    cache = ["--cache", str(out / "cache")]
    return {
        "mome": [py, "-m", "mome.train_expert", "--data", tumour, "--modality", "FLAIR", "--epochs", "1",
                 "--steps-per-epoch", "2", "--patch", "64", "64", "64", "--features", "8", "16", "32", "64",
                 "--fold", "-1", "--out", str(out / "mome"), *cache],
        "moe_missing": [py, "-m", "moe_missing.train", "--data", tumour, "--steps", "2", "--patch", "64", "64", "64",
                        "--features", "8", "16", "32", "--fold", "-1", "--out", str(out / "moe_missing"), *cache],
        "brainsegfounder": [py, "-m", "brainsegfounder.finetune", "--data", tumour, "--channels", "T1", "T1ce", "T2",
                            "FLAIR", "--steps", "2", "--warmup", "0", "--patch", "64", "64", "64", "--feature-size",
                            "12", "--window-size", "4", "--fold", "-1", "--log-every", "2",
                            "--out", str(out / "brainsegfounder"), *cache],
        "sam_med3d_moe": [py, "-m", "sam_med3d_moe.train", "--data", anatomy, "--config", "tiny", "--steps", "2",
                          "--num-clicks", "2", "--fold", "-1", "--out", str(out / "sam_med3d_moe"), *cache],
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer batches and steps")
    parser.add_argument("--work", default=str(ROOT / "data" / "bench_data_engine"), help="data and run folder")
    args = parser.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    work = Path(args.work)
    print(f"writing the 128^3 phantoms into {work} (once) ...", flush=True)
    data = {n: make_data(work, n) for n in (6, 30)}
    prep = Preprocessing(normalise="zscore")
    entries = build_cache(data[6] / "Dataset901_PhantomTumour", prep, cache_root=work / "cache", progress=False)

    steps = 4 if args.quick else 10
    print(f"\nloader: batches/s, 2 x 4 x 128^3 patches with nnU-Net's augmentation ({steps} batches)")
    print("| workers | batches/s |\n|---|---|")
    for workers in (0, 1, 2):
        print(f"| {workers} | {loader_rate(entries, (128, 128, 128), workers, steps):.2f} |", flush=True)

    train_steps = 4 if args.quick else 12
    print(f"\nwaiting for data: small UNet (8-64), batch 2 x 64^3, {train_steps} steps")
    print("| workers | share of the step waiting | s per step |\n|---|---|---|")
    for workers in (0, 1):
        share, seconds = waiting_share(entries, workers, train_steps)
        print(f"| {workers} | {share:.0%} | {seconds:.2f} |", flush=True)

    print("\nmemory: peak RssAnon of a 2-step training run (process tree), 6 vs 30 cases of 4 x 128^3")
    print("| package | 6 cases MiB | 30 cases MiB | growth |\n|---|---|---|---|")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    for name in memory_commands(data[6], work).keys():
        peaks = []
        for n in (6, 30):
            out = work / f"runs_{n}"
            shutil.rmtree(out / name, ignore_errors=True)
            shutil.rmtree(out / "cache", ignore_errors=True)  # each run builds its cache: the worst case
            result = peak_tree_rss_anon(memory_commands(data[n], out)[name], env=env, cwd=str(ROOT))
            if result["returncode"] != 0:
                tail = result["output"].strip().splitlines()[-1:] or [""]
                raise SystemExit(f"{name} on {n} cases failed (exit {result['returncode']}): {tail[0]}")
            peaks.append(result["peak_mib"])
        print(f"| {name} | {peaks[0]:.0f} | {peaks[1]:.0f} | {peaks[1] / peaks[0] - 1:+.0%} |", flush=True)


if __name__ == "__main__":
    main()
