"""Batched training augmentation on any device: nnU-Net v2's default pipeline, and the lighter ones of
BrainSegFounder and SAM-Med3D, as torch functions on whole batches.

Randomness is kept apart from the work. `sample_params` draws every random quantity of a batch from a numpy
generator into a dict of small CPU tensors; `apply_augmentation` is a pure function of the batch and those
parameters. So the batch of training step t is a function of (seed, rank, t) alone, e.g.
`sample_params(pipeline, B, C, np.random.default_rng([seed, rank, t]))`, whether it is applied in a DataLoader
worker on the CPU or after the host-to-GPU copy on CUDA.

Order (nnU-Net v2 `nnUNetTrainer.get_training_transforms`, 3D patches, batchgeneratorsv2 0.3.6 classes):
rotation + scaling -> Gaussian noise -> Gaussian blur -> brightness -> contrast -> low resolution ->
inverted gamma -> gamma -> [MONAI scale -> shift] -> mirroring -> label -1 to 0. Mirroring and the per-channel
intensity changes commute, so BrainSegFounder's MONAI order (flips first) gives the same result.
Not reproduced: nnU-Net's dummy-2D mode for anisotropic patches (max(patch) / patch[0] > 3), elastic
deformation (off in nnU-Net), and the transforms after the cleanup (deep-supervision downsampling, cascade,
regions), which belong to the loss or the loader.
"""

import math
from dataclasses import dataclass, fields

import numpy as np
import torch

from shared.augment_intensity import (
    adjust_contrast,
    adjust_gamma,
    gaussian_blur,
    gaussian_noise,
    multiply_brightness,
    scale_intensity,
    shift_intensity,
)
from shared.augment_spatial import (
    LABEL_PADDING,
    mirror,
    rotate_and_scale,
    rotation_scaling_matrices,
    simulate_low_resolution,
)
from shared.errors import InputError


@dataclass(frozen=True)
class AugmentationPipeline:
    """Probabilities and ranges of one augmentation pipeline. Every probability defaults to 0 (nothing
    happens); the ranges default to nnU-Net v2's. `p_*` is per sample unless it says per channel or per axis.

    Brightness, contrast and gamma factors are drawn as nnU-Net's BGContrast: with probability 1/2 uniformly
    from (low, 1), else from (1, high) (from the whole range when it does not straddle 1).
    """

    p_rotation: float = 0.0  # nnU-Net 0.2; then every axis gets its own angle
    rotation_range: tuple[float, float] = (-math.pi / 6, math.pi / 6)  # radians, per axis
    p_scaling: float = 0.0  # nnU-Net 0.2
    scaling_range: tuple[float, float] = (0.7, 1.4)  # one factor for all axes; > 1 zooms out
    initial_patch_scaling: tuple[float, float] = (0.85, 1.25)  # only for the read region, see initial_patch_size
    p_noise: float = 0.0  # nnU-Net 0.1
    noise_std_range: tuple[float, float] = (0.0, 0.1)  # nnU-Net's "noise_variance", used as the std
    p_blur: float = 0.0  # nnU-Net 0.2
    p_blur_per_channel: float = 0.5
    blur_sigma_range: tuple[float, float] = (0.5, 1.0)  # voxels, per channel and per axis
    p_brightness: float = 0.0  # nnU-Net 0.15, multiplicative, per channel
    brightness_range: tuple[float, float] = (0.75, 1.25)
    p_contrast: float = 0.0  # nnU-Net 0.15, per channel
    contrast_range: tuple[float, float] = (0.75, 1.25)
    contrast_preserve_range: bool = True  # clip to the channel's former [min, max]
    p_low_resolution: float = 0.0  # nnU-Net 0.25
    p_low_resolution_per_channel: float = 0.5
    low_resolution_zoom_range: tuple[float, float] = (0.5, 1.0)  # per channel, same for all axes
    p_gamma_inverted: float = 0.0  # nnU-Net 0.1
    p_gamma: float = 0.0  # nnU-Net 0.3
    gamma_range: tuple[float, float] = (0.7, 1.5)  # per channel, for both gamma steps
    gamma_retain_stats: bool = True  # restore each channel's mean and std afterwards
    p_scale_intensity: float = 0.0  # MONAI RandScaleIntensity: x * (1 + f), one f for all channels
    scale_intensity_range: tuple[float, float] = (-0.1, 0.1)
    p_shift_intensity: float = 0.0  # MONAI RandShiftIntensity: x + o, one o for all channels
    shift_intensity_range: tuple[float, float] = (-0.1, 0.1)
    p_mirror: float = 0.0  # per axis

    def __post_init__(self):
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name.startswith("p_") and not 0.0 <= value <= 1.0:
                raise InputError(f"AugmentationPipeline.{f.name} must be a probability in [0, 1], got {value!r}.")
            if isinstance(value, tuple) and (len(value) != 2 or value[0] > value[1]):
                raise InputError(f"AugmentationPipeline.{f.name} must be (low, high) with low <= high, got {value!r}.")
        limits = {  # name: (lowest allowed low, whether that bound itself is allowed)
            "scaling_range": (0, False), "initial_patch_scaling": (0, False), "blur_sigma_range": (0, False),
            "brightness_range": (0, False), "gamma_range": (0, False), "low_resolution_zoom_range": (0, False),
            "noise_std_range": (0, True), "contrast_range": (0, True), "scale_intensity_range": (-1, False),
        }  # fmt: skip
        for name, (bound, inclusive) in limits.items():
            value = getattr(self, name)
            if value[0] < bound or (value[0] == bound and not inclusive):
                relation = ">=" if inclusive else ">"
                raise InputError(f"AugmentationPipeline.{name} must be {relation} {bound}, got {value!r}.")
        if self.low_resolution_zoom_range[1] > 1:
            value = self.low_resolution_zoom_range
            raise InputError(f"AugmentationPipeline.low_resolution_zoom_range must be <= 1, got {value!r}.")

    @property
    def has_spatial(self) -> bool:
        return self.p_rotation > 0 or self.p_scaling > 0


PIPELINES = {
    # nnU-Net v2 nnUNetTrainer.get_training_transforms, 3D patches
    "nnunet": AugmentationPipeline(
        p_rotation=0.2,
        p_scaling=0.2,
        p_noise=0.1,
        p_blur=0.2,
        p_brightness=0.15,
        p_contrast=0.15,
        p_low_resolution=0.25,
        p_gamma_inverted=0.1,
        p_gamma=0.3,
        p_mirror=0.5,
    ),
    # BrainSegFounder fine-tuning: RandFlipd(p 0.5) per axis, RandScaleIntensityd(0.1, p 1),
    # RandShiftIntensityd(0.1, p 1)
    "bsf_finetune": AugmentationPipeline(p_mirror=0.5, p_scale_intensity=1.0, p_shift_intensity=1.0),
    # SAM-Med3D: torchio RandomFlip(axes=(0, 1, 2)), flip_probability 0.5 per axis
    "sam_flips": AugmentationPipeline(p_mirror=0.5),
    "none": AugmentationPipeline(),
}


def _check_patch_size(patch_size) -> tuple[int, int, int]:
    patch = tuple(patch_size) if isinstance(patch_size, (tuple, list, torch.Size)) else ()
    if len(patch) != 3 or not all(isinstance(p, (int, np.integer)) and p > 0 for p in patch):
        raise InputError(f"patch_size must be three positive integers, got {patch_size!r}.")
    return tuple(int(p) for p in patch)


def initial_patch_size(patch_size, pipeline: AugmentationPipeline) -> tuple[int, int, int]:
    """The region the loader must read around a patch so that rotated and scaled patches have no empty
    corners: nnU-Net's `get_patch_size` (largest rotation about each axis, then divided by the smallest factor
    of `initial_patch_scaling`, truncated). `patch_size` itself when the pipeline never rotates or scales.

    Args:
        patch_size: (x, y, z) final patch size.

    Returns:
        (X0, Y0, Z0).
    """
    patch = _check_patch_size(patch_size)
    if not pipeline.has_spatial:
        return patch
    angle = min(max(abs(a) for a in pipeline.rotation_range), math.pi / 2) if pipeline.p_rotation > 0 else 0.0
    extent = torch.tensor(patch, dtype=torch.float64)
    for axis in range(3):
        angles = torch.zeros(1, 3, dtype=torch.float64)
        angles[0, axis] = angle
        turned = rotation_scaling_matrices(angles, torch.ones(1, dtype=torch.float64))[0]
        # nnU-Net turns the patch's size vector as a row vector (v @ R), and keeps the largest |coordinate|
        extent = torch.maximum(extent, (turned.T @ torch.tensor(patch, dtype=torch.float64)).abs())
    return tuple(int(e) for e in extent / min(pipeline.initial_patch_scaling))


def _split_uniform(rng: np.random.Generator, value_range: tuple[float, float], shape) -> np.ndarray:
    """nnU-Net's BGContrast: half of the draws from (low, 1), the other half from (1, high)."""
    low, high = value_range
    below = rng.uniform(low, 1.0, shape) if low < 1 else np.zeros(shape)
    above = rng.uniform(max(low, 1.0), high, shape)
    return np.where((rng.random(shape) < 0.5) & (low < 1), below, above)


def sample_params(
    pipeline: AugmentationPipeline, batch_size: int, channels: int, rng: np.random.Generator
) -> dict[str, torch.Tensor]:
    """Draw every random quantity of one batch's augmentation.

    Which numbers are drawn does not depend on the probabilities (every value is drawn, then neutralised where
    its step is off: angle 0, factor 1, ...), so a generator state gives the same angles whatever the
    probabilities. `apply_augmentation` goes by the flags; the neutral values only make the dict readable.
    The params of a batch, sliced along dim 0, are the params of its samples.

    Args:
        pipeline: what to draw.
        batch_size: B. channels: C, the image channels.
        rng: numpy generator, e.g. np.random.default_rng([seed, rank, step]).

    Returns:
        CPU tensors, batch first: flags bool, values float64 (radians, factors, voxels), seeds int64.

        | step | flag | values |
        |---|---|---|
        | rotation | rotation (B,) | rotation_angles (B, 3) |
        | scaling | scaling (B,) | scaling_factors (B,) |
        | noise | noise (B,) | noise_std (B,), noise_seed (B,) |
        | blur | blur (B,) | blur_channels (B, C) bool (all False where blur is), blur_sigmas (B, C, 3) |
        | brightness | brightness (B,) | brightness_factors (B, C) |
        | contrast | contrast (B,) | contrast_factors (B, C) |
        | low resolution | low_resolution (B,) | low_resolution_channels (B, C) bool, low_resolution_zooms (B, C) |
        | inverted gamma | gamma_inverted (B,) | gamma_inverted_exponents (B, C) |
        | gamma | gamma (B,) | gamma_exponents (B, C) |
        | MONAI scale | scale_intensity (B,) | scale_intensity_factors (B,) |
        | MONAI shift | shift_intensity (B,) | shift_intensity_offsets (B,) |
        | mirroring | mirror (B, 3), per axis | |
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}.")
    if not isinstance(channels, int) or channels < 1:
        raise InputError(f"channels must be a positive integer, got {channels!r}.")
    p, B, C = pipeline, batch_size, channels

    def flags(prob, shape=(B,)):
        return rng.random(shape) < prob

    def where(on, values, neutral):  # values where the transform is on, `neutral` elsewhere
        return np.where(on.reshape(on.shape + (1,) * (values.ndim - on.ndim)), values, neutral)

    out = {}
    out["rotation"] = on = flags(p.p_rotation)
    out["rotation_angles"] = where(on, rng.uniform(*p.rotation_range, (B, 3)), 0.0)
    out["scaling"] = on = flags(p.p_scaling)
    out["scaling_factors"] = where(on, rng.uniform(*p.scaling_range, B), 1.0)
    out["noise"] = on = flags(p.p_noise)
    out["noise_std"] = where(on, rng.uniform(*p.noise_std_range, B), 0.0)
    out["noise_seed"] = rng.integers(0, 2**63 - 1, B, dtype=np.int64)
    out["blur"] = on = flags(p.p_blur)
    out["blur_channels"] = on = where(on, flags(p.p_blur_per_channel, (B, C)), False)
    out["blur_sigmas"] = where(on, rng.uniform(*p.blur_sigma_range, (B, C, 3)), 0.0)
    out["brightness"] = on = flags(p.p_brightness)
    out["brightness_factors"] = where(on, _split_uniform(rng, p.brightness_range, (B, C)), 1.0)
    out["contrast"] = on = flags(p.p_contrast)
    out["contrast_factors"] = where(on, _split_uniform(rng, p.contrast_range, (B, C)), 1.0)
    out["low_resolution"] = on = flags(p.p_low_resolution)
    out["low_resolution_channels"] = on = where(on, flags(p.p_low_resolution_per_channel, (B, C)), False)
    out["low_resolution_zooms"] = where(on, rng.uniform(*p.low_resolution_zoom_range, (B, C)), 1.0)
    out["gamma_inverted"] = on = flags(p.p_gamma_inverted)
    out["gamma_inverted_exponents"] = where(on, _split_uniform(rng, p.gamma_range, (B, C)), 1.0)
    out["gamma"] = on = flags(p.p_gamma)
    out["gamma_exponents"] = where(on, _split_uniform(rng, p.gamma_range, (B, C)), 1.0)
    out["scale_intensity"] = on = flags(p.p_scale_intensity)
    out["scale_intensity_factors"] = where(on, rng.uniform(*p.scale_intensity_range, B), 0.0)
    out["shift_intensity"] = on = flags(p.p_shift_intensity)
    out["shift_intensity_offsets"] = where(on, rng.uniform(*p.shift_intensity_range, B), 0.0)
    out["mirror"] = flags(p.p_mirror, (B, 3))
    return {key: torch.from_numpy(np.ascontiguousarray(value)) for key, value in out.items()}


PARAM_KEYS = (
    "rotation", "rotation_angles", "scaling", "scaling_factors", "noise", "noise_std", "noise_seed", "blur",
    "blur_channels", "blur_sigmas", "brightness", "brightness_factors", "contrast", "contrast_factors",
    "low_resolution", "low_resolution_channels", "low_resolution_zooms", "gamma_inverted",
    "gamma_inverted_exponents", "gamma", "gamma_exponents", "scale_intensity", "scale_intensity_factors",
    "shift_intensity", "shift_intensity_offsets", "mirror",
)  # fmt: skip


def apply_augmentation(
    image: torch.Tensor,
    label: torch.Tensor | None,
    params: dict[str, torch.Tensor],
    pipeline: AugmentationPipeline,
    patch_size,
    channel_mask: torch.Tensor | None = None,
    chunk: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Augment a batch with parameters from `sample_params`: a pure function of its inputs.

    Runs in float32 on the image's device with autocast off (a bf16 grid would misplace voxels). Sample b's
    result does not depend on the other samples of the batch, nor on `chunk`.

    Args:
        image: (B, C, X0, Y0, Z0) floating read region, centred on the patch: `initial_patch_size` for a
            pipeline that rotates or scales, else the patch itself. Not modified.
        label: (B, X0, Y0, Z0) signed integer labels, or None. Not modified.
        params: from `sample_params(pipeline, B, C, rng)`.
        pipeline: the settings that are not random (contrast range clipping, gamma statistics).
        patch_size: (x, y, z) output size; the central patch is kept.
        channel_mask: optional (B, C) bool, False for missing (all-zero) channels, which then stay exactly 0.
        chunk: samples processed together. Default: the whole batch, except on the CPU, where one sample at
            a time is faster: each step passes over a batch-sized tensor, and at B x 205^3 those passes leave
            the caches (about 2x the time per sample at B = 8 than at B = 1, measured).

    Returns:
        image (B, C, x, y, z) of the input dtype and label (B, x, y, z) of the input dtype (or None), with
        label -1 (outside the read region) set to 0 as nnU-Net's RemoveLabelTransform(-1, 0).
    """
    patch = _check_patch_size(patch_size)
    params = _check_inputs(image, label, params, channel_mask, chunk)
    B = len(image)
    chunk = chunk or (1 if image.device.type == "cpu" else B)
    images, labels = [], []
    for start in range(0, B, chunk):
        part = slice(start, start + chunk)
        out_image, out_label = _augment(
            image[part],
            label[part] if label is not None else None,
            {key: value[part] for key, value in params.items()},
            pipeline,
            patch,
            channel_mask[part] if channel_mask is not None else None,
        )
        images.append(out_image)
        labels.append(out_label)
    return torch.cat(images), torch.cat(labels) if label is not None else None


def _augment(image, label, params, pipeline, patch, channel_mask):
    """The steps of `apply_augmentation` in nnU-Net's order, on one chunk of the batch."""
    dtype = image.dtype
    with torch.autocast(device_type=image.device.type, enabled=False):
        transform = params["rotation"] | params["scaling"]
        matrices = rotation_scaling_matrices(params["rotation_angles"], params["scaling_factors"])
        x, label = rotate_and_scale(image.float(), label, transform, matrices, patch)
        x = gaussian_noise(x, params["noise"], params["noise_std"], params["noise_seed"], channel_mask)
        x = gaussian_blur(x, params["blur_channels"], params["blur_sigmas"])
        x = multiply_brightness(x, params["brightness"], params["brightness_factors"])
        x = adjust_contrast(x, params["contrast"], params["contrast_factors"], pipeline.contrast_preserve_range)
        x = simulate_low_resolution(x, params["low_resolution_channels"], params["low_resolution_zooms"])
        retain = pipeline.gamma_retain_stats
        x = adjust_gamma(x, params["gamma_inverted"], params["gamma_inverted_exponents"], True, retain)
        x = adjust_gamma(x, params["gamma"], params["gamma_exponents"], False, retain)
        x = scale_intensity(x, params["scale_intensity"], params["scale_intensity_factors"])
        x = shift_intensity(x, params["shift_intensity"], params["shift_intensity_offsets"], channel_mask)
        x, label = mirror(x, label, params["mirror"])
        if label is not None:
            label.masked_fill_(label == LABEL_PADDING, 0)
    return x.to(dtype), label


def _check_inputs(image, label, params, channel_mask, chunk) -> dict[str, torch.Tensor]:
    """Validate the arguments of `apply_augmentation`; returns the params on the CPU."""
    if image.ndim != 5 or not image.is_floating_point():
        raise InputError(f"image must be a floating (B, C, X, Y, Z) tensor, got {image.dtype} {tuple(image.shape)}.")
    B, C = image.shape[:2]
    signed = (torch.int8, torch.int16, torch.int32, torch.int64)
    if label is not None and (label.shape != (B, *image.shape[2:]) or label.dtype not in signed):
        raise InputError(
            f"label must be a signed integer tensor of shape {(B, *image.shape[2:])}, got {label.dtype} "
            f"{tuple(label.shape)}."
        )
    missing = [key for key in PARAM_KEYS if key not in params]
    if missing:
        raise InputError(f"params lack {missing}: build them with sample_params.")
    params = {key: value.cpu() for key, value in params.items()}
    if params["blur_channels"].shape != (B, C):
        shape = tuple(params["blur_channels"].shape)
        raise InputError(f"params are for (batch, channels) {shape}, but the image has {(B, C)}.")
    if chunk is not None and (not isinstance(chunk, int) or chunk < 1):
        raise InputError(f"chunk must be a positive integer, got {chunk!r}.")
    if channel_mask is not None and (channel_mask.shape != (B, C) or channel_mask.dtype != torch.bool):
        got = f"{channel_mask.dtype} {tuple(channel_mask.shape)}"
        raise InputError(f"channel_mask must be a bool tensor of shape {(B, C)}, got {got}.")
    return params


class BatchAugmentation:
    """The `augment` of `shared.loader.training_batches`: batch -> batch with `apply_augmentation`.

    The batch (from a package's `draw`) holds "image" (B, C, *read) float32, optionally "label" (B, *read)
    signed integers (-1 outside the volume), "aug" (the `sample_params` dict drawn with the step's generator)
    and "channel_mask" (B, C) bool. The result holds the patch-sized image and label, without "aug".
    """

    def __init__(self, pipeline: AugmentationPipeline, patch_size):
        self.pipeline, self.patch_size = pipeline, _check_patch_size(patch_size)

    def __call__(self, batch: dict) -> dict:
        image, label = apply_augmentation(batch["image"], batch.get("label"), batch["aug"], self.pipeline,
                                          self.patch_size, channel_mask=batch.get("channel_mask"))  # fmt: skip
        out = {key: value for key, value in batch.items() if key != "aug"}
        out["image"] = image
        if label is not None:
            out["label"] = label
        return out
