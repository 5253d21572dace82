"""Data for the three stages: multi-channel volumes from nnU-Net raw folders, intensity scaling, crops, targets.

Channels are chosen by modality name (`--channels T1 FLAIR`); a name may repeat to feed one modality to
several input channels (the paper's modality-restriction experiment). Volumes are read once and kept in
memory (the demo and small studies); UK-Biobank-scale pretraining would stream them instead.
"""

import math

import numpy as np
import torch

from brainsegfounder.regions import region_targets
from shared.dataset import canonical_modality, kfold_splits, list_cases, load_case, read_split_file, split_dataset
from shared.errors import InputError
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


def segmentation_target(label: np.ndarray, target: str, brats_labels=None) -> np.ndarray:
    """Multi-label target (K, X, Y, Z) float32: BraTS [TC, WT, ET] of the (necrosis, edema, enhancing) values
    `brats_labels` (K=3, see `brainsegfounder.regions`), or a binary lesion label > 0 (K=1)."""
    if target == "brats":
        if brats_labels is None:
            raise ValueError("a brats target needs the (necrosis, edema, enhancing) label values.")
        return region_targets(label, brats_labels)
    if target == "binary":
        return (label > 0)[None].astype(np.float32)
    raise InputError(f"--target {target!r} is not one of brats, binary.")


def parse_channels(names) -> list[str]:
    """Canonical modality names of `--channels` (aliases such as T1w or T2-FLAIR accepted)."""
    return [canonical_modality(n) for n in names]


def held_out_split(data_dir, *, fold: int, folds: int, split_file=None, holdout: int = 0,
                   holdout_seed: int = 12345) -> dict:  # fmt: skip
    """{"train": ids, "val": ids} of the labelled cases of one dataset: what fine-tuning trains and validates on,
    and what Stage-2 pretraining must not see (the validation cases).

    In order of precedence: a split file (`shared.dataset.read_split_file`: nnU-Net's splits_final.json, a BSF
    fold list, a plain split) with `fold`; a fixed held-out set of `holdout` cases drawn with `holdout_seed`
    (the paper's ATLAS recipe: 100 held-out training images); the deterministic k-fold split (`fold` -1: none).
    """
    ids = [c.case_id for c in list_cases(data_dir, "Tr") if c.label is not None]
    if split_file is not None:
        return read_split_file(split_file, ids, fold=fold)
    if holdout:
        if not 0 < holdout < len(ids):
            raise InputError(f"--holdout {holdout} must lie in [1, {len(ids)}) for the {len(ids)} labelled cases of "
                             f"{data_dir}.")  # fmt: skip
        val = set(np.random.default_rng(holdout_seed).choice(ids, size=holdout, replace=False).tolist())
        return {"train": [c for c in ids if c not in val], "val": sorted(val)}
    return split_dataset(data_dir, fold=fold, folds=folds)


def pretraining_split(data_dir, *, fold: int, folds: int, split_file=None, holdout: int = 0,
                      transductive: bool = False) -> dict:  # fmt: skip
    """{"train": ids, "val": ids, "imagesTs": ids} of one dataset for self-supervised pretraining.

    Default (no leakage): every imagesTr case except the held-out cases of `held_out_split`, which become the
    SSL validation set (paper Fig. 4), and nothing of imagesTs; unlabelled imagesTr cases (no label file) are
    never held out by fine-tuning, so they are trained on. A dataset without any label file (UK Biobank) is
    split by the k-fold rule over all its cases. `transductive`: every image of imagesTr and imagesTs is trained
    on and nothing is held out, the behaviour before this split existed (the test images are seen, unlabelled;
    fair only when they are never used to score the fine-tuned model).
    """
    cases = list_cases(data_dir, "Tr")
    ids = [c.case_id for c in cases]
    if transductive:
        try:
            test = [c.case_id for c in list_cases(data_dir, "Ts")]
        except InputError:  # imagesTs is optional
            test = []
        return {"train": ids, "val": [], "imagesTs": test}
    if any(c.label is not None for c in cases):
        val = held_out_split(data_dir, fold=fold, folds=folds, split_file=split_file, holdout=holdout)["val"]
    elif split_file is not None:
        val = read_split_file(split_file, ids, fold=fold)["val"]
    elif fold == -1:
        val = []
    else:
        val = split_ids(ids, fold, folds, str(data_dir))
    return {"train": [c for c in ids if c not in set(val)], "val": sorted(val), "imagesTs": []}


def split_ids(ids: list, fold: int, folds: int, where: str) -> list:
    """The validation ids of fold `fold` of the k-fold rule (`shared.dataset.kfold_splits`) over `ids`."""
    if not 0 <= fold < folds or folds > len(ids):
        raise InputError(f"--fold {fold} / --folds {folds} do not fit the {len(ids)} cases of {where}.")
    return kfold_splits(ids, k=folds)[fold][1]


def run_seed(seed: int, fraction: float, repeat: int, purpose: int) -> int:
    """A seed for one (fraction, repeat) run, the same in every arm of a study: `purpose` 0 draws the training
    subset, 1 seeds the model initialisation and the batches."""
    return int(np.random.default_rng([seed, round(fraction * 1_000_000), repeat, purpose]).integers(2**31))


def few_shot_subsets(case_ids: list, fraction: float, seed: int, repeats: int) -> list[list]:
    """One training subset of ceil(fraction * N) cases per repeat (paper Fig. 5: 5 random subsets per fraction).

    Repeat r draws from (seed, fraction, r) alone, redrawing (up to 100 times) while its subset equals that of
    an earlier repeat, so small pools still give distinct subsets where they exist. Every arm of a study that
    uses the same seed therefore trains on the same subsets, whatever its number of repeats.
    """
    if not 0.0 < fraction <= 1.0:
        raise InputError(f"--train-fraction must lie in (0, 1], got {fraction}.")
    n = max(1, math.ceil(fraction * len(case_ids) - 1e-9))  # - 1e-9: 0.1 * 30 is 3.0000000000000004
    subsets: list[list] = []
    for repeat in range(repeats):
        rng = np.random.default_rng(run_seed(seed, fraction, repeat, 0))
        for _ in range(100):
            subset = sorted(case_ids[i] for i in rng.choice(len(case_ids), size=n, replace=False))
            if subset not in subsets:
                break
        subsets.append(subset)
    return subsets


def ssl_batch(volumes: list, batch_size: int, crops: int, patch, rng: np.random.Generator) -> torch.Tensor:
    """`batch_size` random volumes x `crops` random crops each -> (batch_size * crops, C, *patch) float32."""
    picks = rng.integers(0, len(volumes), size=batch_size)
    out = [sample_patch(volumes[i], None, patch, rng)[0] for i in picks for _ in range(crops)]
    return torch.from_numpy(np.stack(out))


def segmentation_batch(samples: list, batch_size: int, patch, rng: np.random.Generator, target: str,
                       fg_prob: float = 0.33, brats_labels=None) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
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
