"""Prompt simulation from a ground-truth mask: clicks from the error region and boxes with jitter.

Layouts: masks and logits are (B, 1, S, S, S) tensors in the model's input grid; a click is a voxel index in
tensor-axis order (what `torch.argwhere` gives, minus the channel), as the official code feeds it. Random choices
use a numpy Generator (the run's seeded `rng`, so a resumed run draws the same prompts).
"""

import numpy as np
import torch
from scipy import ndimage


def _uniform_voxel(mask: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A uniformly drawn index (3,) of a True voxel of a (S, S, S) mask."""
    flat = np.flatnonzero(mask)
    return np.array(np.unravel_index(flat[rng.integers(len(flat))], mask.shape))


def _split(pred: np.ndarray, gt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return gt & ~pred, ~gt & pred  # false negatives, false positives


def random_click(logits: torch.Tensor, gt: torch.Tensor, rng: np.random.Generator, threshold: float = 0.5):
    """Next click drawn uniformly from the error region (official `get_next_click3D_torch_2`).

    A voxel is predicted foreground when its *logit* exceeds `threshold` (0.5 in the official sampler, which
    thresholds logits, not probabilities). The click is positive in a false negative, negative in a false
    positive. With all-zero logits this is the first click: a uniform foreground voxel. Where the error set is
    empty (the official code crashes) a uniform foreground voxel is clicked positive, as the MedIM path does.

    Args:
        logits: (B, 1, S, S, S) previous full-size logits (zeros before the first click).
        gt: (B, 1, S, S, S) binary target; every sample needs a foreground voxel.
    Returns:
        coords (B, 1, 3) long and labels (B, 1) long, on gt's device.
    """
    pred = (logits > threshold).squeeze(1).cpu().numpy()
    target = gt.squeeze(1).cpu().numpy() > 0
    coords, labels = [], []
    for p, g in zip(pred, target):
        fn, fp = _split(p, g)
        if not (fn.any() or fp.any()):
            fn = g
        point = _uniform_voxel(fn | fp, rng)
        coords.append(point)
        labels.append(int(fn[tuple(point)]))
    return _as_tensors(coords, labels, gt.device)


def ritm_click(logits: torch.Tensor, gt: torch.Tensor, rng: np.random.Generator, threshold: float = 0.5):
    """Next click from the larger error region's interior (official `get_next_click3D_torch_ritm`, clicks 1-2
    of the old validation): Euclidean distance transforms of the false-negative and false-positive masks (with
    a 1-voxel zero border, so the volume edge counts as outside), keep the error type with the larger maximum
    distance, and draw uniformly among its voxels farther than half that maximum. On a tie (common: a
    prediction shifted by one voxel leaves false-negative and false-positive slabs of equal depth) the false
    positives are chosen and the click is negative, as the official `fn_max_dist > fp_max_dist`.

    Args and Returns as `random_click`.
    """
    pred = (logits > threshold).squeeze(1).cpu().numpy()
    target = gt.squeeze(1).cpu().numpy() > 0
    coords, labels = [], []
    for p, g in zip(pred, target):
        fn, fp = _split(p, g)
        if not (fn.any() or fp.any()):
            fn = g
        inner = (slice(1, -1),) * 3
        dist_fn = ndimage.distance_transform_edt(np.pad(fn, 1))[inner]
        dist_fp = ndimage.distance_transform_edt(np.pad(fp, 1))[inner]
        positive = dist_fn.max() > dist_fp.max()  # official: strict, a tie clicks the false positives
        dist = dist_fn if positive else dist_fp
        point = _uniform_voxel(dist > dist.max() / 2, rng)
        coords.append(point)
        labels.append(int(positive))
    return _as_tensors(coords, labels, gt.device)


def _as_tensors(coords, labels, device):
    coords = torch.as_tensor(np.stack(coords), dtype=torch.long, device=device)[:, None]  # (B, 1, 3)
    return coords, torch.as_tensor(labels, dtype=torch.long, device=device)[:, None]


def box_from_mask(gt: torch.Tensor, rng: np.random.Generator, jitter: int = 0) -> torch.Tensor:
    """Bounding box of each target with every corner coordinate moved by up to `jitter` voxels.

    Args:
        gt: (B, 1, S, S, S) binary targets, each with a foreground voxel.
        jitter: largest shift (voxels) of each coordinate, drawn uniformly in [-jitter, jitter].
    Returns:
        (B, 6) long: (min d, min h, min w, max d, max h, max w), inclusive, clipped to the grid, min <= max.
    """
    boxes = []
    size = gt.shape[-1]
    for g in gt.squeeze(1).cpu().numpy() > 0:
        idx = np.argwhere(g)
        lo, hi = idx.min(axis=0), idx.max(axis=0)
        if jitter > 0:
            lo = lo + rng.integers(-jitter, jitter + 1, size=3)
            hi = hi + rng.integers(-jitter, jitter + 1, size=3)
        lo, hi = np.clip(lo, 0, size - 1), np.clip(hi, 0, size - 1)
        boxes.append(np.concatenate([np.minimum(lo, hi), np.maximum(lo, hi)]))
    return torch.as_tensor(np.stack(boxes), dtype=torch.long, device=gt.device)
