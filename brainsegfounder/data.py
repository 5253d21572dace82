"""Data for the three stages: multi-channel volumes from nnU-Net raw folders, intensity scaling, crops, targets.

Channels are chosen by modality name (`--channels T1 FLAIR`); a name may repeat to feed one modality to
several input channels (the paper's modality-restriction experiment). Volumes are read once and kept in
memory (the demo and small studies); UK-Biobank-scale pretraining would stream them instead.
"""

import math

import numpy as np
import torch

from shared.dataset import canonical_modality, kfold_splits, list_cases, load_case
from shared.errors import InputError
from shared.metrics import brats_regions
from shared.transforms import random_flip, sample_patch, scale_shift_intensity, zscore


def scale_intensity(image: np.ndarray, mode: str) -> np.ndarray:
    """Per-channel intensity scaling of a (C, X, Y, Z) volume.

    Modes: "percentile" maps 0 -> 0 and the 99.5th percentile of the non-zero voxels -> 1, clipped to [0, 1]
    (our SSL default: the inner-cutout noise lives in [0, 1]); "ct" is the official SSL scaling, CT window
    -1000..1000 -> 0..1 applied to MRI as it is (MRI 0 -> 0.5); "zscore" is the fine-tuning normalisation
    (mean/std of the brain, voxels outside it set to 0).
    """
    image = np.asarray(image, dtype=np.float32)
    if mode == "zscore":
        return zscore(image, mask=np.any(image != 0, axis=0))
    if mode == "ct":
        return np.clip((image + 1000.0) / 2000.0, 0.0, 1.0)
    if mode != "percentile":
        raise InputError(f"--intensity {mode!r} is not one of percentile, ct, zscore.")
    out = np.empty_like(image)
    for c, channel in enumerate(image):
        nonzero = channel[channel != 0]
        top = float(np.percentile(nonzero, 99.5)) if nonzero.size else 1.0
        out[c] = np.clip(channel / max(top, 1e-8), 0.0, 1.0)
    return out


def load_channels(case, channels, intensity: str) -> tuple:
    """A case's (C, X, Y, Z) float32 image in `channels` order (repeats allowed), scaled; its (X, Y, Z) label or
    None; and the `Volume` of its first channel (grid, affine and header for writing predictions)."""
    unique = list(dict.fromkeys(channels))
    missing = [m for m in unique if m not in case.images or case.images[m] is None]
    if missing:
        raise InputError(f"case {case.case_id} of {case.dataset} has no {missing} channel (has "
                         f"{[m for m, p in case.images.items() if p is not None]}); check --channels.")  # fmt: skip
    image, label, reference, present = load_case(case, modalities=unique)
    image = scale_intensity(image, intensity)
    return image[[present.index(m) for m in channels]], label, reference


def segmentation_target(label: np.ndarray, target: str, brats_labels=(1, 2, 3)) -> np.ndarray:
    """Multi-label target (K, X, Y, Z) float32: BraTS [TC, WT, ET] (K=3) or a binary lesion label > 0 (K=1)."""
    if target == "brats":
        necrosis, edema, enhancing = brats_labels
        regions = brats_regions(label, necrosis=necrosis, edema=edema, enhancing=enhancing)
        return np.stack([regions["TC"], regions["WT"], regions["ET"]]).astype(np.float32)
    if target == "binary":
        return (label > 0)[None].astype(np.float32)
    raise InputError(f"--target {target!r} is not one of brats, binary.")


def parse_channels(names) -> list[str]:
    """Canonical modality names of `--channels` (aliases such as T1w or T2-FLAIR accepted)."""
    return [canonical_modality(n) for n in names]


def unlabeled_cases(data_dirs, channels) -> list:
    """Every case (imagesTr and imagesTs) of the given datasets that has all `channels`, for pretraining."""
    cases = []
    for root in data_dirs:
        for split in ("Tr", "Ts"):
            try:
                listed = list_cases(root, split)
            except InputError:
                if split == "Ts":  # imagesTs is optional
                    continue
                raise
            cases += [c for c in listed if all(c.images.get(m) is not None for m in channels)]
    if not cases:
        raise InputError(f"--data {list(map(str, data_dirs))} holds no case with all channels {list(channels)}.")
    return cases


def split_labeled(data_dir, fold: int, folds: int) -> tuple[list, list]:
    """(train, validation) labelled cases of one dataset by the deterministic k-fold split; fold -1: all train."""
    cases = [c for c in list_cases(data_dir, "Tr") if c.label is not None]
    if len(cases) < 2:
        raise InputError(f"--data {data_dir} has {len(cases)} labelled case(s); fine-tuning needs at least 2.")
    if fold == -1:
        return cases, []
    if not 0 <= fold < folds or folds > len(cases):
        raise InputError(f"--fold {fold} / --folds {folds} do not fit {len(cases)} labelled cases.")
    val_ids = set(kfold_splits([c.case_id for c in cases], k=folds)[fold][1])
    return [c for c in cases if c.case_id not in val_ids], [c for c in cases if c.case_id in val_ids]


def few_shot_subset(cases: list, fraction: float, seed: int) -> list:
    """ceil(fraction * N) training cases drawn without replacement with a fixed seed (one per repeat)."""
    if not 0.0 < fraction <= 1.0:
        raise InputError(f"--train-fraction must lie in (0, 1], got {fraction}.")
    n = max(1, math.ceil(fraction * len(cases)))
    picked = np.random.default_rng(seed).choice(len(cases), size=n, replace=False)
    return [cases[i] for i in sorted(picked)]


def ssl_batch(volumes: list, batch_size: int, crops: int, patch, rng: np.random.Generator) -> torch.Tensor:
    """`batch_size` random volumes x `crops` random crops each -> (batch_size * crops, C, *patch) float32."""
    picks = rng.integers(0, len(volumes), size=batch_size)
    out = [sample_patch(volumes[i], None, patch, rng)[0] for i in picks for _ in range(crops)]
    return torch.from_numpy(np.stack(out))


def segmentation_batch(samples: list, batch_size: int, patch, rng: np.random.Generator, target: str,
                       fg_prob: float = 0.33, brats_labels=(1, 2, 3)) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    """Random (image, label) crops with flips and intensity scale/shift (the BSF fine-tuning augmentation).

    Args:
        samples: list of (image (C, X, Y, Z), label (X, Y, Z)).
    Returns:
        x (B, C, *patch) float32, y (B, K, *patch) float32 multi-label target.
    """
    xs, ys = [], []
    for i in rng.integers(0, len(samples), size=batch_size):
        image, label, _ = sample_patch(*samples[i], patch, rng, fg_prob=fg_prob)
        image, label = random_flip(image, label, rng)
        xs.append(scale_shift_intensity(image, rng))
        ys.append(segmentation_target(label, target, brats_labels))
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys))
