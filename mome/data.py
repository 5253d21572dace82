"""MoME training data: every channel of every case is one single-modality sample (paper 2.3, Suppl. Table II).

A BraTS-like case with T1, T1ce, T2 and FLAIR gives four samples, each a 1-channel image with the case's
lesion mask. Volumes are read once from the nnU-Net raw layout, z-scored over the whole volume (the official
MoME code disables nnU-Net's crop-to-nonzero, so background zeros count in the statistics), binarised to
lesion/background, and cached as .npy files that training reads by memory map.
"""

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mome.splits import training_split
from shared.atomic import atomic_path
from shared.dataset import list_cases, load_case, load_dataset_json
from shared.errors import InputError
from shared.harness import DistInfo
from shared.transforms import augment, sample_patch, zscore


@dataclass
class Sample:
    """One single-modality training image of MoME."""

    dataset: str  # dataset folder name, e.g. "Dataset901_PhantomTumour"
    case_id: str
    modality: str  # canonical modality name, e.g. "FLAIR"
    channel: int  # channel index in the raw dataset (the XXXX of CASE_XXXX.nii.gz)
    expert: int  # index of the expert of this modality (1[X in M_i] of Eq. 2), -1 if no expert has it
    image: str  # cached z-scored image, (1, X, Y, Z) float32 .npy
    label: str  # cached binary label, (X, Y, Z) uint8 .npy


def _save_npy(path: Path, array: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        np.save(tmp, array)


def prepare_samples(dataset_dirs, case_ids: dict, modalities, cache_dir, binarise: bool = True) -> list:
    """Read the chosen cases once and cache every present channel as a z-scored single-modality sample.

    Args:
        dataset_dirs: nnU-Net raw dataset folders.
        case_ids: {dataset name: [case ids]} to use (e.g. the "train" lists of `split_cases`).
        modalities: expert order (canonical names); channels of other modalities get expert -1.
        cache_dir: folder for the .npy cache; existing entries are reused.
        binarise: labels > 0 become lesion (1), as in the paper; False keeps the label values.

    Returns:
        list of `Sample`, one per (case, present channel), sorted by dataset, case, channel.
    """
    cache_dir = Path(cache_dir)
    samples = []
    for root in dataset_dirs:
        root = Path(root)
        load_dataset_json(root)
        wanted = set(case_ids.get(root.name, []))
        cases = [c for c in list_cases(root) if c.case_id in wanted and c.label is not None]
        out = cache_dir / root.name
        out.mkdir(parents=True, exist_ok=True)
        for case in tqdm(cases, desc=f"cache {root.name}", leave=False, disable=None):
            channel_of = {m: i for i, m in enumerate(case.images)}
            present = [m for m, path in case.images.items() if path is not None]
            label_path = out / f"{case.case_id}_label.npy"
            image_paths = {m: out / f"{case.case_id}_{channel_of[m]:04d}.npy" for m in present}
            if not label_path.exists() or not all(p.exists() for p in image_paths.values()):
                image, label, _, names = load_case(case)
                label = (label > 0).astype(np.uint8) if binarise else label.astype(np.uint8)
                for c, m in enumerate(names):
                    _save_npy(image_paths[m], zscore(image[c : c + 1]))
                _save_npy(label_path, label)
            for m in present:
                expert = modalities.index(m) if m in modalities else -1
                samples.append(
                    Sample(root.name, case.case_id, m, channel_of[m], expert, str(image_paths[m]), str(label_path))
                )
    if not samples:
        raise InputError("no training sample found: check --data and the split (every case may be held out).")
    return samples


def save_split(path, split: dict) -> None:
    """Write the train/validation split as JSON (read by `mome.predict --cases` users and `mome.evaluate`)."""
    Path(path).write_text(json.dumps(split, indent=1))


def describe(samples) -> str:
    """One line per (dataset, modality) with its sample count, for the start of a run."""
    counts = {}
    for s in samples:
        counts[(s.dataset, s.modality)] = counts.get((s.dataset, s.modality), 0) + 1
    return "\n".join(f"  {d:40s} {m:6s} {n:4d} samples" for (d, m), n in sorted(counts.items()))


def draw_batch(
    samples,
    *,
    batch_size: int,
    patch_size,
    rng: np.random.Generator,
    oversample: float = 0.33,
    augmentation: bool = True,
):
    """A training batch of random patches, nnU-Net style.

    Samples are drawn uniformly; the last round(B * oversample) patches of the batch are centred on a lesion
    voxel (nnU-Net's `oversample_foreground_percent`: with B = 2 sample 0 is random, sample 1 foreground).

    Returns:
        x (B, 1, *patch) float32, y (B, *patch) int64, expert (B,) int64 (the modality indicator of Eq. 2).
    """
    n_forced = int(round(batch_size * oversample))
    xs, ys, experts = [], [], []
    for j in range(batch_size):
        s = samples[int(rng.integers(len(samples)))]
        image = np.load(s.image, mmap_mode="r")
        label = np.load(s.label, mmap_mode="r")
        forced = j >= batch_size - n_forced
        x, y, _ = sample_patch(image, label, patch_size, rng, fg_prob=1.0 if forced else 0.0)
        if augmentation:
            x, y = augment(x, y, rng)
        xs.append(np.ascontiguousarray(x, dtype=np.float32))
        ys.append(np.ascontiguousarray(y, dtype=np.int64))
        experts.append(s.expert)
    return torch.from_numpy(np.stack(xs)), torch.from_numpy(np.stack(ys)), torch.tensor(experts, dtype=torch.long)


def samples_to_json(samples) -> list:
    """Plain dicts of the samples, for logging what a run trained on."""
    return [asdict(s) for s in samples]


def prepare_data(args, dist_info: DistInfo, only_modality: str | None = None) -> list:
    """Split the datasets, cache the training samples (rank 0 first), and keep those with an expert.

    Args:
        only_modality: phase 1 keeps the samples of this modality only; "all" keeps every sample (the
            universal nnU-Net), whether or not an expert has its modality.
    """
    out = Path(args.out)
    split = training_split(args.data, args.split_file, fold=args.fold, folds=args.folds)
    train_ids = {name: s["train"] for name, s in split.items()}
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_split(out / "split.json", split)
        samples = prepare_samples(args.data, train_ids, args.modalities, out / "cache", binarise=not args.keep_labels)
    if dist_info.world_size > 1:
        torch.distributed.barrier()  # the cache is complete before the other ranks read it
    if not dist_info.is_main:
        samples = prepare_samples(args.data, train_ids, args.modalities, out / "cache", binarise=not args.keep_labels)
    if only_modality == "all":
        return samples
    unknown = sorted({s.modality for s in samples if s.expert < 0})
    if unknown and dist_info.is_main:
        print(f"skipping samples of modalities without an expert: {unknown} (experts: {args.modalities})")
    samples = [s for s in samples if s.expert >= 0]
    if only_modality is not None:
        samples = [s for s in samples if s.modality == only_modality]
    if not samples:
        wanted = only_modality or args.modalities
        raise InputError(f"--data holds no training image of modality {wanted} in the chosen split.")
    return samples


def training_grid(samples) -> tuple | None:
    """The (X, Y, Z) shape shared by every training image, or None when they differ (then any input shape goes)."""
    shapes = {tuple(np.load(s.image, mmap_mode="r").shape[1:]) for s in samples}
    return shapes.pop() if len(shapes) == 1 else None
