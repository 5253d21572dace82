"""Voxel-grid operations on (..., X, Y, Z) arrays: resampling, reorientation to RAS, brain mask, crops and pads.

Every function acts on the last three axes, so a single volume (X, Y, Z) and a multi-channel array
(C, X, Y, Z) go through the same code; each change of grid returns what is needed to undo it, so a
prediction can be written back in the input's grid.
"""

from dataclasses import dataclass

import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, io_orientation, ornt_transform
from scipy import ndimage

from shared.errors import InputError

_RAS = axcodes2ornt(("R", "A", "S"))


def _spatial(data: np.ndarray, what: str = "data") -> tuple:
    if data.ndim < 3:
        raise InputError(f"{what}: expected an array (..., X, Y, Z) with at least 3 axes, got shape {data.shape}.")
    return tuple(data.shape[-3:])


def _three(values, what: str, positive: bool = True) -> tuple:
    values = tuple(values)
    if len(values) != 3 or (positive and min(values) <= 0):
        raise InputError(f"{what}: expected three {'positive ' if positive else ''}values, got {values}.")
    return values


def resample_to_shape(data: np.ndarray, shape, order: int) -> np.ndarray:
    """Resample the last three axes of `data` to `shape` by spline interpolation.

    Alignment: voxel *edges* are aligned (scipy `zoom(grid_mode=True)`, torch `align_corners=False`), so the
    field of view is kept: output voxel j samples the input at (j + 0.5) * n_in / n_out - 0.5. Outside the
    input's centres the edge value is repeated (mode "nearest").

    Args:
        data: (..., X, Y, Z) array.
        shape: target (X', Y', Z').
        order: spline order, 0 nearest (labels: dtype and values kept exactly), 1 linear, 3 cubic (images).
    Returns:
        (..., X', Y', Z') array; float inputs keep their dtype, integer inputs become float32 unless order is 0.
    """
    in_shape = _spatial(data)
    shape = tuple(int(s) for s in _three(shape, "shape"))
    if order not in range(6):
        raise InputError(f"order: spline order must be 0..5 (0 labels, 1 or 3 images), got {order}.")
    if in_shape == shape:
        return data.copy()
    dtype = data.dtype if order == 0 or np.issubdtype(data.dtype, np.floating) else np.float32
    flat = data.reshape(-1, *in_shape).astype(dtype, copy=False)  # (..., X, Y, Z) -> (N, X, Y, Z)
    out = np.empty((flat.shape[0], *shape), dtype=dtype)
    zoom = [o / i for o, i in zip(shape, in_shape)]
    for n in range(flat.shape[0]):
        out[n] = ndimage.zoom(flat[n], zoom, order=order, mode="nearest", grid_mode=True, prefilter=order > 1)
    return out.reshape(*data.shape[:-3], *shape)


def resample_to_spacing(data: np.ndarray, spacing, new_spacing, order: int) -> np.ndarray:
    """Resample the last three axes from voxel size `spacing` to about `new_spacing` (mm).

    The output shape is round(shape * spacing / new_spacing) (numpy rounding, at least 1); the grid spans the
    same field of view, so the actual new voxel size is shape * spacing / new_shape. Go back with
    `resample_to_shape(out, data.shape[-3:], order)`. Alignment as in `resample_to_shape`.

    Args:
        data: (..., X, Y, Z) array.
        spacing: current voxel size (3 values, mm), e.g. `Volume.spacing`.
        new_spacing: target voxel size (3 values, mm).
        order: 0 for labels, 1 or 3 for images.
    Returns:
        (..., X', Y', Z') array.
    """
    in_shape = _spatial(data)
    spacing = _three(spacing, "spacing")
    new_spacing = _three(new_spacing, "new_spacing")
    shape = [max(1, int(np.round(n * s / t))) for n, s, t in zip(in_shape, spacing, new_spacing)]
    return resample_to_shape(data, shape, order=order)


@dataclass
class OrientationInfo:
    """What `to_canonical` did, for `from_canonical`."""

    transform: np.ndarray  # (3, 2) nibabel orientation: input axes -> RAS axes (axis, flip)
    shape: tuple  # spatial shape (X, Y, Z) of the input
    affine: np.ndarray  # (4, 4) affine of the input


def _reorient(data: np.ndarray, ornt: np.ndarray) -> np.ndarray:
    # apply_orientation permutes/flips the first three axes, so move the spatial axes to the front and back
    moved = np.moveaxis(data, (-3, -2, -1), (0, 1, 2))
    moved = apply_orientation(moved, ornt)
    # flips give negative strides, which torch.from_numpy refuses
    return np.ascontiguousarray(np.moveaxis(moved, (0, 1, 2), (-3, -2, -1)))


def to_canonical(data: np.ndarray, affine: np.ndarray):
    """Permute and flip the voxel axes so that they point Right, Anterior, Superior (closest RAS+ order).

    Only axis permutations and flips: voxel values are not interpolated and the world position of every
    voxel is kept (the new affine accounts for the change).

    Args:
        data: (..., X, Y, Z) array in the file's voxel order.
        affine: (4, 4) voxel -> world affine of `data`.
    Returns:
        data: (..., X', Y', Z') array in RAS voxel order (contiguous).
        affine: (4, 4) affine of the reoriented array.
        info: `OrientationInfo` for `from_canonical`.
    """
    shape = _spatial(data)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise InputError(f"affine: expected a 4x4 matrix, got shape {affine.shape}.")
    transform = ornt_transform(io_orientation(affine), _RAS)
    new_affine = affine @ inv_ornt_aff(transform, shape)
    return _reorient(data, transform), new_affine, OrientationInfo(transform=transform, shape=shape, affine=affine)


def from_canonical(data: np.ndarray, info: OrientationInfo) -> np.ndarray:
    """Undo `to_canonical`: put a RAS-ordered (..., X', Y', Z') array back in the input's voxel order.

    The result lies in the original grid, whose affine is `info.affine`.
    """
    inverse = ornt_transform(_RAS, io_orientation(info.affine))
    out = _reorient(data, inverse)
    if tuple(out.shape[-3:]) != tuple(info.shape):
        raise InputError(f"data: shape {data.shape} is not the canonical shape of an input of shape {info.shape}.")
    return out


def apply_brain_mask(image: np.ndarray, mask: np.ndarray, fill=0) -> np.ndarray:
    """Set voxels outside the brain mask to `fill`.

    Args:
        image: (..., X, Y, Z) array.
        mask: (X, Y, Z) array, nonzero inside the brain.
        fill: value outside the mask.
    Returns:
        array like `image` (same shape and dtype).
    """
    if tuple(mask.shape) != _spatial(image, "image"):
        raise InputError(f"mask: shape {mask.shape} differs from the image's spatial shape {image.shape[-3:]}.")
    return np.where(mask.astype(bool), image, fill).astype(image.dtype, copy=False)


@dataclass
class CropPadInfo:
    """What `crop_or_pad` did, for `uncrop_or_unpad`."""

    original_shape: tuple  # spatial shape (X, Y, Z) of the input
    crop: tuple  # per axis (start, stop) of the input range that was kept
    pad: tuple  # per axis (before, after) voxels added


def crop_or_pad(data: np.ndarray, shape, pad_value=0):
    """Centre-crop or pad the last three axes of `data` to `shape`.

    Per axis with difference d = |target - size|, d // 2 voxels go before and the rest after (an odd
    difference puts the extra voxel at the end, as nnU-Net and torchio do). This is not MoME's crop of the
    MNI152 grid, which is off-centre: use `mni_crop` for that (centred, 182x218x182 -> 160x196x160 would keep
    [11:171, 11:207, 11:171]).

    Args:
        data: (..., X, Y, Z) array.
        shape: target spatial shape (X', Y', Z').
        pad_value: value of padded voxels.
    Returns:
        out: (..., X', Y', Z') array, same dtype.
        info: `CropPadInfo` for `uncrop_or_unpad`.
    """
    in_shape = _spatial(data)
    shape = tuple(int(s) for s in _three(shape, "shape"))
    crop, pad = [], []
    for size, target in zip(in_shape, shape):
        start = max(size - target, 0) // 2
        before = max(target - size, 0) // 2
        kept = min(size, target)
        crop.append((start, start + kept))
        pad.append((before, target - kept - before))
    cropped = data[(..., *(slice(a, b) for a, b in crop))]
    out = np.pad(cropped, [(0, 0)] * (data.ndim - 3) + pad, mode="constant", constant_values=pad_value)
    return out, CropPadInfo(original_shape=in_shape, crop=tuple(crop), pad=tuple(pad))


def uncrop_or_unpad(data: np.ndarray, info: CropPadInfo, original_shape=None, fill=0) -> np.ndarray:
    """Undo `crop_or_pad`: remove the padding and put the array back at its place in the original box.

    Args:
        data: (..., X', Y', Z') array in the cropped/padded grid (e.g. a prediction).
        info: from `crop_or_pad`.
        original_shape: optional spatial shape to check against `info.original_shape`.
        fill: value of the voxels that were cropped away.
    Returns:
        (..., X, Y, Z) array, same dtype; exact inverse where nothing was cropped.
    """
    if original_shape is not None and tuple(original_shape)[-3:] != tuple(info.original_shape):
        raise InputError(
            f"original_shape: {tuple(original_shape)} differs from the cropped input's {info.original_shape}."
        )
    expected = tuple(b - a + p0 + p1 for (a, b), (p0, p1) in zip(info.crop, info.pad))
    if _spatial(data) != expected:
        raise InputError(f"data: spatial shape {data.shape[-3:]} differs from the crop_or_pad output {expected}.")
    inner = data[(..., *(slice(p0, p0 + b - a) for (a, b), (p0, _) in zip(info.crop, info.pad)))]
    out = np.full((*data.shape[:-3], *info.original_shape), fill, dtype=data.dtype)
    out[(..., *(slice(a, b) for a, b in info.crop))] = inner
    return out


# MoME's official preprocessing (Codes_prepro/crop.py): after affine registration to the MNI152 1 mm template
# (182x218x182 voxels), keep img[20:180, 20:216, 0:160] -> 160x196x160. The box is not centred: it drops 20
# voxels at the low end of x and y and the top 22 slices of z.
MNI152_SHAPE = (182, 218, 182)
MNI_CROP_BOX = ((20, 180), (20, 216), (0, 160))
MNI_CROPPED_SHAPE = tuple(b - a for a, b in MNI_CROP_BOX)  # (160, 196, 160)


def mni_crop(data: np.ndarray, affine: np.ndarray | None = None):
    """MoME's crop of an image on the MNI152 1 mm grid: [20:180, 20:216, 0:160] of 182x218x182 -> 160x196x160.

    Args:
        data: (..., 182, 218, 182) array registered to the MNI152 1 mm template (e.g. with ANTs or FSL flirt).
        affine: optional (4, 4) voxel -> world affine of `data`.
    Returns:
        cropped (..., 160, 196, 160) array (a copy), and its affine: the same matrix with the origin moved to
        the box's first voxel, so every kept voxel keeps its world position (None when `affine` is None).
    """
    shape = _spatial(data)
    if shape != MNI152_SHAPE:
        raise InputError(
            f"data: spatial shape {shape} is not the {'x'.join(map(str, MNI152_SHAPE))} grid of the MNI152 1 mm "
            "template, so MoME's crop [20:180, 20:216, 0:160] does not apply (register the image to MNI152 first)."
        )
    cropped = np.ascontiguousarray(data[(..., *(slice(a, b) for a, b in MNI_CROP_BOX))])
    if affine is None:
        return cropped, None
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise InputError(f"affine: expected a 4x4 matrix, got shape {affine.shape}.")
    new_affine = affine.copy()
    new_affine[:3, 3] = affine[:3, :3] @ np.array([a for a, _ in MNI_CROP_BOX], dtype=np.float64) + affine[:3, 3]
    return cropped, new_affine


def mni_uncrop(data: np.ndarray, fill=0) -> np.ndarray:
    """Undo `mni_crop`: put a (..., 160, 196, 160) array back into the 182x218x182 MNI grid, `fill` elsewhere."""
    shape = _spatial(data)
    if shape != MNI_CROPPED_SHAPE:
        raise InputError(f"data: spatial shape {shape} is not the {MNI_CROPPED_SHAPE} output of mni_crop.")
    out = np.full((*data.shape[:-3], *MNI152_SHAPE), fill, dtype=data.dtype)
    out[(..., *(slice(a, b) for a, b in MNI_CROP_BOX))] = data
    return out
