"""Training data of the missing-modality model: multi-channel cases at 1 mm, 96^3 crops, per-crop z-score.

Paper 3.2: images are resampled to 1 mm isotropic, random crops are centred on a lesion voxel with
probability 0.8, and every crop is z-normalised per channel. A case whose channel file is missing keeps a
zero channel and marks it unavailable, so modality dropout only draws codes without that channel.
Resampled cases are cached once as .npy files that training reads by memory map.
"""

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from shared.atomic import atomic_path
from shared.dataset import list_cases, load_case, load_dataset_json
from shared.errors import InputError
from shared.geometry import resample_to_spacing
from shared.transforms import augment, sample_patch

TARGET_SPACING = (1.0, 1.0, 1.0)  # mm, paper 3.2


@dataclass
class CachedCase:
    """One training case after resampling: paths of its cached arrays and its available channels."""

    case_id: str
    image: str  # (K, X, Y, Z) float32 .npy, missing channels zero
    label: str  # (X, Y, Z) uint8 .npy, 1 = lesion
    available: tuple  # K ints, 1 where the channel file exists


def dataset_modalities(root) -> tuple[str, ...]:
    """The modalities of a dataset in channel order (canonical names), read from its dataset.json."""
    cases = list_cases(root)
    if not cases:
        raise InputError(f"{root}: no case found in imagesTr.")
    return tuple(cases[0].images)


def read_case(case, modalities) -> tuple[np.ndarray, np.ndarray | None, object, tuple]:
    """All K channels of a case in `modalities` order, zeros where a channel file is missing.

    Returns:
        image (K, X, Y, Z) float32, label (X, Y, Z) int64 or None, the reference `Volume` (grid of the files),
        and the available flags (K ints).
    """
    unknown = [m for m in modalities if m not in case.images]
    if unknown:
        raise InputError(f"{case.dataset}: the model's modalities {unknown} are not channels of this dataset.")
    present = [m for m in modalities if case.images[m] is not None]
    if not present:
        raise InputError(
            f"case {case.case_id} of {case.dataset}: none of the modalities {list(modalities)} is on disk."
        )
    image, label, ref, names = load_case(case, modalities=present)
    full = np.zeros((len(modalities), *image.shape[1:]), dtype=np.float32)
    for c, name in enumerate(names):
        full[modalities.index(name)] = image[c]
    return full, label, ref, tuple(int(m in present) for m in modalities)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def prepare_cases(root, case_ids, modalities, cache_dir) -> list[CachedCase]:
    """Resample the chosen cases to 1 mm and cache them (existing cache entries are reused).

    Labels > 0 become lesion (1). Images use linear interpolation, labels nearest neighbour.
    """
    load_dataset_json(root)
    wanted = set(case_ids)
    cases = [c for c in list_cases(root) if c.case_id in wanted and c.label is not None]
    out = Path(cache_dir)
    out.mkdir(parents=True, exist_ok=True)
    cached = []
    for case in tqdm(cases, desc="cache", leave=False, disable=None):
        image_path, label_path = out / f"{case.case_id}_image.npy", out / f"{case.case_id}_label.npy"
        meta_path = out / f"{case.case_id}.json"
        if not (image_path.exists() and label_path.exists() and meta_path.exists()):
            image, label, ref, available = read_case(case, list(modalities))
            image = resample_to_spacing(image, ref.spacing, TARGET_SPACING, order=1)
            label = resample_to_spacing((label > 0).astype(np.uint8), ref.spacing, TARGET_SPACING, order=0)
            _save_npy(image_path, image.astype(np.float32))
            _save_npy(label_path, label)
            meta_path.write_text(json.dumps({"available": list(available)}))
        available = tuple(json.loads(meta_path.read_text())["available"])
        cached.append(CachedCase(case.case_id, str(image_path), str(label_path), available))
    if not cached:
        raise InputError(f"{root}: no labelled case of the training split found.")
    return cached


def zscore_patches(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-sample, per-channel z-score of crops (B, K, D, H, W); an all-zero (missing) channel stays zero."""
    dims = tuple(range(2, x.ndim))
    mean = x.mean(dims, keepdim=True)
    std = x.std(dims, keepdim=True, correction=0).clamp_min(eps)
    return (x - mean) / std


def draw_batch(cases, *, batch_size: int, patch_size, rng: np.random.Generator, fg_prob: float = 0.8,
               augmentation: bool = False):  # fmt: skip
    """A batch of random crops of random cases, z-scored per channel (paper 3.2).

    Returns:
        x (B, K, *patch) float32 full-modality crops, y (B, *patch) int64 labels, available (B, K) float.
    """
    xs, ys, avail = [], [], []
    for _ in range(batch_size):
        case = cases[int(rng.integers(len(cases)))]
        image = np.load(case.image, mmap_mode="r")
        label = np.load(case.label, mmap_mode="r")
        x, y, _ = sample_patch(image, label, patch_size, rng, fg_prob=fg_prob)
        if augmentation:
            x, y = augment(x, y, rng)
            # intensity augmentation must not bring a missing channel back to life
            x = x * np.asarray(case.available, dtype=np.float32)[:, None, None, None]
        xs.append(np.ascontiguousarray(x, dtype=np.float32))
        ys.append(np.ascontiguousarray(y, dtype=np.int64))
        avail.append(case.available)
    x = zscore_patches(torch.from_numpy(np.stack(xs)))
    return x, torch.from_numpy(np.stack(ys)), torch.tensor(avail, dtype=torch.float32)
