"""MoME training data: every channel of every case is one single-modality sample (paper 2.3, Suppl. Table II).

A BraTS-like case with T1, T1ce, T2 and FLAIR gives four samples, each a 1-channel image with the case's
lesion mask; the modality of a sample picks the expert that Eq. 2 supervises.

The data path (shared/cache.py, shared/sampling.py, shared/loader.py):
- One preprocessed cache per dataset (`PREPROCESSING`): every channel z-scored over the whole volume (the
  official code disables nnU-Net's crop-to-nonzero, so background zeros count in the statistics), on the
  native grid (MoME's inputs are registered to MNI152 at 1 mm beforehand). The labels are cached with their
  values; a missing channel file is a zero channel marked unavailable and never sampled.
- Binary targets are made per sample, at draw time: lesion = the label values of the sample's (dataset,
  modality) (`mome.labels.lesion_values`: every value > 0, or a `--label-rule` such as BraTS T1ce = tumour
  core). So one cache serves the default, every label rule and `--keep-labels`, and the foreground
  oversampling centres patches on the stored voxels of exactly those classes (nnU-Net's class locations):
  a T1ce sample under the tumour-core rule is never centred on edema.
- `MoMEDraw` builds one whole batch from the step's Generator: which (case, channel) samples (uniformly with
  replacement, as nnU-Net draws cases), nnU-Net's forced foreground (with B = 2 the second sample), the patch
  starts and the augmentation parameters; it reads only the patch voxels from the memory maps.
"""

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mome.labels import binarise, lesion_values
from mome.splits import training_split
from shared.cache import Preprocessing, build_cache
from shared.errors import InputError
from shared.harness import DistInfo
from shared.loader import default_workers, training_batches
from shared.sampling import forced_foreground, patch_start, read_region

# MoME's preprocessing: whole-volume z-score per channel, native grid, label values kept (binarised per sample)
PREPROCESSING = Preprocessing(missing="zero", normalise="zscore", labels="keep")


@dataclass
class TrainingData:
    """The cached cases of a run and its samples: sample s is channel `channels[s]` of case `cases[case_of[s]]`."""

    cases: list  # shared.cache.CachedCase of every training case, datasets one after the other
    case_of: np.ndarray  # (S,) int64 index into `cases`
    channels: np.ndarray  # (S,) int64 channel index in the cached image
    modalities: list  # (S,) modality name of each sample
    experts: np.ndarray  # (S,) int64 expert index (1[X in M_i] of Eq. 2), -1 when no expert has the modality
    lesion: list  # (S,) tuple of the label values that are lesion for this sample
    grid: tuple | None  # the shape shared by every cached image, None when they differ

    def describe(self) -> str:
        """One line per (dataset, modality) with its sample count, for the start of a run."""
        counts = Counter((self.cases[c].dataset, m) for c, m in zip(self.case_of, self.modalities))
        return "\n".join(f"  {d:40s} {m:6s} {n:4d} samples" for (d, m), n in sorted(counts.items()))


def cache_training_cases(args, split: dict, dist_info: DistInfo) -> list:
    """Build or reuse the cache of every --data dataset (rank 0 first) and return the training cases' entries."""

    def entries() -> list:
        out = []
        for root in args.data:
            ids = split[Path(root).name]["train"]
            out += build_cache(root, PREPROCESSING, case_ids=ids, labelled_only=True, cache_root=args.cache,
                               progress=dist_info.is_main)  # fmt: skip
        return out

    if dist_info.world_size > 1:
        if dist_info.is_main:
            entries()
        torch.distributed.barrier()  # rank 0's cache is complete before the other ranks read it
    return entries()  # (on rank 0 after a build: only reads and checks the entries it wrote)


def training_data(args, dist_info: DistInfo, split: dict, only_modality: str | None = None) -> TrainingData:
    """The samples of a run: every available channel of every labelled training case.

    Args:
        split: {dataset: {"train": ids, ...}} (`mome.splits.training_split`).
        only_modality: phase 1 keeps the samples of this modality; "all" keeps every sample (the universal
            nnU-Net), whether or not an expert has its modality; None (phase 2) those with an expert.
    """
    cases = cache_training_cases(args, split, dist_info)
    if not cases:
        raise InputError("no labelled training case in --data for the chosen split.")
    lesion = lesion_values(args.data, args.label_rule)
    rows = []
    for i, case in enumerate(cases):
        for c, (modality, available) in enumerate(zip(case.channels, case.available)):
            if available:
                expert = args.modalities.index(modality) if modality in args.modalities else -1
                rows.append((i, c, modality, expert, lesion[(case.dataset, modality)]))
    skipped = sorted({r[2] for r in rows if r[3] < 0})
    if only_modality != "all":
        if skipped and only_modality is None and dist_info.is_main:
            print(f"skipping samples of modalities without an expert: {skipped} (experts: {args.modalities})")
        rows = [r for r in rows if r[3] >= 0 and only_modality in (None, r[2])]
    if not rows:
        raise InputError(f"--data holds no training image of modality {only_modality or args.modalities} in the "
                         "chosen split.")  # fmt: skip
    shapes = {tuple(case.shape) for case in cases}
    return TrainingData(
        cases=cases,
        case_of=np.array([r[0] for r in rows], dtype=np.int64),
        channels=np.array([r[1] for r in rows], dtype=np.int64),
        modalities=[r[2] for r in rows],
        experts=np.array([r[3] for r in rows], dtype=np.int64),
        lesion=[r[4] for r in rows],
        grid=shapes.pop() if len(shapes) == 1 else None,
    )


def prepare_data(args, dist_info: DistInfo, only_modality: str | None = None) -> tuple[dict, TrainingData]:
    """The run's split (from --split-file or nnU-Net's k-folds) and its training samples."""
    split = training_split(args.data, args.split_file, fold=args.fold, folds=args.folds)
    return split, training_data(args, dist_info, split, only_modality=only_modality)


@dataclass
class MoMEDraw:
    """draw(rng) -> one training batch (module level, so DataLoader workers can pickle it).

    Args:
        data: the run's samples.
        batch_size: B.
        patch_size: the final patch (after augmentation).
        read_size: the region read around it (the augmentation's initial patch size; the patch without one).
        oversample: nnU-Net's oversample_foreground_percent (0.33).
        keep_labels: keep the label values as classes instead of binarising them.
    """

    data: TrainingData
    batch_size: int
    patch_size: tuple
    read_size: tuple
    oversample: float = 0.33
    keep_labels: bool = False

    def __call__(self, rng: np.random.Generator) -> dict:
        """Returns {"image": (B, 1, *read) float32, "label": (B, *read) int64, "expert": (B,) int64}."""
        d = self.data
        picks = rng.integers(len(d.case_of), size=self.batch_size)
        images, labels = [], []
        for j, s in enumerate(picks):
            case, lesion = d.cases[d.case_of[s]], d.lesion[s]
            foreground = forced_foreground(j, self.batch_size, self.oversample)
            start = patch_start(case, self.read_size, self.patch_size, rng, foreground, classes=lesion)
            images.append(read_region(case.open_image(), start, self.read_size, channels=[int(d.channels[s])]))
            label = read_region(case.open_label(), start, self.read_size)
            labels.append(label.astype(np.int64) if self.keep_labels else binarise(label, lesion).astype(np.int64))
        return {
            "image": torch.from_numpy(np.stack(images).astype(np.float32, copy=False)),
            "label": torch.from_numpy(np.stack(labels)),
            "expert": torch.from_numpy(d.experts[picks]),
        }


def training_batch_iterator(args, data: TrainingData, *, rank: int, device: torch.device, start: int, stop: int):
    """The batches of steps [start, stop) of a run on `device`: step t's batch is a function of (seed, rank, t).

    So `--resume` at any epoch continues bit-identically, with any number of `--workers` (shared.loader).
    """
    patch = tuple(args.patch)
    draw = MoMEDraw(data, batch_size=args.batch_size, patch_size=patch, read_size=patch, oversample=args.oversample,
                    keep_labels=args.keep_labels)  # fmt: skip
    workers = default_workers(device) if args.workers is None else args.workers
    return training_batches(draw, seed=args.seed, rank=rank, start=start, stop=stop, workers=workers, device=device)
