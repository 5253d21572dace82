"""Checks resampling, RAS reorientation, brain mask and crop/pad: pytest -q tests/test_shared_geometry.py"""

import nibabel as nib
import numpy as np
import pytest

from shared.errors import InputError
from shared.geometry import (
    apply_brain_mask,
    crop_or_pad,
    from_canonical,
    mni_crop,
    mni_uncrop,
    resample_to_shape,
    resample_to_spacing,
    to_canonical,
    uncrop_or_unpad,
)


def smooth_volume(shape, dtype=np.float32):
    """A low-frequency image: sums of slow sines along each axis."""
    x, y, z = np.meshgrid(*[np.linspace(0, 1, n) for n in shape], indexing="ij")
    return (np.sin(2 * x) + np.cos(1.5 * y) + 0.5 * np.sin(3 * z + 0.3)).astype(dtype)


def test_resample_same_spacing_is_identity():
    image = np.random.default_rng(0).normal(size=(4, 5, 6)).astype(np.float32)
    labels = np.random.default_rng(1).integers(0, 4, size=(4, 5, 6)).astype(np.uint8)
    for order in (1, 3):
        np.testing.assert_array_equal(resample_to_spacing(image, (1.2, 1.0, 3.0), (1.2, 1.0, 3.0), order=order), image)
    out = resample_to_spacing(labels, (1.0, 1.0, 1.0), (1.0, 1.0, 1.0), order=0)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, labels)


def test_resample_output_shapes():
    image = np.zeros((5, 6, 7), dtype=np.float32)
    # round(5*1/0.5)=10, round(6*1.2/1)=round(7.2)=7, round(7*2.6/2)=round(9.1)=9
    assert resample_to_spacing(image, (1.0, 1.2, 2.6), (0.5, 1.0, 2.0), order=1).shape == (10, 7, 9)
    # channel dims are kept; a huge target spacing still leaves one voxel
    assert resample_to_spacing(np.zeros((2, 5, 6, 7)), (1, 1, 1), (1, 2, 100), order=1).shape == (2, 5, 3, 1)
    assert resample_to_shape(image, (3, 8, 2), order=3).shape == (3, 8, 2)


def test_resample_edge_aligned_linear_values_by_hand():
    # ramp 0,1,2,3 along x; output voxel j samples x = (j + 0.5) * 4/8 - 0.5 = j/2 - 0.25, clamped to [0, 3]
    ramp = np.arange(4, dtype=np.float32)[:, None, None] * np.ones((1, 2, 3), dtype=np.float32)
    up = resample_to_shape(ramp, (8, 2, 3), order=1)
    np.testing.assert_allclose(up[:, 1, 2], [0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3], atol=1e-6)
    # down: voxel j samples x = (j + 0.5) * 2 - 0.5 = 2j + 0.5, the mean of each pair
    down = resample_to_shape(ramp, (2, 2, 3), order=1)
    np.testing.assert_allclose(down[:, 0, 0], [0.5, 2.5], atol=1e-6)
    # two channels resample independently: channel 1 = 10 * channel 0
    both = resample_to_shape(np.stack([ramp, 10 * ramp]), (8, 2, 3), order=1)
    np.testing.assert_allclose(both[1, :, 0, 0], 10 * np.array([0, 0.25, 0.75, 1.25, 1.75, 2.25, 2.75, 3]), atol=1e-5)


def test_resample_integer_image_becomes_float():
    ramp = np.arange(4, dtype=np.int16)[:, None, None] * np.ones((1, 2, 2), dtype=np.int16)
    up = resample_to_shape(ramp, (8, 2, 2), order=1)
    assert up.dtype == np.float32
    np.testing.assert_allclose(up[1, 0, 0], 0.25)


def test_resample_up_down_linear_equals_hand_derived_kernel():
    # 2x up samples x = j/2 - 0.25, i.e. 0.75 f(i) + 0.25 f(i -/+ 1); 2x down averages each pair, so every axis
    # gets the 3-tap kernel [1/8, 3/4, 1/8] with the edge value repeated (f(-1) = f(0))
    image = smooth_volume((8, 10, 12))
    up = resample_to_spacing(image, (1.0, 1.0, 1.0), (0.5, 0.5, 0.5), order=1)
    assert up.shape == (16, 20, 24)
    back = resample_to_shape(up, image.shape, order=1)
    expected = image.astype(np.float64)
    for axis in range(3):
        n = expected.shape[axis]
        padded = np.pad(expected, [(1, 1) if a == axis else (0, 0) for a in range(3)], mode="edge")
        lo, mid, hi = (np.take(padded, np.arange(k, k + n), axis=axis) for k in range(3))
        expected = 0.125 * lo + 0.75 * mid + 0.125 * hi
    assert back.dtype == np.float32
    np.testing.assert_allclose(back, expected, atol=1e-5)


def test_resample_up_down_cubic_round_trip_close():
    image = smooth_volume((8, 10, 12))
    up = resample_to_spacing(image, (1.0, 1.0, 1.0), (0.5, 0.5, 0.5), order=3)
    back = resample_to_shape(up, image.shape, order=3)
    err = np.abs(back - image)
    assert err.max() < 0.01, f"max {err.max():.4f} mean {err.mean():.4f}"


def test_resample_up_down_round_trip_labels_exact():
    labels = np.random.default_rng(2).choice(np.array([0, 1, 2, 7], dtype=np.uint8), size=(4, 5, 6))
    up = resample_to_spacing(labels, (2.0, 2.0, 2.0), (1.0, 1.0, 1.0), order=0)
    assert up.dtype == np.uint8 and up.shape == (8, 10, 12)
    # nearest neighbour 2x up copies each voxel into a 2x2x2 block
    np.testing.assert_array_equal(up, labels.repeat(2, 0).repeat(2, 1).repeat(2, 2))
    np.testing.assert_array_equal(resample_to_shape(up, labels.shape, order=0), labels)


def test_resample_bad_arguments():
    image = np.zeros((4, 5, 6), dtype=np.float32)
    with pytest.raises(InputError, match=r"new_spacing: expected three positive values, got \(1, 0, 1\)"):
        resample_to_spacing(image, (1, 1, 1), (1, 0, 1), order=1)
    with pytest.raises(InputError, match=r"spacing: expected three positive values, got \(1, 1\)"):
        resample_to_spacing(image, (1, 1), (1, 1, 1), order=1)
    with pytest.raises(InputError, match="order: spline order must be 0..5"):
        resample_to_shape(image, (2, 2, 2), order=7)
    with pytest.raises(InputError, match=r"data: expected an array \(..., X, Y, Z\)"):
        resample_to_shape(np.zeros((4, 5)), (2, 2, 2), order=1)


LPS = np.array([[-1.0, 0, 0, 10], [0, -1.0, 0, 20], [0, 0, 2.0, -5], [0, 0, 0, 1]])
# voxel axis 0 -> Superior, axis 1 -> Left (flipped R), axis 2 -> Anterior, with a small rotation
_c, _s = np.cos(0.1), np.sin(0.1)
PERMUTED = np.array([[0, -1.5 * _c, 3 * _s, 4], [0, 1.5 * _s, 3 * _c, -8], [2.0, 0, 0, 6], [0, 0, 0, 1]])


@pytest.mark.parametrize("affine, expected_shape", [(LPS, (4, 5, 6)), (PERMUTED, (5, 6, 4))])
def test_to_canonical_round_trip_and_world_coordinates(affine, expected_shape):
    data = np.random.default_rng(3).normal(size=(4, 5, 6))
    canon, canon_affine, info = to_canonical(data, affine)
    assert canon.shape == expected_shape
    assert nib.aff2axcodes(canon_affine) == ("R", "A", "S")
    assert canon.flags["C_CONTIGUOUS"]
    np.testing.assert_array_equal(from_canonical(canon, info), data)
    # every voxel keeps its world position: map each original index to the canonical grid and compare values
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in data.shape], indexing="ij"), -1).reshape(-1, 3)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    new_idx = (world - canon_affine[:3, 3]) @ np.linalg.inv(canon_affine[:3, :3]).T
    np.testing.assert_allclose(new_idx, np.round(new_idx), atol=1e-9)
    new_idx = np.round(new_idx).astype(int)
    np.testing.assert_array_equal(canon[tuple(new_idx.T)], data[tuple(idx.T)])


def test_to_canonical_ras_input_unchanged_and_channels():
    ras = np.diag([1.0, 1.0, 1.0, 1.0])
    data = np.random.default_rng(4).normal(size=(2, 4, 5, 6)).astype(np.float32)
    canon, canon_affine, info = to_canonical(data, ras)
    np.testing.assert_array_equal(canon, data)
    np.testing.assert_array_equal(canon_affine, ras)
    # LPS with channels: x and y flipped in every channel
    canon, _, info = to_canonical(data, LPS)
    np.testing.assert_array_equal(canon, data[:, ::-1, ::-1, :])
    np.testing.assert_array_equal(from_canonical(canon, info), data)
    with pytest.raises(InputError, match=r"data: shape \(2, 4, 6, 5\) is not the canonical shape"):
        from_canonical(data.transpose(0, 1, 3, 2), info)
    with pytest.raises(InputError, match="affine: expected a 4x4 matrix"):
        to_canonical(data, np.eye(3))


def test_apply_brain_mask_values_and_shape_error():
    image = np.arange(2 * 2 * 2 * 3, dtype=np.float32).reshape(2, 2, 2, 3)
    mask = np.zeros((2, 2, 3), dtype=np.uint8)
    mask[0, 1, 2] = 1
    mask[1, 0, 0] = 1
    out = apply_brain_mask(image, mask, fill=-1)
    expected = np.full_like(image, -1)
    expected[:, 0, 1, 2] = image[:, 0, 1, 2]
    expected[:, 1, 0, 0] = image[:, 1, 0, 0]
    np.testing.assert_array_equal(out, expected)
    assert out.dtype == np.float32
    with pytest.raises(InputError, match=r"mask: shape \(2, 2\) differs from the image's spatial shape"):
        apply_brain_mask(image, np.ones((2, 2)))


def test_crop_or_pad_odd_differences_by_hand():
    data = np.arange(5 * 7 * 4).reshape(5, 7, 4)
    out, info = crop_or_pad(data, (8, 4, 4), pad_value=-9)
    # x: 5 -> 8 pads 1 before, 2 after; y: 7 -> 4 crops rows 1..4 (1 before, 2 after); z unchanged
    assert out.shape == (8, 4, 4) and out.dtype == data.dtype
    assert info.pad == ((1, 2), (0, 0), (0, 0))
    assert info.crop == ((0, 5), (1, 5), (0, 4))
    np.testing.assert_array_equal(out[1:6], data[:, 1:5, :])
    assert (out[0] == -9).all() and (out[6:] == -9).all()
    back = uncrop_or_unpad(out, info, (5, 7, 4), fill=0)
    expected = np.zeros_like(data)
    expected[:, 1:5] = data[:, 1:5]
    np.testing.assert_array_equal(back, expected)


def test_crop_or_pad_round_trip_exact_when_nothing_cropped():
    data = np.random.default_rng(5).normal(size=(2, 4, 5, 6)).astype(np.float32)
    out, info = crop_or_pad(data, (7, 5, 9))
    assert out.shape == (2, 7, 5, 9)
    # 4 -> 7 pads (1, 2); 6 -> 9 pads (1, 2)
    np.testing.assert_array_equal(out[:, 1:5, :, 1:7], data)
    assert out.sum() == pytest.approx(data.sum(), rel=1e-6)
    np.testing.assert_array_equal(uncrop_or_unpad(out, info), data)


def test_crop_or_pad_bad_arguments():
    data = np.zeros((4, 5, 6))
    out, info = crop_or_pad(data, (4, 4, 4))
    with pytest.raises(InputError, match=r"shape: expected three positive values, got \(4, 4\)"):
        crop_or_pad(data, (4, 4))
    with pytest.raises(InputError, match=r"data: spatial shape \(4, 4, 5\) differs from the crop_or_pad output"):
        uncrop_or_unpad(np.zeros((4, 4, 5)), info)
    with pytest.raises(InputError, match=r"original_shape: \(4, 5, 7\) differs"):
        uncrop_or_unpad(out, info, (4, 5, 7))


def test_mni_crop_is_momes_box_keeps_world_positions_and_uncrops():
    data = np.arange(182 * 218 * 182, dtype=np.int32).reshape(182, 218, 182)
    affine = np.array([[-1.0, 0, 0, 90], [0, 1, 0, -126], [0, 0, 1, -72], [0, 0, 0, 1]])  # FSL's MNI152 1 mm
    out, new_affine = mni_crop(data, affine)
    assert out.shape == (160, 196, 160)
    # official Codes_prepro/crop.py: img[20:180, 20:216, 0:160]
    assert out[0, 0, 0] == data[20, 20, 0] and out[-1, -1, -1] == data[179, 215, 159]
    # voxel (i, j, k) of the crop is voxel (i + 20, j + 20, k) of the input: same world point
    for ijk in ((0, 0, 0), (5, 7, 9), (159, 195, 159)):
        world_new = new_affine @ np.array([*ijk, 1.0])
        world_old = affine @ np.array([ijk[0] + 20, ijk[1] + 20, ijk[2], 1.0])
        np.testing.assert_allclose(world_new, world_old)
    # a centred crop would keep another box
    assert not np.array_equal(out, crop_or_pad(data, (160, 196, 160))[0])
    back = mni_uncrop(out, fill=-1)
    assert back.shape == (182, 218, 182)
    np.testing.assert_array_equal(back[20:180, 20:216, 0:160], out)
    assert (back[:20] == -1).all() and (back[:, 216:] == -1).all() and (back[:, :, 160:] == -1).all()
    channels, none = mni_crop(np.zeros((2, 182, 218, 182), np.float32))
    assert channels.shape == (2, 160, 196, 160) and none is None


def test_mni_crop_refuses_other_grids():
    with pytest.raises(InputError, match=r"\(160, 196, 160\) is not the 182x218x182 grid of the MNI152"):
        mni_crop(np.zeros((160, 196, 160)))
    with pytest.raises(InputError, match="is not the .* output of mni_crop"):
        mni_uncrop(np.zeros((182, 218, 182)))
