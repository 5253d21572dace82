"""Sliding-window inference over a whole 3D volume with Gaussian blending and optional mirroring TTA.

The volume is cut into overlapping patch-sized tiles, several tiles go through the model in one forward
call, and the tile predictions are blended with a Gaussian importance map that trusts tile centres more
than tile borders (nnU-Net, Isensee et al. 2021; MONAI `mode="gaussian"`).
"""

import itertools
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from tqdm import tqdm

from shared.errors import InputError


def tile_starts(size: int, patch: int, overlap: float) -> list[int]:
    """Start indices of the tiles along one axis.

    The step between tiles is at most `max_step = floor(patch * (1 - overlap))` (at least 1); the tiles are
    spread evenly so that the first starts at 0 and the last ends exactly at the border (nnU-Net's rule).
    MONAI instead steps by exactly `max_step` and shifts only the last tile back, so its starts can differ
    (e.g. size 196, patch 128, overlap 0.5: ours 0, 34, 68; MONAI 0, 64, 68).

    Args:
        size: length of the axis (voxels).
        patch: tile length along the axis (voxels).
        overlap: wanted fraction of overlap between neighbouring tiles, in [0, 1).

    Returns:
        Sorted start indices; `[0]` when `size <= patch` (the caller pads the volume up to the patch).

    Example: size 10, patch 4, overlap 0.5 -> max_step 2, 3 steps cover 10 - 4 = 6 -> starts [0, 2, 4, 6].
    """
    if not 0.0 <= overlap < 1.0:
        raise InputError(f"overlap must be in [0, 1), got {overlap}.")
    if patch < 1:
        raise InputError(f"patch size must be positive, got {patch}.")
    if size <= patch:
        return [0]
    # The small epsilon keeps e.g. 10 * (1 - 0.7) = 2.9999999999999996 from flooring to 2.
    max_step = max(1, math.floor(patch * (1.0 - overlap) + 1e-9))
    num_tiles = math.ceil((size - patch) / max_step) + 1
    actual_step = (size - patch) / (num_tiles - 1)
    # actual_step <= max_step (an integer), so rounded neighbours are never more than max_step apart.
    return [int(round(i * actual_step)) for i in range(num_tiles)]


def gaussian_importance_map(
    patch_size: Sequence[int],
    sigma_scale: float = 1.0 / 8,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    min_value: float | None = None,
) -> torch.Tensor:
    """Blending weights for one tile: a separable Gaussian centred in the patch, normalised to max 1.

    w(i, j, k) = prod_axes exp(-(i - c)^2 / (2 sigma^2)), with c = (n - 1) / 2 (the exact centre, as MONAI;
    nnU-Net puts the peak at n // 2) and sigma = sigma_scale * n per axis.

    Args:
        patch_size: (D, H, W) tile size.
        sigma_scale: sigma as a fraction of the tile size on each axis (nnU-Net and MONAI use 1/8).
        device: device of the returned map.
        dtype: dtype of the returned map.
        min_value: lower clip. None (default) clips to the smallest positive value of the map so that no
            voxel has zero weight (as nnU-Net); MONAI clips to 1e-3.

    Returns:
        (D, H, W) tensor with maximum 1 and no zeros.
    """
    # float64 so that the far corners of big patches keep a positive value before the final cast.
    weights = torch.ones((), dtype=torch.float64, device=device)
    for n in patch_size:
        coords = torch.arange(n, dtype=torch.float64, device=device) - (n - 1) / 2.0
        sigma = sigma_scale * n
        profile = torch.exp(-(coords**2) / (2.0 * sigma**2))
        weights = weights.unsqueeze(-1) * profile  # outer product: (...) -> (..., n)
    weights = (weights / weights.max()).to(dtype)
    floor = weights[weights > 0].min() if min_value is None else torch.tensor(min_value, dtype=dtype, device=device)
    return weights.clamp(min=floor)


def _predict_tiles(model: Callable, tiles: torch.Tensor, mirror_axes: Sequence[int]) -> torch.Tensor:
    """Model logits for a batch of tiles, averaged over all mirrorings of `mirror_axes`.

    Args:
        model: maps (N, C, D, H, W) to a tensor (N, K, D, H, W) or a list/tuple whose element 0 is that.
        tiles: (N, C, D, H, W) input tiles.
        mirror_axes: spatial axes (0, 1, 2 = D, H, W) to mirror; every subset is tried, the empty one included.

    Returns:
        (N, K, D, H, W) float32 logits.
    """
    combos = [c for r in range(len(mirror_axes) + 1) for c in itertools.combinations(mirror_axes, r)]
    total = None
    for combo in combos:
        dims = [2 + a for a in combo]  # spatial axis -> tensor dim of (N, C, D, H, W)
        x = torch.flip(tiles, dims) if dims else tiles
        out = model(x)
        if isinstance(out, (list, tuple)):
            out = out[0]  # deep supervision: element 0 is the full-resolution output
        out = out.float()
        out = torch.flip(out, dims) if dims else out  # back into the unmirrored frame
        total = out if total is None else total + out
    return total / len(combos)


def sliding_window_inference(
    model: Callable,
    image: torch.Tensor,
    patch_size: Sequence[int],
    overlap: float = 0.5,
    tiles_per_batch: int = 4,
    gaussian: bool | torch.Tensor = True,
    mirror_axes: Sequence[int] = (),
    num_classes: int | None = None,
    progress: bool = False,
) -> torch.Tensor:
    """Logits of `model` over a whole volume, predicted tile by tile and blended.

    Each output voxel is sum_t w_t * y_t / sum_t w_t over the tiles t that cover it, with w the Gaussian
    importance map (or 1). Volumes smaller than the patch are zero-padded (half before, half after, as
    nnU-Net and MONAI) and the result is cropped back. Runs under `torch.no_grad()`; put the model in
    `eval()` mode first. The model runs on `image.device`; accumulation is in float32.

    Args:
        model: maps (N, C, d, h, w) to logits (N, K, d, h, w), or to a list/tuple of outputs whose element
            0 is the full-resolution one (deep supervision).
        image: (B, C, D, H, W) input volume.
        patch_size: (d, h, w) tile size.
        overlap: fraction of overlap between neighbouring tiles, in [0, 1); see `tile_starts`.
        tiles_per_batch: tiles stacked into one forward call (each holds all B images).
        gaussian: True for Gaussian blending, False for a plain average, or a precomputed (d, h, w) map.
        mirror_axes: spatial axes (0, 1, 2) for mirroring test-time augmentation; the prediction is the mean
            over all 2^len(mirror_axes) mirrorings, each flipped back.
        num_classes: K; taken from the first model output when None.
        progress: show a tqdm bar over tile batches.

    Returns:
        (B, K, D, H, W) float32 logits on `image.device`.
    """
    if image.ndim != 5:
        raise InputError(f"image must be (B, C, D, H, W), got shape {tuple(image.shape)}.")
    patch_size = tuple(int(p) for p in patch_size)
    if len(patch_size) != 3 or min(patch_size) < 1:
        raise InputError(f"patch_size must be three positive ints, got {patch_size}.")
    if tiles_per_batch < 1:
        raise InputError(f"tiles_per_batch must be >= 1, got {tiles_per_batch}.")
    if any(a not in (0, 1, 2) for a in mirror_axes):
        raise InputError(f"mirror_axes must be spatial axes among 0, 1, 2, got {tuple(mirror_axes)}.")
    device = image.device
    B, C, D, H, W = image.shape

    # Zero-pad axes shorter than the patch; F.pad lists (before, after) pairs from the last axis backwards.
    pads = [(max(p - s, 0) // 2, max(p - s, 0) - max(p - s, 0) // 2) for s, p in zip((D, H, W), patch_size)]
    if any(sum(pair) for pair in pads):
        image = F.pad(image, [v for pair in reversed(pads) for v in pair], mode="constant", value=0.0)
    padded_shape = image.shape[2:]

    if isinstance(gaussian, torch.Tensor):
        if tuple(gaussian.shape) != patch_size:
            raise InputError(f"gaussian map shape {tuple(gaussian.shape)} does not match patch_size {patch_size}.")
        weight = gaussian.to(device=device, dtype=torch.float32)
    elif gaussian:
        weight = gaussian_importance_map(patch_size, device=device, dtype=torch.float32)
    else:
        weight = torch.ones(patch_size, device=device, dtype=torch.float32)

    starts = list(itertools.product(*(tile_starts(s, p, overlap) for s, p in zip(padded_shape, patch_size))))
    batches = [starts[i : i + tiles_per_batch] for i in range(0, len(starts), tiles_per_batch)]
    logits = None  # allocated once K is known
    weight_sum = torch.zeros((1, 1, *padded_shape), device=device, dtype=torch.float32)

    with torch.no_grad():
        for batch in tqdm(batches, desc="sliding window", disable=not progress):
            windows = [tuple(slice(s, s + p) for s, p in zip(start, patch_size)) for start in batch]
            tiles = torch.cat([image[(..., *win)] for win in windows], dim=0)  # (T*B, C, d, h, w)
            out = _predict_tiles(model, tiles, mirror_axes)  # (T*B, K, d, h, w)
            if logits is None:
                K = out.shape[1] if num_classes is None else num_classes
                logits = torch.zeros((B, K, *padded_shape), device=device, dtype=torch.float32)
            if out.shape[1] != logits.shape[1] or tuple(out.shape[2:]) != patch_size:
                raise InputError(
                    f"model output shape {tuple(out.shape)} does not match {logits.shape[1]} classes and "
                    f"patch_size {patch_size}."
                )
            for t, win in enumerate(windows):
                logits[(..., *win)] += out[t * B : (t + 1) * B] * weight
                weight_sum[(..., *win)] += weight

    logits = logits / weight_sum
    crop = tuple(slice(before, before + s) for (before, _), s in zip(pads, (D, H, W)))
    return logits[(..., *crop)]
