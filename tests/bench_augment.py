"""Benchmark of shared.augment (batched) against batchgeneratorsv2 0.3.6 (per sample), nnU-Net v2's pipeline.

Run: .venv/bin/python tests/bench_augment.py [--quick]   (about 3.5 minutes on one CPU thread; --quick ~2)

Setting: one channel and a binary label, read region 205^3 (`initial_patch_size` of a 128^3 patch), output
128^3, one CPU thread (as in a DataLoader worker). Reported in ms per sample: ours at batch sizes 2 and 8, and
BGv2 one sample at a time as nnU-Net runs it (ComposeTransforms of RandomTransform-wrapped steps, its own
random draws), under nnU-Net's probabilities and with every probability 1 (MONAI's steps off; BGv2's
mirroring stays at 0.5 per axis, ours at 1, a negligible difference in cost). With nnU-Net's probabilities the
work per sample varies a lot (a rotated or scaled sample costs ~10x a cropped one), so BGv2 also runs with our
parameters injected ("same params"), the like-for-like comparison. All methods run in one process, interleaved
in each repeat; ours and "same params" process the same drawn parameters on the same read regions, every
repeat the same ones. The figure is the median over repeats (min-max beside it: the machine may be shared).
The max differences compare our output with BGv2's for the same parameters.
"""

import argparse
import importlib.util
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # so `import shared` works when run as a script
sys.path.insert(0, str(ROOT / "tests"))  # the BGv2 reference helpers live in the parity test

import dataclasses  # noqa: E402
from functools import partial  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from shared.augment import (  # noqa: E402
    PIPELINES,
    AugmentationPipeline,
    apply_augmentation,
    initial_patch_size,
    sample_params,
)
from shared.cli import run_cli  # noqa: E402

PATCH = (128, 128, 128)
EVERY_P_ONE = AugmentationPipeline(  # every nnU-Net step always (MONAI's scale and shift are not nnU-Net's)
    **{
        f.name: 1.0
        for f in dataclasses.fields(AugmentationPipeline)
        if f.name.startswith("p_") and "_intensity" not in f.name
    }
)


def make_data(batch, region, seed=0):
    """A smooth random image (B, 1, *region) and blob-shaped binary labels (B, *region), 10 % foreground."""
    from test_shared_augment_parity import smooth_volume

    image = smooth_volume((batch, 1, *region), seed=seed)
    field = smooth_volume((batch, *region), seed=seed + 1)
    threshold = torch.stack([f.flatten()[::7].quantile(0.9) for f in field])  # quantile() caps its input size
    return image, (field > threshold[:, None, None, None]).to(torch.int16)


def batch_params(params, start, stop):
    return {key: value[start:stop] for key, value in params.items()}


def run_ours(pipeline, params, batch, image, label, chunk=None):
    """All samples of `params` through ours in calls of `batch`; sample j reads image[j % 8]. Ours does not
    modify its inputs, so nothing needs preparing."""
    outputs = []
    for start in range(0, len(params["mirror"]), batch):
        first = start % len(image)
        region = image[first : first + batch], label[first : first + batch]
        part = batch_params(params, start, start + batch)
        outputs.append(apply_augmentation(*region, part, pipeline, PATCH, chunk=chunk))
    return outputs


def copies(image, label, n_samples):
    """Fresh (C, X, Y, Z) / (1, X, Y, Z) copies of samples j % 8, j < n_samples: BGv2 changes its inputs in place
    (its crop is a view), so each run gets its own, made before the clock starts as nnU-Net's loader hands them."""
    return [(image[j % len(image)].clone(), label[j % len(image)][None].clone()) for j in range(n_samples)]


def run_bgv2_compose(compose, inputs):
    np.random.seed(0)
    torch.manual_seed(0)
    for image, label in inputs:
        compose(image=image, segmentation=label)


def run_bgv2_same_params(bg, steps, params, inputs):
    """BGv2 one sample at a time with our parameters injected."""
    from test_shared_augment_parity import bgv2_apply_sample

    return [bgv2_apply_sample(bg, steps, *inputs[j], params, j) for j in range(len(inputs))]


def max_differences(ours, theirs):
    """Max |image difference| and number of differing labels between our batches and BGv2's samples."""
    our_images = torch.cat([image for image, _ in ours])
    our_labels = torch.cat([label for _, label in ours])
    image_diff = max((our_images[j] - ref).abs().max().item() for j, (ref, _) in enumerate(theirs))
    mismatched = sum(int((our_labels[j] != ref[0]).sum()) for j, (_, ref) in enumerate(theirs))
    return image_diff, mismatched, our_labels.numel()


def bench_setting(bg, name, pipeline, n_samples, repeats, image, label):
    """Time the four methods on one pipeline, interleaved over repeats, and print their rows."""
    from test_shared_augment_parity import nnunet_compose, nnunet_transforms

    steps = nnunet_transforms(bg, PATCH)
    compose = nnunet_compose(bg, PATCH, every_p_one=pipeline is EVERY_P_ONE)
    run_bgv2_compose(compose, copies(image, label, 2))  # BGv2's blur picks conv or FFT on first use
    params = sample_params(pipeline, n_samples, 1, np.random.default_rng(1))

    def fresh_copies():
        return (copies(image, label, n_samples),)

    # method: (untimed preparation returning the run's arguments, timed run)
    methods = {
        "ours B=2": (tuple, partial(run_ours, pipeline, params, 2, image, label)),
        "ours B=8": (tuple, partial(run_ours, pipeline, params, 8, image, label)),
        "ours B=8 one chunk": (tuple, partial(run_ours, pipeline, params, 8, image, label, chunk=8)),
        "BGv2 per sample": (fresh_copies, partial(run_bgv2_compose, compose)),
        "BGv2 same params": (fresh_copies, partial(run_bgv2_same_params, bg, steps, params)),
    }
    times = {method: [] for method in methods}
    results = {}
    for r in range(repeats):
        order = list(methods)[r % len(methods) :] + list(methods)[: r % len(methods)]
        for method in order:
            prepare, run = methods[method]
            arguments = prepare()
            start = time.perf_counter()
            results[method] = run(*arguments)
            times[method].append((time.perf_counter() - start) * 1000 / n_samples)
    ms = {method: statistics.median(t) for method, t in times.items()}
    resampled = int((params["rotation"] | params["scaling"]).sum())
    print(f"{name}: {n_samples} samples, {resampled} of them rotated or scaled")
    for method, value in ms.items():
        ratio = f"{value / ms['BGv2 same params']:.2f}" if method.startswith("ours") else ""
        spread = f"{min(times[method]):.0f}-{max(times[method]):.0f}"
        print(f"{name:<12} {method:<18} {value:>10.0f} {spread:>12} {ratio:>10}")
    image_diff, mismatched, total = max_differences(results["ours B=2"], results["BGv2 same params"])
    print(f"{name:<12} same params: max |image diff| {image_diff:.2e}, labels differing {mismatched} of {total}")
    own = [ms[f"ours B={b}"] / ms["BGv2 per sample"] for b in (2, 8)]  # the default chunking
    print(f"{name:<12} ours / BGv2 per sample (its own draws): B=2 {own[0]:.2f}, B=8 {own[1]:.2f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 repeats and fewer samples (about a minute)")
    parser.add_argument("--repeats", type=int, default=None, help="repeats per setting (default 3, quick 2)")
    args = parser.parse_args()
    if importlib.util.find_spec("batchgeneratorsv2") is None:
        print("batchgeneratorsv2 is not installed (requirements-dev.txt): nothing to compare with, skipped")
        return
    from test_shared_augment_parity import import_bgv2

    torch.set_num_threads(1)
    repeats = args.repeats or (2 if args.quick else 3)
    bg = import_bgv2()
    region = initial_patch_size(PATCH, PIPELINES["nnunet"])
    image, label = make_data(8, region)
    unique = "pandas" if "pandas" in sys.modules else "np.unique standing in for pandas"
    print(f"read region {region}, patch {PATCH}, 1 channel, binary label, {torch.get_num_threads()} torch thread,")
    print(f"{repeats} repeats; BGv2's label unique: {unique}. ours/BGv2 = ours over 'BGv2 same params'.")
    print(f"{'setting':<12} {'method':<18} {'ms/sample':>10} {'min-max':>12} {'ours/BGv2':>10}")
    print("(ours runs a CPU batch sample by sample; 'one chunk' forces the whole batch through each step at once)")
    bench_setting(bg, "nnU-Net p", PIPELINES["nnunet"], 16 if args.quick else 32, repeats, image, label)
    bench_setting(bg, "every p = 1", EVERY_P_ONE, 8, repeats, image, label)


if __name__ == "__main__":
    run_cli(main)
