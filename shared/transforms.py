"""Training-time array transforms: z-scoring, padding, patch sampling and light augmentations.

Arrays are numpy: images (C, X, Y, Z) float32, labels (X, Y, Z) integer. Every random function takes a
`np.random.Generator`, so a run is reproducible from its seed and each DDP rank can draw its own patches.
Spatial transforms take the label too and move it exactly as the image; intensity transforms take only the
image.
"""

from collections.abc import Sequence

import numpy as np

from shared.errors import InputError


def zscore(image: np.ndarray, mask: np.ndarray | None = None, eps: float = 1e-8) -> np.ndarray:
    """Per-channel z-score: (x - mean) / max(std, eps).

    Args:
        image: (C, X, Y, Z) array.
        mask: optional (X, Y, Z) boolean brain mask; the statistics are taken inside it and voxels outside
            it are set to 0.
        eps: floor on the standard deviation, so a constant channel becomes zeros instead of NaN.

    Returns:
        (C, X, Y, Z) float32 array.
    """
    image = np.asarray(image, dtype=np.float32)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != image.shape[1:]:
            raise InputError(f"mask shape {mask.shape} does not match image spatial shape {image.shape[1:]}.")
        if not mask.any():
            raise InputError("mask is empty, so no statistics can be taken inside it.")
    out = np.empty_like(image)
    for c in range(image.shape[0]):
        # float64 statistics: float32 sums over millions of voxels lose digits.
        values = image[c][mask] if mask is not None else image[c]
        mean = values.mean(dtype=np.float64)
        std = values.std(dtype=np.float64)
        out[c] = (image[c] - mean) / max(std, eps)
    if mask is not None:
        out[:, ~mask] = 0.0
    return out


def percentile_scale(image: np.ndarray, percentile: float = 99.5) -> np.ndarray:
    """Per channel, map 0 -> 0 and the `percentile` of the non-zero voxels -> 1, clipped to [0, 1].

    Args:
        image: (C, X, Y, Z) array.
    Returns:
        (C, X, Y, Z) float32 array; a channel without non-zero voxels is divided by 1.
    """
    out = np.empty(image.shape, dtype=np.float32)
    for c, channel in enumerate(image):
        nonzero = channel[channel != 0]
        top = float(np.percentile(nonzero, percentile)) if nonzero.size else 1.0
        out[c] = np.clip(channel / max(top, 1e-8), 0.0, 1.0)
    return out


def normalise_intensity(image: np.ndarray, mode: str) -> np.ndarray:
    """One of the intensity normalisations the methods declare, on a (C, X, Y, Z) array (float32 out).

    Modes: "none"; "zscore" per channel over the whole volume (MoME: the official code keeps background zeros
    in the statistics); "zscore_nonzero" per channel inside the voxels where any channel is non-zero, 0
    outside (MONAI NormalizeIntensity(nonzero=True), BrainSegFounder fine-tuning); "percentile"
    (`percentile_scale`); "ct" the CT window -1000..1000 -> 0..1, clipped (the official Swin-UNETR SSL
    scaling, which maps MRI 0 to 0.5).
    """
    image = np.asarray(image, dtype=np.float32)
    if mode == "none":
        return image
    if mode == "zscore":
        return zscore(image)
    if mode == "zscore_nonzero":
        mask = np.any(image != 0, axis=0)
        return zscore(image, mask=mask) if mask.any() else np.zeros_like(image)
    if mode == "percentile":
        return percentile_scale(image)
    if mode == "ct":
        return np.clip((image + 1000.0) / 2000.0, 0.0, 1.0)
    raise InputError(f"intensity normalisation {mode!r} is not one of none, zscore, zscore_nonzero, percentile, ct.")


def pad_to_min_shape(
    image: np.ndarray, label: np.ndarray | None, min_shape: Sequence[int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Zero-pad every spatial axis shorter than `min_shape`, half before and half after (odd extra after).

    Args:
        image: (C, X, Y, Z) array.
        label: (X, Y, Z) array or None.
        min_shape: (x, y, z) minimum spatial size.

    Returns:
        (image, label) padded with constant 0; the inputs themselves when nothing needs padding.
    """
    before = [max(m - s, 0) // 2 for s, m in zip(image.shape[1:], min_shape)]
    after = [max(m - s, 0) - b for s, m, b in zip(image.shape[1:], min_shape, before)]
    if not any(before) and not any(after):
        return image, label
    spatial = list(zip(before, after))
    image = np.pad(image, [(0, 0), *spatial], mode="constant", constant_values=0)
    if label is not None:
        label = np.pad(label, spatial, mode="constant", constant_values=0)
    return image, label


def sample_patch(
    image: np.ndarray,
    label: np.ndarray | None,
    patch_size: Sequence[int],
    rng: np.random.Generator,
    fg_prob: float = 0.33,
    fg_classes: Sequence[int] | None = None,
) -> tuple[np.ndarray, np.ndarray | None, tuple[int, int, int]]:
    """A random 3D patch, centred on a foreground voxel with probability `fg_prob` (nnU-Net's oversampling).

    A foreground patch is centred on a voxel drawn uniformly among the foreground voxels, then shifted to lie
    inside the volume; a volume without foreground (or without label) gets a uniform patch. Volumes smaller
    than the patch are zero-padded first (see `pad_to_min_shape`).

    Args:
        image: (C, X, Y, Z) array.
        label: (X, Y, Z) integer array, or None (self-supervised training: always uniform).
        patch_size: (x, y, z) patch size.
        rng: random generator.
        fg_prob: probability of a foreground-centred patch.
        fg_classes: label values that count as foreground; None means every label > 0.

    Returns:
        image patch (C, x, y, z), label patch (x, y, z) or None, and the patch origin in the coordinates of
        the unpadded input (negative along an axis that was padded before).
    """
    patch_size = tuple(int(p) for p in patch_size)
    if len(patch_size) != 3 or min(patch_size) < 1:
        raise InputError(f"patch_size must be three positive ints, got {patch_size}.")
    shift = [max(p - s, 0) // 2 for s, p in zip(image.shape[1:], patch_size)]  # padding added before
    image, label = pad_to_min_shape(image, label, patch_size)
    shape = image.shape[1:]

    centre = None
    if rng.random() < fg_prob and label is not None:
        fg = label > 0 if fg_classes is None else np.isin(label, fg_classes)
        flat = np.flatnonzero(fg)
        if flat.size:
            centre = np.unravel_index(flat[rng.integers(flat.size)], shape)
    if centre is None:
        origin = [int(rng.integers(0, s - p + 1)) for s, p in zip(shape, patch_size)]
    else:
        origin = [int(np.clip(c - p // 2, 0, s - p)) for c, s, p in zip(centre, shape, patch_size)]

    window = tuple(slice(o, o + p) for o, p in zip(origin, patch_size))
    image_patch = image[(slice(None), *window)].copy()
    label_patch = label[window].copy() if label is not None else None
    return image_patch, label_patch, tuple(o - b for o, b in zip(origin, shift))


def random_flip(
    image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator, p: float = 0.5
) -> tuple[np.ndarray, np.ndarray | None]:
    """Mirror each spatial axis independently with probability `p` (image and label alike).

    Args:
        image: (C, X, Y, Z) array.
        label: (X, Y, Z) array or None.
        rng: random generator (draws one number per axis).
        p: flip probability per axis.

    Returns:
        (image, label), contiguous copies.
    """
    for axis in range(3):
        if rng.random() < p:
            image = np.flip(image, axis=axis + 1)
            label = np.flip(label, axis=axis) if label is not None else None
    return np.ascontiguousarray(image), (np.ascontiguousarray(label) if label is not None else None)


def rot90(
    image: np.ndarray, label: np.ndarray | None, k: int, axes: tuple[int, int]
) -> tuple[np.ndarray, np.ndarray | None]:
    """Rotate image and label by k * 90 degrees in the plane of spatial `axes` (0..2), as `np.rot90`.

    Returns:
        (image, label), contiguous copies.
    """
    image = np.rot90(image, k=k, axes=(axes[0] + 1, axes[1] + 1))
    label = np.rot90(label, k=k, axes=axes) if label is not None else None
    return np.ascontiguousarray(image), (np.ascontiguousarray(label) if label is not None else None)


def random_rot90(
    image: np.ndarray, label: np.ndarray | None, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray | None]:
    """Rotate by 90, 180 or 270 degrees in one random plane whose two axes have the same size.

    Only such planes are used so that the patch keeps its shape (any plane of a cubic patch); an input with
    no square plane is returned unchanged. A 180-degree turn in a non-square plane is already covered by
    flipping both of its axes.

    Args:
        image: (C, X, Y, Z) array.
        label: (X, Y, Z) array or None.
        rng: random generator.

    Returns:
        (image, label).
    """
    shape = image.shape[1:]
    planes = [(a, b) for a, b in ((0, 1), (0, 2), (1, 2)) if shape[a] == shape[b]]
    if not planes:
        return image, label
    axes = planes[int(rng.integers(len(planes)))]
    k = int(rng.integers(1, 4))
    return rot90(image, label, k=k, axes=axes)


def scale_shift_intensity(
    image: np.ndarray,
    rng: np.random.Generator,
    scale_range: tuple[float, float] = (0.9, 1.1),
    shift_range: tuple[float, float] = (-0.1, 0.1),
) -> np.ndarray:
    """x * s + b with s and b drawn uniformly per channel (in z-score units after `zscore`).

    Args:
        image: (C, X, Y, Z) array.
        rng: random generator.
        scale_range: (low, high) of the multiplicative factor s.
        shift_range: (low, high) of the additive offset b.

    Returns:
        (C, X, Y, Z) float32 array.
    """
    C = image.shape[0]
    scale = rng.uniform(*scale_range, size=C).astype(np.float32)
    shift = rng.uniform(*shift_range, size=C).astype(np.float32)
    return (image * scale[:, None, None, None] + shift[:, None, None, None]).astype(np.float32)


def adjust_gamma(image: np.ndarray, gamma: float, invert: bool = False) -> np.ndarray:
    """Gamma curve per channel on min-max normalised values, mapped back to the channel's range.

    z-scored images are partly negative and a negative number to a real power is NaN, so each channel is
    mapped to [0, 1] by (x - min) / (max - min), raised to `gamma`, and mapped back to [min, max]: min and
    max stay where they are, values in between move down (gamma > 1) or up (gamma < 1), and a value keeps
    or changes sign only through that monotone remapping. `invert` applies the curve to -x and negates the
    result (nnU-Net's inverted-gamma variant), bending the bright end instead of the dark end. A constant
    channel is returned unchanged.

    Args:
        image: (C, X, Y, Z) array.
        gamma: exponent, > 0.
        invert: apply the curve to the negated image.

    Returns:
        (C, X, Y, Z) float32 array.
    """
    if gamma <= 0:
        raise InputError(f"gamma must be positive, got {gamma}.")
    sign = -1.0 if invert else 1.0
    out = np.empty(image.shape, dtype=np.float32)
    for c in range(image.shape[0]):
        x = sign * image[c].astype(np.float64)
        low, high = x.min(), x.max()
        if high > low:
            x = ((x - low) / (high - low)) ** gamma * (high - low) + low
        out[c] = sign * x
    return out


def random_gamma(
    image: np.ndarray, rng: np.random.Generator, gamma_range: tuple[float, float] = (0.7, 1.5), p_invert: float = 0.0
) -> np.ndarray:
    """`adjust_gamma` with gamma drawn uniformly from `gamma_range`, inverted with probability `p_invert`.

    Returns:
        (C, X, Y, Z) float32 array.
    """
    invert = bool(rng.random() < p_invert)
    return adjust_gamma(image, gamma=float(rng.uniform(*gamma_range)), invert=invert)


def gaussian_noise(
    image: np.ndarray, rng: np.random.Generator, std_range: tuple[float, float] = (0.0, 0.1)
) -> np.ndarray:
    """Add zero-mean Gaussian noise whose standard deviation is drawn uniformly from `std_range`.

    Returns:
        (C, X, Y, Z) float32 array.
    """
    std = rng.uniform(*std_range)
    return (image + rng.normal(0.0, std, size=image.shape)).astype(np.float32)


def augment(
    image: np.ndarray,
    label: np.ndarray | None,
    rng: np.random.Generator,
    p_flip: float = 0.5,
    p_rot90: float = 0.5,
    p_scale_shift: float = 0.5,
    p_gamma: float = 0.3,
    p_noise: float = 0.1,
) -> tuple[np.ndarray, np.ndarray | None]:
    """Light augmentation of one patch: flips, 90-degree rotation, then intensity scale/shift, gamma, noise.

    The spatial transforms move image and label together; the intensity ones touch only the image.

    Args:
        image: (C, X, Y, Z) array.
        label: (X, Y, Z) array or None.
        rng: random generator.
        p_flip: flip probability per axis.
        p_rot90: probability of a 90-degree rotation (see `random_rot90` for which planes).
        p_scale_shift: probability of `scale_shift_intensity` with its default ranges.
        p_gamma: probability of `random_gamma` with its default range.
        p_noise: probability of `gaussian_noise` with its default range.

    Returns:
        (image float32, label).
    """
    image, label = random_flip(image, label, rng, p=p_flip)
    if rng.random() < p_rot90:
        image, label = random_rot90(image, label, rng)
    if rng.random() < p_scale_shift:
        image = scale_shift_intensity(image, rng)
    if rng.random() < p_gamma:
        image = random_gamma(image, rng)
    if rng.random() < p_noise:
        image = gaussian_noise(image, rng)
    return image.astype(np.float32, copy=False), label
