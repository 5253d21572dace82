"""What the official torchio pipeline does to a volume before SAM-Med3D sees it (fact sheet Sec. 2).

RAS reorientation (`tio.ToCanonical`) and resampling to 1.5 mm (linear image, nearest label), an optional CT
clamp to [-1000, 1000] (`tio.Clamp`, official for paths containing "/ct_"), the model cube cut around the
target's bounding box with zero padding (`tio.CropOrPad(target_shape, mask_name=...)`), and z-normalisation
over the voxels > 0 *after* the crop (`tio.ZNormalization(masking_method=x > 0)`). Layouts: (X, Y, Z) arrays in
the RAS grid; a crop is `size`^3, may stick out of the volume (zeros there) and is read with
`shared.sampling.read_region`.
"""

import numpy as np

from shared.geometry import resample_to_spacing, to_canonical

CT_CLAMP = (-1000.0, 1000.0)  # official tio.Clamp(-1000, 1000) of CT images


def to_model_grid(data: np.ndarray, affine: np.ndarray, spacing: float, order: int):
    """RAS reorientation and resampling to isotropic `spacing` mm (the grid of `shared.cache` with
    reorient=True, spacing=(s, s, s), so predictions live where training crops came from).

    Args:
        data: (X, Y, Z) array in the file's voxel order; affine: its (4, 4) affine.
        order: 1 for images, 0 for labels.
    Returns:
        array in the RAS grid at `spacing`, the canonical affine, the orientation info (for `from_canonical`) and
        the shape of the RAS grid before resampling (to resample back to).
    """
    canon, canon_affine, info = to_canonical(data, affine)
    vox = np.linalg.norm(canon_affine[:3, :3], axis=0)
    return resample_to_spacing(canon, vox, (spacing,) * 3, order=order), canon_affine, info, canon.shape


def crop_start(bbox_min, bbox_max, size: int) -> np.ndarray:
    """First voxel (3,) of the `size`^3 crop that torchio's mask-centred CropOrPad cuts around a bounding box.

    torchio (`_compute_mask_center_crop_or_pad`) takes the centre c = (min + max + 1) / 2 of the box with an
    exclusive end, moves it down by half a voxel when exactly one of "size is even" and "c is an integer" holds,
    and starts at c - size / 2. Every case of that rule is floor((min + max + 1 - size) / 2).

    Args:
        bbox_min, bbox_max: (3,) inclusive voxel indices of the target's bounding box (a click: both the voxel).
        size: side of the crop.
    Returns:
        (3,) int64, possibly negative or beyond the volume (the crop is zero-padded there).
    """
    lo, hi = np.asarray(bbox_min, dtype=np.int64), np.asarray(bbox_max, dtype=np.int64)
    return np.floor_divide(lo + hi + 1 - size, 2)


def bounding_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive (min (3,), max (3,)) voxel indices of the foreground of a non-empty (X, Y, Z) mask."""
    idx = np.argwhere(mask)
    return idx.min(axis=0), idx.max(axis=0)


def paste_at(crop: np.ndarray, start, shape) -> np.ndarray:
    """Inverse of the crop (`shared.sampling.read_region`): put the (S, S, S) cube at `start` into a zero volume
    of `shape`; the parts of the cube outside the volume are dropped."""
    out = np.zeros(shape, dtype=crop.dtype)
    size = crop.shape[0]
    src, dst = [], []
    for s, n in zip(start, shape):
        lo, hi = max(int(s), 0), min(int(s) + size, n)
        dst.append(slice(lo, max(lo, hi)))
        src.append(slice(lo - int(s), lo - int(s) + max(0, hi - lo)))
    out[tuple(dst)] = crop[tuple(src)]
    return out


def znorm_positive(image: np.ndarray) -> np.ndarray:
    """(x - mean) / std with mean and unbiased std over the voxels > 0, applied to every voxel (torchio).

    Fewer than two voxels > 0 leave the crop unchanged (torchio would divide by a NaN std).
    """
    values = image[image > 0].astype(np.float64)
    if values.size < 2:
        return image.astype(np.float32)
    std = values.std(ddof=1)
    return ((image - values.mean()) / max(std, 1e-8)).astype(np.float32)
