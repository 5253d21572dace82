"""Intensity normalisation of (C, X, Y, Z) volumes: the z-scores and scalings the methods declare.

`normalise_intensity` is what the preprocessed cache (`shared.cache.Preprocessing.normalise`) applies once per
case, and what the predict CLIs apply to a raw scan so that it matches the training data.
"""

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
