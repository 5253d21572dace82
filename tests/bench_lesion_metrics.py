"""Time case_metrics and the lesion-wise part alone on a MoME-sized mask (160x196x160, 200 lesions).

Run: .venv/bin/python tests/bench_lesion_metrics.py [--repeats 3] [--seed 0]
"""

import argparse
import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shared.lesion_metrics import lesion_counts  # noqa: E402
from shared.metrics import case_metrics  # noqa: E402

SHAPE = (160, 196, 160)  # MoME's cropped MNI grid at 1 mm


def add_balls(mask: np.ndarray, n: int, rng: np.random.Generator) -> None:
    """Set `n` balls of radius 1-6 voxels at random centres (in place); nearby balls may merge."""
    for _ in range(n):
        radius = int(rng.integers(1, 7))
        centre = [int(rng.integers(radius, s - radius)) for s in mask.shape]
        box = tuple(slice(c - radius, c + radius + 1) for c in centre)
        offsets = np.mgrid[-radius : radius + 1, -radius : radius + 1, -radius : radius + 1]  # (3, 2r+1, 2r+1, 2r+1)
        mask[box] |= (offsets**2).sum(axis=0) <= radius**2


def make_pair(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """gt with 200 random lesions; pred = gt with 10% of lesions dropped, 20 false lesions and shifted borders."""
    rng = np.random.default_rng(seed)
    gt = np.zeros(SHAPE, dtype=bool)
    add_balls(gt, n=200, rng=rng)
    labels, n = ndimage.label(gt, structure=np.ones((3, 3, 3), dtype=bool))
    dropped = rng.choice(np.arange(1, n + 1), size=n // 10, replace=False)
    pred = gt & ~np.isin(labels, dropped)
    pred = np.roll(pred, shift=1, axis=0)  # a one-voxel misregistration changes every border
    add_balls(pred, n=20, rng=rng)
    return pred, gt


def best_time(fn, repeats: int) -> float:
    """Fastest of `repeats` wall-clock runs of fn(), in seconds (least disturbed by other load)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per row; the fastest is reported")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random lesions")
    args = parser.parse_args()

    pred, gt = make_pair(args.seed)
    print(f"mask {SHAPE}, gt {int(gt.sum())} voxels, pred {int(pred.sum())} voxels")
    print(
        f"{'connectivity':>12}  {'gt lesions':>10}  {'pred lesions':>12}  {'lesion part s':>13}  {'case_metrics s':>14}"
    )
    for connectivity in (6, 18, 26):
        counts = lesion_counts(pred, gt, connectivity=connectivity)
        lesion_s = best_time(lambda c=connectivity: lesion_counts(pred, gt, connectivity=c), args.repeats)
        case_s = best_time(lambda c=connectivity: case_metrics(pred, gt, connectivity=c), args.repeats)
        print(f"{connectivity:>12}  {counts.n_gt:>10}  {counts.n_pred:>12}  {lesion_s:>13.3f}  {case_s:>14.3f}")


if __name__ == "__main__":
    main()
