"""NIfTI read/write with nibabel: images keep their affine and header end to end."""

import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from shared.atomic import atomic_path
from shared.errors import InputError


@dataclass
class Volume:
    """A 3D image with its grid: `data` is (X, Y, Z) float32 in the file's voxel order."""

    data: np.ndarray
    affine: np.ndarray  # (4, 4) voxel -> world (RAS+ mm)
    header: nib.Nifti1Header
    path: str = ""

    @property
    def spacing(self) -> tuple:
        """Voxel size in mm along each array axis (column norms of the affine)."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))


def read_nifti(path, dtype=np.float32, check_finite: bool = True) -> Volume:
    """Read a 3D NIfTI file; a 4D file with one volume is squeezed to 3D.

    Raises InputError naming the file if it is missing, empty, corrupt, not 3D, (with `check_finite`) holds
    NaN/Inf voxels, or is read as an integer `dtype` (a label map) but holds non-integer values. Both checks look
    at the stored values: a cast to an integer type would turn NaN into an arbitrary integer and 0.7 into 0.
    """
    path = str(path)
    if not os.path.isfile(path):
        raise InputError(f"{path}: file not found.")
    if os.path.getsize(path) == 0:
        raise InputError(f"{path}: file is empty.")
    try:
        img = nib.load(path)
        data = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types for truncated or foreign files
        raise InputError(f"{path}: not a readable NIfTI file ({type(err).__name__}: {err}).") from err
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise InputError(f"{path}: expected a 3D volume, got shape {tuple(data.shape)}.")
    if min(data.shape) == 0:
        raise InputError(f"{path}: volume has an empty axis, shape {tuple(data.shape)}.")
    if check_finite and np.issubdtype(data.dtype, np.floating) and not np.isfinite(data).all():
        n_bad = int((~np.isfinite(data)).sum())
        raise InputError(f"{path}: {n_bad} voxels are NaN or Inf.")
    if np.issubdtype(np.dtype(dtype), np.integer) and np.issubdtype(data.dtype, np.floating):
        if not np.array_equal(data, np.round(data)):
            raise InputError(f"{path}: holds non-integer values, expected an integer label map.")
    data = data.astype(dtype, copy=False)
    return Volume(data=data, affine=np.asarray(img.affine, dtype=np.float64), header=img.header.copy(), path=path)


def write_nifti(path, data: np.ndarray, like: Volume, dtype=None) -> None:
    """Write `data` (same shape as `like.data`) with `like`'s affine and header, atomically.

    The file appears only when complete (temp file in the same folder, then rename), so an
    interrupted write never leaves a half-written prediction behind.
    """
    path = Path(path)
    if tuple(data.shape) != tuple(like.data.shape):
        raise InputError(
            f"{path}: data shape {tuple(data.shape)} differs from the reference grid {tuple(like.data.shape)}."
        )
    header = like.header.copy()
    if dtype is not None:
        data = data.astype(dtype)
    header.set_data_dtype(data.dtype)
    img = nib.Nifti1Image(data, like.affine, header=header)
    # keep the qform/sform codes of the input so viewers place the prediction identically
    img.set_qform(like.affine, code=int(like.header["qform_code"]) or 1)
    img.set_sform(like.affine, code=int(like.header["sform_code"]) or 1)
    with atomic_path(path) as tmp:
        nib.save(img, tmp)
