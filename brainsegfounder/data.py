"""Data for the three stages on the shared engine: one preprocessed cache per dataset, patches read from its
memory maps, and the whole batch of training step t drawn from that step's Generator alone.

Channels are chosen by modality name (`--channels T1 FLAIR`); a name may repeat to feed one modality to
several input channels (the paper's modality-restriction experiment): the cache stores each modality once and
the patch reader repeats it. No loop holds a dataset in memory: training reads patches, validation one
cached volume at a time.
"""

from dataclasses import dataclass

import numpy as np
import torch

from brainsegfounder.augment import two_views
from brainsegfounder.regions import region_targets
from shared.augment import sample_params
from shared.cache import CachedCase, Preprocessing, build_cache
from shared.dataset import canonical_modality, load_case
from shared.errors import InputError
from shared.intensity import normalise_intensity
from shared.sampling import forced_foreground, patch_start, random_start, read_region

# --intensity of the SSL stages -> the cache's normalisation. percentile: 0 -> 0, the 99.5th percentile of the
# non-zero voxels -> 1, clipped (our SSL default: the inner-cutout noise lives in [0, 1]); ct: the official SSL
# scaling, a CT window -1000..1000 -> 0..1 applied to MRI as it is (MRI 0 -> 0.5); zscore: per channel inside
# the brain (any channel non-zero), 0 outside, as MONAI's NormalizeIntensity(nonzero=True) of BSF fine-tuning.
INTENSITY = {"percentile": "percentile", "ct": "ct", "zscore": "zscore_nonzero"}
FOREGROUND_FRACTION = 0.33  # nnU-Net: the last third of each batch is centred on a tumour voxel


def parse_channels(names) -> list[str]:
    """Canonical modality names of `--channels` (aliases such as T1w or T2-FLAIR accepted)."""
    return [canonical_modality(n) for n in names]


def preprocessing(channels, intensity: str) -> Preprocessing:
    """The cache parameters of a stage: each modality of `channels` once, native grid, `intensity` scaling,
    label values kept (fine-tuning derives its targets from them at batch time)."""
    return Preprocessing(modalities=tuple(dict.fromkeys(channels)), normalise=INTENSITY[intensity], labels="keep")


def cache_cases(root, prep: Preprocessing, case_ids, *, split: str = "Tr", cache_root=None, processes: int = 1):
    """The `CachedCase` entries of `case_ids`, preprocessing those not cached yet (progress bar)."""
    if not case_ids:
        return []
    return build_cache(root, prep, case_ids=case_ids, split=split, cache_root=cache_root, processes=processes)


def channel_positions(case: CachedCase, channels) -> tuple:
    """Index of each of `channels` (repeats allowed) among the cached channels of `case`."""
    return tuple(case.channels.index(m) for m in channels)


def read_volume(case: CachedCase, channels) -> tuple[np.ndarray, np.ndarray | None]:
    """One cached volume in memory, for validation: image (C, X, Y, Z) float32 in `channels` order, label or None."""
    image = np.ascontiguousarray(case.open_image()[list(channel_positions(case, channels))], dtype=np.float32)
    label = np.asarray(case.open_label()) if case.label is not None else None
    return image, label


def load_image(case, channels):
    """An image to segment (a `shared.dataset.Case`), preprocessed as the fine-tuning cache: (C, X, Y, Z) in
    `channels` order and the `Volume` of its first channel (grid, affine and header of the prediction)."""
    unique = list(dict.fromkeys(channels))
    image, _, reference, present = load_case(case, modalities=unique, check_labels=False)
    image = normalise_intensity(image, INTENSITY["zscore"])
    return image[[present.index(m) for m in channels]], reference


@dataclass(frozen=True)
class SSLDraw:
    """One pretraining batch from a step's Generator: `batch_size` random volumes x `crops` random crops each,
    then the two rotated and cut-out views of every crop (`brainsegfounder.augment.two_views`).

    A module-level callable so that loader workers can run it (it holds paths and small tuples only).
    """

    cases: tuple  # CachedCase of the training volumes
    channels: tuple  # modality of each input channel
    batch_size: int
    crops: int
    patch: tuple

    def __call__(self, rng: np.random.Generator) -> dict:
        picks = rng.integers(0, len(self.cases), size=self.batch_size)
        out = []
        for i in picks:
            case = self.cases[int(i)]
            image = case.open_image()
            for _ in range(self.crops):
                start = random_start(case.shape, self.patch, self.patch, rng)
                out.append(read_region(image, start, self.patch, channels=channel_positions(case, self.channels)))
        return two_views(torch.from_numpy(np.stack(out)), rng)  # (2N, C, *patch) inputs and targets, (2N,) labels


def ssl_validation_views(case: CachedCase, channels, patch, crops: int, rng: np.random.Generator) -> dict:
    """The views of `crops` random crops of one validation volume (fixed by `rng`), as `SSLDraw` makes them."""
    image = case.open_image()
    positions = channel_positions(case, channels)
    out = [read_region(image, random_start(case.shape, patch, patch, rng), patch, channels=positions)
           for _ in range(crops)]  # fmt: skip
    return two_views(torch.from_numpy(np.stack(out)), rng)


@dataclass(frozen=True)
class SegDraw:
    """One fine-tuning batch from a step's Generator: which cases, where each patch starts (nnU-Net placement:
    the last third of the batch centred on a stored foreground voxel), the image and label patches of the
    augmentation's read size, and the augmentation parameters (`shared.augment.sample_params`).

    The label keeps its values; `brainsegfounder.regions.region_channels` turns it into the targets after the
    augmentation, so the regions never depend on how labels are resampled.
    """

    cases: tuple  # CachedCase of the training subset
    channels: tuple
    batch_size: int
    patch: tuple  # final patch
    read_size: tuple  # shared.augment.initial_patch_size(patch, pipeline)
    pipeline: object  # shared.augment.AugmentationPipeline of the fine-tuning

    def __call__(self, rng: np.random.Generator) -> dict:
        picks = rng.integers(0, len(self.cases), size=self.batch_size)
        images, labels = [], []
        for b, i in enumerate(picks):
            case = self.cases[int(i)]
            foreground = forced_foreground(b, self.batch_size, FOREGROUND_FRACTION)
            start = patch_start(case, self.read_size, self.patch, rng, foreground=foreground)
            images.append(read_region(case.open_image(), start, self.read_size,
                                      channels=channel_positions(case, self.channels)))  # fmt: skip
            # nnU-Net pads labels with -1 outside the volume; the augmentation turns -1 into background
            labels.append(read_region(case.open_label(), start, self.read_size, fill=-1, dtype=np.int16))
        return {
            "image": torch.from_numpy(np.stack(images)),  # (B, C, *read_size) float32
            "label": torch.from_numpy(np.stack(labels)).long(),  # (B, *read_size) label values, -1 outside
            "aug": sample_params(self.pipeline, self.batch_size, len(self.channels), rng),
        }


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
