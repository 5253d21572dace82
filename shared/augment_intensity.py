"""Intensity steps of the batched training augmentation (see `shared.augment`): Gaussian noise and blur,
brightness, contrast, gamma (nnU-Net v2 / batchgeneratorsv2) and MONAI's scale and shift.

Each function takes an image (B, C, X, Y, Z) float32 on any device and per-sample parameters from
`shared.augment.sample_params`, changes the image in place and returns it. Only the selected samples (or
(sample, channel) pairs) are touched: selections are read on the CPU and voxel work runs on the image's device.
A channel that is all zeros stays exactly zero in every step except noise and shift, which take a
`channel_mask` for that purpose.
"""

import math

import torch
import torch.nn.functional as F

EPS = 1e-7  # BGv2's floor on a channel's range and standard deviation in the gamma transform


def _rows(image: torch.Tensor, flags: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The samples where a (B,) flag is set: (their indices on the device, their rows). The rows are the image
    itself when every sample is flagged (always so for the CPU's one-sample chunks), else a copy that
    `_write_back` returns to the image. (None, None) when no sample is flagged."""
    idx = flags.cpu().nonzero().flatten()
    if len(idx) == 0:
        return None, None
    if len(idx) == len(image):
        return idx, image
    idx = idx.to(image.device)
    return idx, image[idx]


def _write_back(image: torch.Tensor, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    if rows is not image:
        image[idx] = rows
    return image


def _channel_stats(x: torch.Tensor) -> list[torch.Tensor]:
    """Per-channel mean, min, max and unbiased std of (N, C, X, Y, Z), each (N, C, 1, 1, 1). The std is
    two-pass from the mean: torch's std along a dimension is an order of magnitude slower on the CPU."""
    flat = x.flatten(2)
    mean = flat.mean(2)
    std = ((flat - mean[..., None]).square().sum(2) / (flat.shape[2] - 1)).sqrt()
    return [s[..., None, None, None] for s in (mean, flat.amin(2), flat.amax(2), std)]


def _per_channel(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(N, C) values -> (N, C, 1, 1, 1) float32 on like's device, to broadcast over voxels."""
    return values.to(like.device, torch.float32)[:, :, None, None, None]


def gaussian_noise(
    image: torch.Tensor, flags: torch.Tensor, std: torch.Tensor, seeds: torch.Tensor, channel_mask=None
) -> torch.Tensor:
    """batchgeneratorsv2 GaussianNoiseTransform with nnU-Net's settings: one standard deviation per sample for
    all channels (nnU-Net's `noise_variance=(0, 0.1)` is used as the standard deviation, as in BGv2 and v1).

    The noise of sample b is `torch.empty(C, X, Y, Z).normal_(0, std[b])` from a generator on the image's
    device seeded with seeds[b]: the same on every call, independent of the other samples of the batch, but
    not the same numbers on CPU and CUDA (different generators).

    Args:
        flags: (B,) bool; std: (B,) float64; seeds: (B,) int64.
        channel_mask: optional (B, C) bool; channels where it is False get no noise.
    """
    idx = flags.cpu().nonzero().flatten().tolist()
    generator = torch.Generator(device=image.device)
    for b in idx:
        generator.manual_seed(int(seeds[b]))
        noise = torch.empty(image.shape[1:], device=image.device).normal_(0.0, float(std[b]), generator=generator)
        if channel_mask is not None:
            noise *= channel_mask[b].to(image.device)[:, None, None, None]
        image[b] += noise
    return image


def gaussian_kernel(sigma: float) -> torch.Tensor:
    """batchgeneratorsv2's 1D Gaussian for `blur_dimension` (truncate 6): the odd size nearest to 6 sigma + 0.5
    (ties upwards), sampled at integer offsets and normalised to sum 1. float32, on the CPU."""
    size = 2 * math.floor((6 * sigma + 0.5) / 2) + 1
    offsets = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    pdf = torch.exp(-0.5 * (offsets / sigma).pow(2))
    return pdf / pdf.sum()


def gaussian_blur(image: torch.Tensor, channels: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """batchgeneratorsv2 GaussianBlurTransform with nnU-Net's settings: a separable Gaussian with its own sigma
    per channel and per axis (`synchronize_channels=False, synchronize_axes=False`), reflect padding.

    All selected (sample, channel) pairs are blurred together: along each axis, every pair's kernel is
    zero-padded to the longest one and applied as a weighted sum of shifted slices (BGv2 runs one conv or
    FFT per channel; the sums agree up to float rounding).

    Args:
        channels: (B, C) bool, the channels to blur; sigmas: (B, C, 3) float64.
    """
    pairs = channels.cpu().nonzero()
    if len(pairs) == 0:
        return image
    b, c = pairs[:, 0].to(image.device), pairs[:, 1].to(image.device)
    chosen = sigmas.cpu()[pairs[:, 0], pairs[:, 1]].tolist()  # N x [sx, sy, sz]
    x = image[b, c][:, None]  # (N, 1, X, Y, Z)
    for axis in range(3):
        kernels = [gaussian_kernel(s[axis]) for s in chosen]
        radius = max(len(k) for k in kernels) // 2
        weights = torch.zeros(len(kernels), 2 * radius + 1)
        for n, k in enumerate(kernels):
            weights[n, radius - len(k) // 2 : radius + len(k) // 2 + 1] = k
        weights = weights.to(image.device)[:, :, None, None, None, None]  # (N, taps, 1, 1, 1, 1)
        pad = [0] * 6
        pad[4 - 2 * axis : 6 - 2 * axis] = [radius, radius]  # F.pad lists the last axis first
        padded = F.pad(x, pad, mode="reflect")
        size = x.shape[axis + 2]
        out = padded.narrow(axis + 2, 0, size) * weights[:, 0]
        for t in range(1, 2 * radius + 1):
            out.addcmul_(padded.narrow(axis + 2, t, size), weights[:, t])
        x = out
    image[b, c] = x[:, 0]
    return image


def multiply_brightness(image: torch.Tensor, flags: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """batchgeneratorsv2 MultiplicativeBrightnessTransform: channel c of sample b times factors[b, c].

    Args:
        flags: (B,) bool; factors: (B, C) float64.
    """
    idx, x = _rows(image, flags)
    if idx is None:
        return image
    x *= _per_channel(factors[flags.cpu()], x)
    return _write_back(image, idx, x)


def adjust_contrast(image: torch.Tensor, flags: torch.Tensor, factors: torch.Tensor, preserve_range: bool):
    """batchgeneratorsv2 ContrastTransform: (x - mean) * factor + mean per channel, then clipped to the channel's
    former [min, max] when `preserve_range` (nnU-Net: True).

    Args:
        flags: (B,) bool; factors: (B, C) float64.
    """
    idx, x = _rows(image, flags)  # (N, C, X, Y, Z)
    if idx is None:
        return image
    mean, low, high, _ = _channel_stats(x)
    x.sub_(mean).mul_(_per_channel(factors[flags.cpu()], x)).add_(mean)
    if preserve_range:
        torch.maximum(torch.minimum(x, high, out=x), low, out=x)
    return _write_back(image, idx, x)


def adjust_gamma(
    image: torch.Tensor, flags: torch.Tensor, gammas: torch.Tensor, invert: bool, retain_stats: bool
) -> torch.Tensor:
    """batchgeneratorsv2 GammaTransform per channel: x -> ((x - min) / range) ** gamma * range + min, on -x and
    negated back when `invert`; with `retain_stats`, the result is shifted and scaled back to the channel's
    former mean and (unbiased) standard deviation. nnU-Net runs it twice: inverted (p 0.1) and plain (p 0.3).

    Args:
        flags: (B,) bool; gammas: (B, C) float64 > 0.
    """
    idx, x = _rows(image, flags)  # (N, C, X, Y, Z)
    if idx is None:
        return image
    if invert:
        x.neg_()
    mean, low, high, std = _channel_stats(x)
    spread = high - low
    x.sub_(low).div_(spread.clamp(min=EPS)).pow_(_per_channel(gammas[flags.cpu()], x)).mul_(spread).add_(low)
    if retain_stats:
        new_mean, _, _, new_std = _channel_stats(x)
        x.sub_(new_mean).mul_(std / new_std.clamp(min=EPS)).add_(mean)
    return _write_back(image, idx, x.neg_() if invert else x)


def scale_intensity(image: torch.Tensor, flags: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """MONAI RandScaleIntensity (channel_wise=False): every channel of sample b times (1 + factors[b]).

    Args:
        flags: (B,) bool; factors: (B,) float64.
    """
    idx, x = _rows(image, flags)
    if idx is None:
        return image
    x *= (1 + factors[flags.cpu()]).to(image.device, torch.float32)[:, None, None, None, None]
    return _write_back(image, idx, x)


def shift_intensity(image: torch.Tensor, flags: torch.Tensor, offsets: torch.Tensor, channel_mask=None):
    """MONAI RandShiftIntensity (channel_wise=False): offsets[b] added to every channel of sample b.

    Args:
        flags: (B,) bool; offsets: (B,) float64.
        channel_mask: optional (B, C) bool; channels where it is False are not shifted.
    """
    idx, x = _rows(image, flags)
    if idx is None:
        return image
    shift = offsets[flags.cpu()].to(image.device, torch.float32)[:, None].expand(-1, image.shape[1])  # (N, C)
    if channel_mask is not None:
        shift = shift * channel_mask.cpu()[flags.cpu()].to(image.device)
    x += shift[:, :, None, None, None]
    return _write_back(image, idx, x)
