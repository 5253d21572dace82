"""NIfTI IO round trip keeps affine and header; bad files give one sentence. Run: pytest tests/test_shared_nifti.py"""

import gzip
import os

import nibabel as nib
import numpy as np
import pytest

from shared.errors import InputError
from shared.nifti import read_nifti, write_nifti

LPS_AFFINE = np.array([[-0.9, 0, 0, 10.0], [0, -1.1, 0, 20.0], [0, 0, 2.5, -5.0], [0, 0, 0, 1]])


def _save(path, data, affine=LPS_AFFINE):
    img = nib.Nifti1Image(data, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.header["descrip"] = b"test header"
    nib.save(img, str(path))
    return path


def test_round_trip_keeps_affine_header_and_values(tmp_path):
    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    src = read_nifti(_save(tmp_path / "img.nii.gz", data))
    assert src.spacing == pytest.approx((0.9, 1.1, 2.5))
    pred = (src.data > 50).astype(np.uint8)
    write_nifti(tmp_path / "out" / "pred.nii.gz", pred, like=src)
    back = nib.load(str(tmp_path / "out" / "pred.nii.gz"))
    np.testing.assert_array_equal(np.asarray(back.dataobj), pred)
    np.testing.assert_allclose(back.affine, LPS_AFFINE, atol=1e-5)
    assert back.header.get_data_dtype() == np.uint8
    assert back.header["descrip"].tobytes().rstrip(b"\0") == b"test header"
    assert back.header.get_xyzt_units() == ("mm", "sec")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["pred.nii.gz"]  # no temp file left


def test_single_volume_4d_is_squeezed(tmp_path):
    vol = read_nifti(_save(tmp_path / "a.nii.gz", np.ones((3, 4, 5, 1), np.float32)))
    assert vol.data.shape == (3, 4, 5)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda p: p, "file not found"),
        (lambda p: open(p, "wb").close() or p, "file is empty"),
        (lambda p: p.write_bytes(gzip.compress(b"not a nifti at all")) or p, "not a readable NIfTI file"),
        (lambda p: _save(p, np.ones((3, 4, 5, 2), np.float32)), "expected a 3D volume, got shape (3, 4, 5, 2)"),
        (lambda p: _save(p, np.full((3, 4, 5), np.nan, np.float32)), "60 voxels are NaN or Inf"),
    ],
)
def test_bad_files_name_the_file_and_the_problem(tmp_path, make, message):
    path = tmp_path / "bad.nii.gz"
    make(path)
    with pytest.raises(InputError) as err:
        read_nifti(path)
    assert str(path) in str(err.value) and message in str(err.value)


@pytest.mark.parametrize(
    "data, message",
    [
        (np.where(np.arange(60).reshape(3, 4, 5) == 7, np.nan, 1.0).astype(np.float32), "1 voxels are NaN or Inf"),
        (np.full((3, 4, 5), 0.7, np.float32), "holds non-integer values, expected an integer label map"),
    ],
)
def test_an_integer_read_checks_the_stored_values_before_the_cast(tmp_path, data, message):
    """A NaN cast to int64 is an arbitrary integer, 0.7 is 0: both would be scored as labels."""
    path = _save(tmp_path / "labels.nii.gz", data)
    with pytest.raises(InputError, match=message):
        read_nifti(path, dtype=np.int64)
    whole = _save(tmp_path / "whole.nii.gz", np.full((3, 4, 5), 2.0, np.float32))
    assert read_nifti(whole, dtype=np.int64).data.max() == 2  # whole numbers stored as floats are labels


def test_write_refuses_other_grid_and_keeps_existing_file(tmp_path):
    src = read_nifti(_save(tmp_path / "img.nii.gz", np.zeros((4, 5, 6), np.float32)))
    out = tmp_path / "pred.nii.gz"
    write_nifti(out, np.ones((4, 5, 6), np.uint8), like=src)
    before = out.read_bytes()
    with pytest.raises(InputError, match=r"differs from the reference grid \(4, 5, 6\)"):
        write_nifti(out, np.ones((4, 5, 7), np.uint8), like=src)
    assert out.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["img.nii.gz", "pred.nii.gz"]
