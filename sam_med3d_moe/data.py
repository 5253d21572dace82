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

from shared.dataset import canonical_modality, list_cases, load_case
from shared.errors import InputError
from shared.geometry import resample_to_shape, to_canonical


@dataclass
class Sample:
    """One binary target of one channel, in the RAS grid at the target spacing."""

    image: np.ndarray  # (X, Y, Z) float32
    mask: np.ndarray  # (X, Y, Z) bool
    task: str  # dataset folder name, e.g. "Dataset906_PhantomAnatomy"
    name: str  # "<case>_<modality>_label<value>"


def resampled_shape(shape, spacing, new_spacing) -> tuple:
    """Grid of the same field of view at `new_spacing` (rounded, at least 1 voxel per axis)."""
    return tuple(max(1, int(round(n * s / t))) for n, s, t in zip(shape, spacing, new_spacing))


def to_model_grid(data: np.ndarray, affine: np.ndarray, spacing: float, order: int):
    """RAS reorientation and resampling to isotropic `spacing` mm.

    Args:
        data: (X, Y, Z) array in the file's voxel order; affine: its (4, 4) affine.
        order: 1 for images, 0 for labels.
    Returns:
        array in the RAS grid at `spacing`, the canonical affine, the orientation info (for `from_canonical`) and
        the shape of the RAS grid before resampling (to resample back to).
    """
    canon, canon_affine, info = to_canonical(data, affine)
    vox = np.linalg.norm(canon_affine[:3, :3], axis=0)
    shape = resampled_shape(canon.shape, vox, (spacing,) * 3)
    return resample_to_shape(canon, shape, order=order), canon_affine, info, canon.shape


def target_centre(mask: np.ndarray) -> np.ndarray:
    """Centre (3,) of the bounding box of a non-empty mask, in voxels (half-integers possible)."""
    idx = np.argwhere(mask)
    return (idx.min(axis=0) + idx.max(axis=0)) / 2.0


def crop_start(centre, size: int) -> np.ndarray:
    """First voxel (3,) of the `size`^3 cube whose centre is nearest to `centre` (may lie outside the volume)."""
    return np.floor(np.asarray(centre, dtype=np.float64) - (size - 1) / 2.0 + 0.5).astype(np.int64)


def crop_at(data: np.ndarray, start, size: int) -> np.ndarray:
    """The `size`^3 cube of `data` (X, Y, Z) starting at `start`; voxels outside the volume are 0."""
    out = np.zeros((size,) * 3, dtype=data.dtype)
    src, dst = [], []
    for s, n in zip(start, data.shape):
        lo, hi = max(int(s), 0), min(int(s) + size, n)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - int(s), lo - int(s) + max(0, hi - lo)))
    out[tuple(dst)] = data[tuple(src)]
    return out


def paste_at(crop: np.ndarray, start, shape) -> np.ndarray:
    """Inverse of `crop_at`: put the cube back into a zero volume of `shape`."""
    out = np.zeros(shape, dtype=crop.dtype)
    size = crop.shape[0]
    src, dst = [], []
    for s, n in zip(start, shape):
        lo, hi = max(int(s), 0), min(int(s) + size, n)
        dst.append(slice(lo, max(lo, hi)))
        src.append(slice(lo - int(s), lo - int(s) + max(0, hi - lo)))
    out[tuple(dst)] = crop[tuple(src)]
    return out


def znorm_positive(image: np.ndarray) -> np.ndarray:
    """(x - mean) / std with mean and unbiased std over the voxels > 0, applied to every voxel (torchio)."""
    values = image[image > 0].astype(np.float64)
    if values.size < 2:
        return image.astype(np.float32)
    std = values.std(ddof=1)
    return ((image - values.mean()) / max(std, 1e-8)).astype(np.float32)


def load_samples(
    data_dirs, case_ids: dict, modalities=None, spacing: float = 1.5, union: list | None = None, min_voxels: int = 10
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
            values = [1] if merged else sorted(int(v) for v in np.unique(label_rs) if v > 0)
            for channel, modality in enumerate(names):
                img_rs, _, _, _ = to_model_grid(image[channel], ref.affine, spacing, order=1)
                for value in values:
                    mask = label_rs > 0 if merged else label_rs == value
                    if mask.sum() >= min_voxels:
                        samples.append(
                            Sample(
                                image=img_rs.astype(np.float32),
                                mask=mask,
                                task=name,
                                name=f"{case.case_id}_{modality}_label{value}",
                            )
                        )
    if not samples:
        raise InputError(f"--data {list(map(str, data_dirs))}: no labelled target of at least {min_voxels} voxels.")
    return samples


def crop_sample(sample: Sample, size: int, rng: np.random.Generator | None = None, flip: bool = False):
    """Crop/pad a sample around its target, optionally flip, z-normalise.

    Returns:
        image (1, S, S, S) float32, mask (1, S, S, S) float32.
    """
    start = crop_start(target_centre(sample.mask), size)
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
        image (B, 1, S, S, S), gt (B, 1, S, S, S) float, task names (B).
    """
    by_task = {}
    for s in samples:
        by_task.setdefault(s.task, []).append(s)
    names = tasks or sorted(by_task)
    images, masks, picked = [], [], []
    for _ in range(batch_size):
        task = names[rng.integers(len(names))]
        pool = by_task[task]
        image, mask = crop_sample(pool[rng.integers(len(pool))], size, rng=rng, flip=flip)
        images.append(image)
        masks.append(mask)
        picked.append(task)
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks)), picked
