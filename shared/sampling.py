"""Training patches read from memory-mapped cached cases: where a patch starts, and reading it with zero padding.

The placement follows nnU-Net v2's data loader (`nnUNetDataLoader.get_bbox`): a patch of the loader's read
size (the augmentation's larger initial patch) may reach past the volume by up to half of the difference
between read size and final patch size, or further when the volume is smaller than the patch; a foreground
patch is centred on a stored voxel of a randomly chosen present class (`shared.cache.foreground_locations`),
so no label is scanned per draw. Only the voxels of the patch are read from disk.
"""

from collections.abc import Sequence

import numpy as np

from shared.errors import InputError


def _three_ints(values, what: str) -> tuple:
    values = tuple(int(v) for v in values)
    if len(values) != 3 or min(values) < 1:
        raise InputError(f"{what} must be three positive ints, got {values}.")
    return values


def start_bounds(shape, read_size, final_size) -> tuple[list, list]:
    """Lowest and highest start of a read patch per axis (nnU-Net's `lbs`, `ubs`; both inclusive).

    Args:
        shape: (X, Y, Z) of the volume.
        read_size: size of the region read (>= final_size).
        final_size: size of the patch after augmentation.
    """
    read_size, final_size = _three_ints(read_size, "read_size"), _three_ints(final_size, "final_size")
    lows, highs = [], []
    for n, r, f in zip(shape, read_size, final_size):
        pad = max(r - f, r - n)  # a volume smaller than the read patch is padded to fit it
        lows.append((-pad) // 2)
        highs.append(n + pad // 2 + pad % 2 - r)
    return lows, highs


def random_start(shape, read_size, final_size, rng: np.random.Generator) -> tuple:
    """A uniformly random start in `start_bounds` (nnU-Net's non-foreground patch)."""
    lows, highs = start_bounds(shape, read_size, final_size)
    return tuple(int(rng.integers(lo, hi + 1)) for lo, hi in zip(lows, highs))


def pick_foreground_voxel(case, rng: np.random.Generator, classes: Sequence[int] | None = None) -> np.ndarray | None:
    """A stored voxel (3,) of a class drawn uniformly among the present `classes` (default: every class > 0).

    Returns None when the case holds none of them (the caller then draws a random patch, as nnU-Net does).
    """
    present = sorted(c for c in case.classes if (classes is None or c in classes) and case.classes[c]["voxels"] > 0)
    if not present:
        return None
    locations = case.class_locations(present[int(rng.integers(len(present)))])
    return np.asarray(locations[int(rng.integers(len(locations)))])


def foreground_start(shape, read_size, final_size, voxel) -> tuple:
    """The start that centres a read patch on `voxel`, never below `start_bounds`' lows (nnU-Net: no upper clip)."""
    lows, _ = start_bounds(shape, read_size, final_size)
    return tuple(max(lo, int(v) - r // 2) for lo, v, r in zip(lows, voxel, _three_ints(read_size, "read_size")))


def patch_start(case, read_size, final_size, rng: np.random.Generator, foreground: bool, classes=None) -> tuple:
    """Where a patch of `case` starts: centred on a foreground voxel when `foreground` and one exists, else random."""
    voxel = pick_foreground_voxel(case, rng, classes) if foreground else None
    if voxel is None:
        return random_start(case.shape, read_size, final_size, rng)
    return foreground_start(case.shape, read_size, final_size, voxel)


def forced_foreground(index: int, batch_size: int, fraction: float) -> bool:
    """nnU-Net's `_oversample_last_XX_percent`: the last samples of a batch are forced to foreground.

    Sample `index` is forced iff not index < round(B * (1 - fraction)); with B = 2 and 0.33, sample 1 only.
    """
    return not index < round(batch_size * (1.0 - fraction))


def read_region(
    array: np.ndarray, start, size, channels: Sequence[int] | None = None, fill=0, dtype=None
) -> np.ndarray:
    """Copy the box [start, start + size) of the last three axes of `array`; voxels outside it are `fill`.

    Args:
        array: (X, Y, Z) or (C, X, Y, Z) array, typically a read-only memory map (only the box is read).
        start: (3,) first voxel, may be negative or reach past the end.
        size: (3,) box size.
        channels: for a (C, X, Y, Z) array, the channels to copy in this order (repeats allowed); None: all.
        fill: value outside the array (nnU-Net pads labels with -1, cleaned to 0 after augmentation).
        dtype: of the result (default `array`'s; e.g. int16 for a uint8 label padded with -1).
    Returns:
        (*size) or (len(channels), *size) array.
    """
    size = _three_ints(size, "size")
    shape = array.shape[-3:]
    src, dst = [], []
    for s, p, n in zip(start, size, shape):
        lo, hi = max(int(s), 0), min(int(s) + p, n)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - int(s), lo - int(s) + max(0, hi - lo)))
    dtype = array.dtype if dtype is None else dtype
    if array.ndim == 3:
        out = np.full(size, fill, dtype=dtype)
        out[tuple(dst)] = array[tuple(src)]
        return out
    picked = range(array.shape[0]) if channels is None else channels
    out = np.full((len(picked), *size), fill, dtype=dtype)
    for i, c in enumerate(picked):  # one channel at a time: fancy indexing a memory map would read whole channels
        out[(i, *dst)] = array[(int(c), *src)]
    return out
