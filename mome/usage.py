"""How much each expert contributes to the fused MoME output (the expert-degeneration analysis, Suppl. Fig. I).

Two tables, one row per dataset and input modality and one column per expert:
- magnitude share: each expert's share of mean|e_i^1 * g_i^1| over the whole patch (every voxel and class). It is
  dominated by the background, which is most of every patch, so its rows look alike whatever the routing.
- lesion share: each expert's share of the fused lesion-vs-background margin at the reference lesion voxels,
  c_i = e_i,c * g_i,c - e_i,0 * g_i,0 with c the voxel's lesion class, so that sum_i c_i = o_c - o_0 (Eq. 1).
  Shares are signed and normalised by the ABSOLUTE total margin, share_i = c_i / |sum_j c_j|, so the sign rule
  holds whatever the sign of the total: a positive share pushes the lesion voxels towards lesion, a negative one
  towards background. The shares sum to +1 where the fused margin favours lesion (mean_margin > 0) and to -1
  where it favours background (mean_margin < 0: the lesion is missed on average). This is the routing that
  decides the segmentation. (Dividing by the signed total instead would flip every sign when the total is
  negative.)
"""

from collections import defaultdict

import numpy as np
import torch

from mome.labels import binarise
from shared.dataset import load_case
from shared.geometry import crop_or_pad
from shared.intensity import zscore


def signed_shares(total: torch.Tensor) -> torch.Tensor:
    """total_i / |sum_j total_j|: the sign of each entry kept, the entries sum to +1 or -1 (NaN for a zero sum).

    E.g. contributions (-3, 1): sum -2, shares (-1.5, 0.5): the first expert pulls towards background, the second
    towards lesion, and together they pull towards background (sum -1).
    """
    denominator = total.sum().abs()
    return total / denominator if denominator > 1e-12 else torch.full_like(total, float("nan"))


def lesion_patch(image: np.ndarray, lesion: np.ndarray, patch_size) -> tuple[np.ndarray, np.ndarray]:
    """The patch of `patch_size` centred on the lesion's bounding box (the volume centre without a lesion).

    Args:
        image: (1, X, Y, Z) z-scored image; lesion: (X, Y, Z) label map (0 background).
    Returns:
        image patch (1, *patch_size) and label patch (*patch_size), zero-padded where the volume is smaller.
    """
    centre = np.array(lesion.shape) // 2
    if lesion.any():
        idx = np.argwhere(lesion > 0)
        centre = (idx.min(0) + idx.max(0)) // 2
    start = [int(np.clip(c - p // 2, 0, max(s - p, 0))) for c, p, s in zip(centre, patch_size, lesion.shape)]
    box = tuple(slice(s, s + p) for s, p in zip(start, patch_size))
    return crop_or_pad(image[(slice(None), *box)], patch_size)[0], crop_or_pad(lesion[box], patch_size)[0]


def contributions(model, x: torch.Tensor) -> torch.Tensor:
    """e_i^1 * g_i^1 of every expert at the finest level: (N, K, D, H, W) for one image x (1, 1, D, H, W)."""
    out = model(x, return_all=True)
    experts = torch.stack([levels[0][0] for levels in out["experts"]])  # (N, K, D, H, W)
    gate = out["gates"][0][0]  # (N, K or 1, D, H, W): one map per class, or one shared by the classes
    return experts * gate


@torch.no_grad()
def expert_usage(model, images, patch_size, device, expert_names, lesion_values, per_modality: int = 4):
    """Magnitude and lesion-margin shares of each expert, by dataset and input modality (module docstring).

    By dataset as well, because one modality may serve several lesion types (T1 of tumour and of WMH), and
    whether the gate routes them differently is the question.

    Args:
        model: a MoME in eval mode (deep supervision off is enough: only the finest level is used).
        images: dicts with "dataset", "modality" and "case_obj" (a `shared.dataset.Case`).
        patch_size: one patch per image, centred on its lesion.
        lesion_values: {(dataset, modality): lesion label values} (`mome.labels.lesion_values`).
        per_modality: images used per dataset and input modality (the first ones in `images`).
    Returns:
        (magnitude rows, lesion rows), each {"dataset", "input_modality", "images", ["lesion_voxels",
        "mean_margin"], "expert_<name>": share}, sorted by dataset and modality.
    """
    n, num_classes = len(expert_names), model.experts[0].arch["num_classes"]
    magnitude, margin = defaultdict(lambda: torch.zeros(n)), defaultdict(lambda: torch.zeros(n))
    counts, voxels = defaultdict(int), defaultdict(int)
    for im in images:
        modality = im["modality"]
        key = (im["dataset"], modality)
        if counts[key] >= per_modality:
            continue
        image, label, _, _ = load_case(im["case_obj"], modalities=[modality])
        if label is None:
            label = np.zeros(image.shape[1:], dtype=np.int64)
        lesion = binarise(label, lesion_values[(im["dataset"], modality)])
        # the model's class of a lesion voxel: 1 for binary models; with --keep-labels, the voxel's label value
        classes = lesion if num_classes == 2 else np.clip(label * lesion, 0, num_classes - 1)
        x, target = lesion_patch(zscore(image), classes, patch_size)
        c = contributions(model, torch.from_numpy(np.ascontiguousarray(x))[None].to(device)).float().cpu()
        magnitude[key] += c.abs().flatten(1).mean(dim=1)
        counts[key] += 1
        target = torch.from_numpy(target.astype(np.int64))
        inside = target > 0
        if inside.any():
            chosen = c.gather(1, target.expand(n, 1, *target.shape)).squeeze(1)  # (N, D, H, W): e_i,c * g_i,c
            margin[key] += (chosen - c[:, 0])[:, inside].sum(dim=1)
            voxels[key] += int(inside.sum())

    magnitude_rows, lesion_rows = [], []
    names = {f"expert_{e}": i for i, e in enumerate(expert_names)}
    for key in sorted(counts):
        head = {"dataset": key[0], "input_modality": key[1], "images": counts[key]}
        shares = signed_shares(magnitude[key])
        magnitude_rows.append(head | {k: float(shares[i]) for k, i in names.items()})
        if voxels[key]:
            shares = signed_shares(margin[key])
            lesion_rows.append(head | {"lesion_voxels": voxels[key], "mean_margin": float(margin[key].sum()) /
                               voxels[key]} | {k: float(shares[i]) for k, i in names.items()})  # fmt: skip
    return magnitude_rows, lesion_rows
