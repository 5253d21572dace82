"""Augmentations of the self-supervised pretraining (Tang et al. 2022, as in the official `utils/ops.py`).

Two views per crop: each is rotated by a random multiple of 90 degrees (the rotation label), then an inner
cutout fills random boxes with noise, and with probability (N-1)/N an outer cutout pastes boxes of another
crop of the batch. Every random quantity (rotations, boxes, partners and the noise) comes from one numpy
Generator, so the views of a training step are a function of that step's Generator alone.
"""

import numpy as np
import torch


def rotate_views(x: torch.Tensor, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate each sample by k * 90 degrees, k ~ U{0..3}, in the plane of the last two array axes (no reorientation).

    Args:
        x: (B, C, D, H, W) with H == W.
        rng: draws the B rotation labels.
    Returns:
        rotated (B, C, D, H, W), labels (B,) int64 = k.
    """
    labels = rng.integers(0, 4, size=x.shape[0])
    rotated = torch.stack([torch.rot90(sample, k=int(k), dims=(2, 3)) for sample, k in zip(x, labels)])
    return rotated, torch.as_tensor(labels, dtype=torch.long, device=x.device)


def cutout_boxes(shape, rng, max_fraction: float = 0.3, max_side: float = 0.25, min_side: float = 0.05) -> list:
    """Random boxes until their summed volume reaches U(0, max_fraction) of the volume (overlaps counted twice).

    Per axis of size S: start ~ U{0 .. S - lo - 1}, side ~ U{lo .. hi - 1}, end = min(start + side, S), with
    lo = int(min_side S), hi = int(max_side S) (numpy `integers`, high exclusive, as the official `randint`).
    For S < 20 we raise lo to 1 and hi to lo + 1, so boxes are never empty and the loop always ends.

    Args:
        shape: (D, H, W).
        rng: numpy Generator (or anything with `uniform()` and `integers(low, high)`).
    Returns:
        list of ((d0, d1), (h0, h1), (w0, w1)) half-open boxes.
    """
    target = rng.uniform(0, max_fraction) * float(np.prod(shape))
    low = [max(1, int(min_side * s)) for s in shape]
    high = [max(lo + 1, int(max_side * s)) for lo, s in zip(low, shape)]
    boxes, total = [], 0
    while total < target:
        starts = [int(rng.integers(0, s - lo)) for s, lo in zip(shape, low)]
        ends = [min(int(rng.integers(lo, hi)) + st, s) for st, lo, hi, s in zip(starts, low, high, shape)]
        boxes.append(tuple(zip(starts, ends)))
        total += int(np.prod([e - st for st, e in zip(starts, ends)]))
    return boxes


def inner_cutout(x: torch.Tensor, boxes, rng: np.random.Generator) -> torch.Tensor:
    """Fill each box of a (C, D, H, W) volume with Gaussian noise min-max scaled to [0, 1] (a new tensor)."""
    x = x.clone()
    for (d0, d1), (h0, h1), (w0, w1) in boxes:
        noise = torch.from_numpy(rng.standard_normal((x.shape[0], d1 - d0, h1 - h0, w1 - w0), dtype=np.float32))
        noise = noise.to(device=x.device, dtype=x.dtype)
        x[:, d0:d1, h0:h1, w0:w1] = (noise - noise.min()) / (noise.max() - noise.min()).clamp_min(1e-12)
    return x


def outer_cutout(x: torch.Tensor, source: torch.Tensor, boxes) -> torch.Tensor:
    """Paste the boxes of `source` into `x`, both (C, D, H, W) (a new tensor)."""
    x = x.clone()
    for (d0, d1), (h0, h1), (w0, w1) in boxes:
        x[:, d0:d1, h0:h1, w0:w1] = source[:, d0:d1, h0:h1, w0:w1]
    return x


def cutout_views(x: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """The official `aug_rand`: per sample i, an inner cutout, then if a random partner j != i is drawn
    (probability (N-1)/N) an outer cutout from sample j of the partly augmented batch.

    Args:
        x: (B, C, D, H, W) rotated views.
    Returns:
        (B, C, D, H, W) augmented copy.
    """
    out = x.detach().clone()
    spatial = tuple(x.shape[2:])
    for i in range(out.shape[0]):
        out[i] = inner_cutout(out[i], cutout_boxes(spatial, rng), rng)
        partner = int(rng.integers(0, out.shape[0]))
        if partner != i:
            out[i] = outer_cutout(out[i], out[partner], cutout_boxes(spatial, rng))
    return out


def two_views(x: torch.Tensor, rng: np.random.Generator) -> dict:
    """Both pretraining views of a batch of crops.

    Args:
        x: (B, C, D, H, W) crops.
    Returns:
        {"inputs": (2B, ...) cut-out views, "targets": (2B, ...) rotated views before cutout (inpainting
        targets), "labels": (2B,) rotation labels}; rows b and B + b are the two views of crop b.
    """
    x1, r1 = rotate_views(x, rng)
    x2, r2 = rotate_views(x, rng)
    return {
        "inputs": torch.cat([cutout_views(x1, rng), cutout_views(x2, rng)]),
        "targets": torch.cat([x1, x2]),
        "labels": torch.cat([r1, r2]),
    }
