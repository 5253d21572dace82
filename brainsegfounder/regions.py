"""The TC / WT / ET regions of fine-tuning, prediction and scoring, from the BraTS label values.

Which values are necrosis, edema and enhancing is decided by `shared.brats` (--brats-labels, the dataset.json
label names, or a model's record of what it was trained on).
"""

import numpy as np
import torch

from shared.metrics import brats_regions

REGIONS = ("TC", "WT", "ET")  # the order of the three sigmoid output channels (BSF, MONAI)


def region_targets(label: np.ndarray, values) -> np.ndarray:
    """(3, ...) float32 multi-label target [TC, WT, ET] of an integer label map (or a batch of them)."""
    necrosis, edema, enhancing = values
    masks = brats_regions(label, necrosis=necrosis, edema=edema, enhancing=enhancing)
    return np.stack([masks[name] for name in REGIONS]).astype(np.float32)


def regions_to_labels(masks: np.ndarray, values) -> np.ndarray:
    """(3, X, Y, Z) boolean [TC, WT, ET] -> (X, Y, Z) uint8 label map, as BSF's `test.py` writes it: WT -> edema,
    then TC -> necrosis, then ET -> enhancing (later regions overwrite earlier ones)."""
    necrosis, edema, enhancing = values
    tc, wt, et = masks
    labels = np.zeros(masks.shape[1:], dtype=np.uint8)
    labels[wt] = edema
    labels[tc] = necrosis
    labels[et] = enhancing
    return labels


def region_channels(label: torch.Tensor, target: str, values=None) -> torch.Tensor:
    """Training targets of a batch of label maps on any device: (B, X, Y, Z) int -> (B, K, X, Y, Z) float32,
    [TC, WT, ET] of the (necrosis, edema, enhancing) `values` (K=3), or label > 0 (K=1, target "binary")."""
    if target == "binary":
        return (label > 0)[:, None].float()
    necrosis, edema, enhancing = values
    tc = (label == necrosis) | (label == enhancing)
    wt = tc | (label == edema)
    return torch.stack([tc, wt, label == enhancing], dim=1).float()
