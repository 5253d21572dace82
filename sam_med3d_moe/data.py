"""Data for SAM-Med3D: one sample per (case, channel, target class), preprocessed as the official pipeline.

Preprocessing (fact sheet Sec. 2): reorient to RAS, resample to 1.5 mm (linear image, nearest label), crop or
zero-pad the model's cube centred on the target's bounding box (torchio `CropOrPad(mask_name=...)`), then
z-normalise with mean and unbiased std over the voxels > 0 applied to the whole crop (torchio
`ZNormalization(masking_method=x > 0)`) after the crop. Training flips each axis with probability 1/2. Here
the z-normalisation is per sample (the official training pools it over the batch; validation is per volume).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sam_med3d_moe.preprocess import bounding_box, crop_at, crop_start, to_model_grid, znorm_positive
from shared.dataset import canonical_modality, list_cases, load_case
from shared.errors import InputError


@dataclass
class Sample:
    """One binary target of one channel, in the RAS grid at the target spacing."""

    image: np.ndarray  # (X, Y, Z) float32
    mask: np.ndarray  # (X, Y, Z) bool
    task: str  # dataset folder name, e.g. "Dataset906_PhantomAnatomy"
    label: int | None  # the label value of the target; None for a union target (every label > 0)
    name: str  # "<case>_<modality>_label<value>" or "<case>_<modality>_union"


def load_samples(
    data_dirs,
    case_ids: dict,
    modalities=None,
    spacing: float = 1.5,
    union: list | None = None,
    min_voxels: int = 10,
    labels=None,
) -> list[Sample]:
    """Read, reorient and resample the cases, and cut one sample per (case, channel, target).

    Args:
        data_dirs: nnU-Net raw dataset folders.
        case_ids: folder name -> list of case ids to use.
        modalities: channels to use (default every channel); a channel a dataset lacks is skipped.
        spacing: isotropic target spacing in mm (official 1.5).
        union: None, or folder names whose target is all labels > 0 (e.g. a whole lesion) instead of one target
            per label value; an empty list means every dataset.
        min_voxels: targets smaller than this (after resampling) are skipped, as the official data preparation.
        labels: None, or the label values to keep (targets of other values are left out).
    Returns:
        list of `Sample`.
    """
    samples = []
    for root in data_dirs:
        name = Path(root).name
        wanted = set(case_ids.get(name, []))
        for case in list_cases(root):
            if case.case_id not in wanted or case.label is None:
                continue
            present = [m for m in (modalities or case.images) if canonical_modality(m) in case.images]
            if not present:
                continue
            image, label, ref, names = load_case(case, modalities=present)
            label_rs, _, _, _ = to_model_grid(label.astype(np.int16), ref.affine, spacing, order=0)
            merged = union is not None and (not union or name in {Path(u).name for u in union})
            values = [None] if merged else sorted(int(v) for v in np.unique(label_rs) if v > 0)
            if labels is not None:
                values = [v for v in values if v in set(labels)]
            for channel, modality in enumerate(names):
                img_rs, _, _, _ = to_model_grid(image[channel], ref.affine, spacing, order=1)
                for value in values:
                    mask = label_rs > 0 if value is None else label_rs == value
                    if mask.sum() >= min_voxels:
                        samples.append(
                            Sample(
                                image=img_rs.astype(np.float32),
                                mask=mask,
                                task=name,
                                label=value,
                                name=f"{case.case_id}_{modality}_" + ("union" if value is None else f"label{value}"),
                            )
                        )
    if not samples:
        which = "" if labels is None else f" with label value(s) {sorted(labels)}"
        raise InputError(
            f"--data {list(map(str, data_dirs))}: no labelled target{which} of at least {min_voxels} voxels."
        )
    return samples


def crop_sample(sample: Sample, size: int, rng: np.random.Generator | None = None, flip: bool = False):
    """Crop/pad a sample around its target, optionally flip, z-normalise.

    Returns:
        image (1, S, S, S) float32, mask (1, S, S, S) float32.
    """
    start = crop_start(*bounding_box(sample.mask), size)
    image = crop_at(sample.image, start, size)
    mask = crop_at(sample.mask, start, size)
    if flip and rng is not None:
        axes = tuple(a for a in range(3) if rng.random() < 0.5)
        if axes:
            image, mask = np.flip(image, axes), np.flip(mask, axes)
    return znorm_positive(np.ascontiguousarray(image))[None], np.ascontiguousarray(mask, dtype=np.float32)[None]


def draw_batch(
    samples: list[Sample],
    batch_size: int,
    size: int,
    rng: np.random.Generator,
    flip: bool = True,
    tasks: list[str] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A random batch, balanced over tasks: a task is drawn uniformly, then one of its samples.

    Args:
        tasks: task order for the draw (default: sorted task names of `samples`).
    Returns:
        image (B, 1, S, S, S), gt (B, 1, S, S, S) float, the (task, label) of each crop (B).
    """
    by_task = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s)
    names = tasks or sorted(by_task)
    images, masks, picked = [], [], []
    for _ in range(batch_size):
        task = names[rng.integers(len(names))]
        pool = by_task[task]
        sample = pool[rng.integers(len(pool))]
        image, mask = crop_sample(sample, size, rng=rng, flip=flip)
        images.append(image)
        masks.append(mask)
        picked.append((task, sample.label))
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)), picked
