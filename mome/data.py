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
- The augmentation is nnU-Net v2's default (shared.augment, `PIPELINES["nnunet"]`: rotation, scaling, noise,
  blur, brightness, contrast, low resolution, gamma, mirroring), as the paper trains with nnU-Net's defaults;
  the draw reads nnU-Net's larger initial patch so rotated patches have no empty corners. `--no-augment`
  reads the patch itself and skips it.
"""

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mome.labels import binarise, lesion_values
from mome.splits import training_split
from shared.augment import PIPELINES, AugmentationPipeline, BatchAugmentation, initial_patch_size, sample_params
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
        oversample: nnU-Net's oversample_foreground_percent (0.33).
        keep_labels: keep the label values as classes instead of binarising them.
        pipeline: the augmentation whose parameters the batch carries (None: no augmentation, the patch is read).
    """

    data: TrainingData
    batch_size: int
    patch_size: tuple
    oversample: float = 0.33
    keep_labels: bool = False
    pipeline: AugmentationPipeline | None = None

    @property
    def read_size(self) -> tuple:
        """The region read around a patch: nnU-Net's initial patch size with augmentation, else the patch."""
        return tuple(self.patch_size) if self.pipeline is None else initial_patch_size(self.patch_size, self.pipeline)

    def __call__(self, rng: np.random.Generator) -> dict:
        """Returns {"image": (B, 1, *read) float32, "label": (B, *read) int64, "expert": (B,) int64 and, with a
        pipeline, "aug": its parameters}; labels are -1 outside the volume (the augmentation sets them to 0)."""
        d, read = self.data, self.read_size
        picks = rng.integers(len(d.case_of), size=self.batch_size)
        images, labels = [], []
        for j, s in enumerate(picks):
            case, lesion = d.cases[d.case_of[s]], d.lesion[s]
            foreground = forced_foreground(j, self.batch_size, self.oversample)
            start = patch_start(case, read, self.patch_size, rng, foreground, classes=lesion)
            images.append(read_region(case.open_image(), start, read, channels=[int(d.channels[s])]))
            label = read_region(case.open_label(), start, read, fill=-1 if self.pipeline else 0, dtype=np.int16)
            if not self.keep_labels:  # lesion = the sample's lesion values; -1 (outside) stays -1
                label = np.where(label < 0, label, binarise(label, lesion))
            labels.append(label.astype(np.int64))
        batch = {
            "image": torch.from_numpy(np.stack(images).astype(np.float32, copy=False)),
            "label": torch.from_numpy(np.stack(labels)),
            "expert": torch.from_numpy(d.experts[picks]),
        }
        if self.pipeline is not None:
            batch["aug"] = sample_params(self.pipeline, self.batch_size, 1, rng)
        return batch


def training_batch_iterator(args, data: TrainingData, *, rank: int, device: torch.device, start: int, stop: int):
    """The augmented batches of steps [start, stop) on `device`: step t's batch depends on (seed, rank, t) only.

    So `--resume` at any epoch continues bit-identically, with any number of `--workers` (shared.loader). On
    CPU the augmentation runs in the loader workers, on CUDA on the GPU after the copy.
    """
    patch = tuple(args.patch)
    pipeline = None if args.no_augment else PIPELINES["nnunet"]
    draw = MoMEDraw(data, batch_size=args.batch_size, patch_size=patch, oversample=args.oversample,
                    keep_labels=args.keep_labels, pipeline=pipeline)  # fmt: skip
    workers = default_workers(device) if args.workers is None else args.workers
    augment = None if pipeline is None else BatchAugmentation(pipeline, patch)
    return training_batches(draw, seed=args.seed, rank=rank, start=start, stop=stop, workers=workers, device=device,
                            augment=augment)  # fmt: skip
