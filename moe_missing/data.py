"""Training data of the missing-modality model: cases at 1 mm in the shared cache, 96^3 crops, per-crop z-score.

Paper 3.2: images are resampled to 1 mm isotropic, random crops are centred on a lesion voxel with
probability 0.8, and every crop is z-normalised per channel; no augmentation is named (`--augment` adds
nnU-Net's). The resampling happens once, in the preprocessed cache (`shared.cache`, parameters in
`preprocessing`); a case whose channel file is missing keeps a zero channel marked unavailable there, so
modality dropout only draws codes without it and a zero channel is never brought back to life.

`MissingModalityBatches` builds the whole batch of one training step from that step's Generator: the cases,
the crop positions, the modality-dropout code of every crop (Eq. 2's uniform draw), the gate noise of
paper 3.2 and, with `--augment`, the augmentation parameters, so the batch of step t is a pure function of
(seed, rank, t) (`shared.loader`).
`read_case` reads a raw case for prediction and evaluation, which work on the native files.
"""

from dataclasses import dataclass

import numpy as np
import torch

from moe_missing.losses import all_codes, sample_codes
from shared.augment import PIPELINES, AugmentationPipeline, initial_patch_size, sample_params
from shared.cache import CachedCase, Preprocessing
from shared.dataset import list_cases, load_case
from shared.errors import InputError
from shared.sampling import patch_start, read_region

TARGET_SPACING = (1.0, 1.0, 1.0)  # mm, paper 3.2


def preprocessing(modalities) -> Preprocessing:
    """The cache parameters of this method: the channels in the model's order, a missing file as a zero
    channel, no intensity change (crops are z-scored at draw time), 1 mm linear resampling, binary labels."""
    return Preprocessing(modalities=tuple(modalities), missing="zero", normalise="none", spacing=TARGET_SPACING,
                         image_order=1, labels="binary")  # fmt: skip


def dataset_modalities(root) -> tuple[str, ...]:
    """The modalities of a dataset in channel order (canonical names), read from its dataset.json."""
    cases = list_cases(root)
    if not cases:
        raise InputError(f"{root}: no case found in imagesTr.")
    return tuple(cases[0].images)


def read_case(case, modalities) -> tuple[np.ndarray, np.ndarray | None, object, tuple]:
    """All K channels of a raw case in `modalities` order, zeros where a channel file is missing.

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


def zscore_patches(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-sample, per-channel z-score of crops (B, K, D, H, W); an all-zero (missing) channel stays zero."""
    dims = tuple(range(2, x.ndim))
    mean = x.mean(dims, keepdim=True)
    std = x.std(dims, keepdim=True, correction=0).clamp_min(eps)
    return (x - mean) / std


def has_channels(case: CachedCase, code) -> bool:
    """Whether `case` has every channel the code asks for (a dedicated model trains only on such cases)."""
    return all(a >= int(c) for a, c in zip(case.available, code))


def case_codes(available, dedicated: str | None) -> list[tuple]:
    """The distinct configurations a case is scored under: the codes a model serves (a dedicated model its own,
    any other all 2^K - 1) without the channels the case lacks, each once; a dedicated model's code only when
    the case has all of its channels (else it is not that model's input)."""
    K = len(available)
    served = [tuple(int(c) for c in dedicated)] if dedicated else [tuple(map(int, c)) for c in all_codes(K).tolist()]
    out = []
    for code in served:
        used = tuple(c * int(a) for c, a in zip(code, available))
        if any(used) and used not in out and (not dedicated or used == code):
            out.append(used)
    return out


@dataclass
class MissingModalityBatches:
    """draw(rng) -> the batch of one training step (a module-level callable, so loader workers can run it).

    Args:
        cases: the cached training cases (memory-mapped on read; only paths and small index arrays are held).
        batch_size: crops B per step.
        patch: crop size (D, H, W) at 1 mm.
        fg_prob: probability that a crop is centred on a lesion voxel (paper: 0.8), drawn per crop.
        dedicated: the fixed code of a dedicated model ("101"), or None for modality dropout.
        pipeline: the augmentation (`shared.augment.PIPELINES`); "none" (the paper) reads the crop itself,
            another reads its larger initial patch around it and draws its parameters, which
            `shared.augment.BatchAugmentation` then applies (in a loader worker on CPU, on the GPU on CUDA).

    Returns (per call), a dict of:
        image: (B, K, *read) float32 full-modality crops, z-scored per crop and channel (missing channels 0);
            read = patch, or the pipeline's initial patch size;
        label: (B, *read) int64 (-1 outside the volume when augmenting: nnU-Net's padding, cleaned to 0 there);
        available: (B, K) float, 1 where the case has the channel; channel_mask: the same as bool, so that the
            augmentation keeps a missing channel exactly zero;
        code: (B, K) float, the dropped view's code (uniform over the non-empty subsets of `available`, Eq. 2),
            or the dedicated code;
        eps: (2B, K) float standard-normal draws for the gate noise of the full and the dropped view;
        aug: the augmentation parameters (only with a pipeline other than "none").
    """

    cases: list
    batch_size: int
    patch: tuple
    fg_prob: float = 0.8
    dedicated: str | None = None
    pipeline: AugmentationPipeline = PIPELINES["none"]

    @property
    def augments(self) -> bool:
        return self.pipeline != PIPELINES["none"]

    def __call__(self, rng: np.random.Generator) -> dict:
        read = initial_patch_size(self.patch, self.pipeline) if self.augments else tuple(self.patch)
        fill = -1 if self.augments else 0  # nnU-Net pads the labels of a read region with -1
        images, labels, available = [], [], []
        for _ in range(self.batch_size):
            case = self.cases[int(rng.integers(len(self.cases)))]
            foreground = bool(rng.random() < self.fg_prob)  # paper: 80 % of crops centred on a lesion voxel
            start = patch_start(case, read, self.patch, rng, foreground=foreground)
            images.append(read_region(case.open_image(), start, read))
            labels.append(read_region(case.open_label(), start, read, fill=fill, dtype=np.int16))
            available.append(case.available)
        image = zscore_patches(torch.from_numpy(np.stack(images).astype(np.float32)))
        available = torch.tensor(available, dtype=torch.float32)  # (B, K)
        B, K = available.shape
        if self.dedicated is None:
            code = sample_codes(available, rng)
        else:
            code = torch.tensor([float(c) for c in self.dedicated]).expand(B, -1).clone()
        eps = torch.from_numpy(rng.standard_normal((2 * B, K)).astype(np.float32))
        batch = {"image": image, "label": torch.from_numpy(np.stack(labels)).long(), "available": available,
                 "channel_mask": available > 0, "code": code, "eps": eps}  # fmt: skip
        if self.augments:
            batch["aug"] = sample_params(self.pipeline, B, K, rng)
        return batch
