"""Data for SAM-Med3D: one sample per (case, channel, target class), read from the preprocessed cache.

Preprocessing (fact sheet Sec. 2), once per dataset in `shared.cache`: RAS reorientation, resampling to 1.5 mm
(linear image, nearest label), raw intensities (optionally the CT clamp to [-1000, 1000]). The cache records
each class's voxel count and bounding box, so a target is a few integers, never a full-volume mask. Per sample,
at draw time: the model cube cut around the target's bounding box by torchio's rule and read from the memory
maps (zero padding outside the volume), the binary target (label == value, or label > 0 for a union target),
z-normalisation over the crop's voxels > 0 (per sample; the official training pools it over the batch), and
flips of each axis with probability 1/2 (the `sam_flips` augmentation, torchio `RandomFlip(axes=(0, 1, 2))`).
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sam_med3d_moe.preprocess import CT_CLAMP, crop_start, znorm_positive
from shared.augment import PIPELINES, sample_params
from shared.cache import CachedCase, Preprocessing, build_cache
from shared.dataset import canonical_modality, load_dataset_json
from shared.errors import InputError
from shared.sampling import read_region

AUGMENTATION = PIPELINES["sam_flips"]


def preprocessing(channels, spacing: float, ct_clamp: bool) -> Preprocessing:
    """The cache parameters of SAM-Med3D for one dataset's `channels` (canonical names, in order)."""
    return Preprocessing(
        modalities=tuple(channels),
        missing="zero",  # a case without one channel file keeps its other channels (targets skip that channel)
        clip=CT_CLAMP if ct_clamp else None,
        normalise="none",  # z-normalised per crop, after the crop (torchio order)
        reorient=True,
        spacing=(spacing,) * 3,
        image_order=1,
        labels="keep",
    )


@dataclass(frozen=True)
class Target:
    """One binary target of one channel of one cached case."""

    dataset: str  # dataset folder name
    case_id: str
    entry: int  # index of the case in the list of cached cases
    channel: int  # channel of the cached image
    modality: str
    label: int | None  # label value; None for a union target (every label > 0)
    bbox_min: tuple  # inclusive bounding box in the cached grid
    bbox_max: tuple
    voxels: int  # its voxel count in the cached grid

    @property
    def name(self) -> str:
        return f"{self.case_id}_{self.modality}_" + ("union" if self.label is None else f"label{self.label}")


def dataset_channels(root, modalities) -> list[str]:
    """The channels of a dataset that SAM-Med3D uses: `modalities` it has (in that order), or every channel."""
    names = [canonical_modality(v) for _, v in sorted(load_dataset_json(root)["channel_names"].items(),
                                                      key=lambda kv: int(kv[0]))]  # fmt: skip
    if modalities is None:
        return names
    return [m for m in (canonical_modality(m) for m in modalities) if m in names]


def load_cases(data_dirs, case_ids: dict, modalities, spacing: float, ct_clamp: bool, cache_root=None,
               processes: int = 1) -> list[CachedCase]:  # fmt: skip
    """Build (on first use) or reuse each dataset's cache and return the cached cases of `case_ids`.

    Args:
        data_dirs: nnU-Net raw dataset folders.
        case_ids: folder name -> case ids to use (labelled cases).
        modalities: channels to use (None: every channel); a dataset without any of them is refused.
    """
    entries = []
    for root in data_dirs:
        name = Path(root).name
        channels = dataset_channels(root, modalities)
        if not channels:
            raise InputError(f"--data {root} has none of the --modalities {list(modalities)}.")
        ids = case_ids.get(name, [])
        if ids:
            prep = preprocessing(channels, spacing, ct_clamp)
            entries += build_cache(root, prep, case_ids=ids, labelled_only=True, cache_root=cache_root,
                                   processes=processes)  # fmt: skip
    return entries


def build_targets(entries: list[CachedCase], union=None, labels=None, min_voxels: int = 10) -> list[Target]:
    """One target per (case, available channel, class) from the cached class records (no label is read).

    Args:
        union: None, or dataset names whose target is all labels > 0 (e.g. a whole lesion) instead of one per
            label value; an empty list means every dataset.
        labels: None, or the label values to keep.
        min_voxels: targets smaller than this (in the cached grid) are skipped, as the official preparation.
    Returns:
        list of Target, in case and channel order.
    """
    names = None if union is None else {Path(u).name for u in union}
    targets = []
    for index, entry in enumerate(entries):
        classes = entry.classes
        if not classes:
            continue
        if union is not None and (not names or entry.dataset in names):
            lo = np.min([c["bbox"][0] for c in classes.values()], axis=0)
            hi = np.max([c["bbox"][1] for c in classes.values()], axis=0)
            found = [(None, lo, hi, sum(c["voxels"] for c in classes.values()))]
        else:
            found = [(v, c["bbox"][0], c["bbox"][1], c["voxels"]) for v, c in sorted(classes.items())]
            if labels is not None:
                found = [f for f in found if f[0] in set(labels)]
        for channel, (modality, available) in enumerate(zip(entry.channels, entry.available)):
            if not available:
                continue
            for value, lo, hi, voxels in found:
                if voxels >= min_voxels:
                    box = tuple(int(v) for v in lo), tuple(int(v) for v in hi)
                    targets.append(Target(entry.dataset, entry.case_id, index, channel, modality, value, *box, voxels))
    if not targets:
        which = "" if labels is None else f" with label value(s) {sorted(labels)}"
        raise InputError(f"--data: no labelled target{which} of at least {min_voxels} voxels.")
    return targets


def read_target(entry: CachedCase, target: Target, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model crop of a target, read from the memory maps.

    Returns:
        image (S, S, S) float32 z-normalised, mask (S, S, S) bool, and the crop start (3,) in the cached grid.
    """
    start = crop_start(target.bbox_min, target.bbox_max, size)
    image = read_region(entry.open_image(), start, (size,) * 3, channels=[target.channel])[0]
    label = read_region(entry.open_label(), start, (size,) * 3)
    mask = label > 0 if target.label is None else label == target.label
    return znorm_positive(image), mask, start


class DrawBatch:
    """`draw(rng) -> batch` for `shared.loader.training_batches`: one whole batch from the step's Generator.

    A crop is drawn balanced over datasets (a dataset uniformly, then one of its targets), as the official
    union of datasets, read from the memory maps, and given its flip parameters (applied by
    `shared.augment.BatchAugmentation(AUGMENTATION, crop)`, in the workers or on the GPU). Holds only paths and
    small arrays, so it forks into loader workers.

    Returns (from a call): {"image" (B, 1, S, S, S) float32, "label" (B, S, S, S) int64 binary target,
    "aug" the `sam_flips` parameters, "target" (B,) int64 index into `targets`}.
    """

    def __init__(self, entries: list[CachedCase], targets: list[Target], batch_size: int, size: int) -> None:
        self.entries, self.targets, self.batch_size, self.size = entries, targets, batch_size, size
        datasets = sorted({t.dataset for t in targets})
        self.by_dataset = [np.array([i for i, t in enumerate(targets) if t.dataset == d]) for d in datasets]

    def __call__(self, rng: np.random.Generator) -> dict:
        picked = []
        for _ in range(self.batch_size):
            pool = self.by_dataset[rng.integers(len(self.by_dataset))]
            picked.append(int(pool[rng.integers(len(pool))]))
        images, masks = [], []
        for index in picked:
            target = self.targets[index]
            image, mask, _ = read_target(self.entries[target.entry], target, self.size)
            images.append(image)
            masks.append(mask)
        return {
            "image": torch.from_numpy(np.stack(images)[:, None]),
            "label": torch.from_numpy(np.stack(masks).astype(np.int64)),
            "aug": sample_params(AUGMENTATION, self.batch_size, 1, rng),
            "target": torch.tensor(picked, dtype=torch.int64),
        }


def click_rng(seed: int, rank: int, step: int) -> np.random.Generator:
    """The Generator of step t's simulated clicks and boxes: seeded from (seed, rank, t) like the batch, as a
    stream of its own, so a resumed run continues bit-identically with no state saved."""
    return np.random.default_rng([int(seed), int(rank), int(step), 1])
