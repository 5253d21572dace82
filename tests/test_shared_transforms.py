"""z-score, padding, patches, augmentations vs hand-worked arrays: pytest -q tests/test_shared_transforms.py"""

import itertools

import numpy as np
import pytest

from shared.errors import InputError
from shared.transforms import (
    adjust_gamma,
    augment,
    gaussian_noise,
    pad_to_min_shape,
    random_flip,
    random_gamma,
    random_rot90,
    rot90,
    sample_patch,
    scale_shift_intensity,
    zscore,
)


def test_zscore_whole_image_by_hand():
    # channel 0: values 1..4 -> mean 2.5, population std sqrt(1.25); channel 1 constant -> zeros
    image = np.stack([np.arange(1, 5, dtype=np.float32).reshape(1, 2, 2), np.full((1, 2, 2), 7.0)])
    out = zscore(image)
    expected0 = (np.arange(1, 5) - 2.5) / np.sqrt(1.25)
    np.testing.assert_allclose(out[0].ravel(), expected0, atol=1e-6)
    np.testing.assert_array_equal(out[1], 0.0)
    assert np.isfinite(out).all()


def test_zscore_inside_mask():
    image = np.array([10.0, 2.0, 4.0, -50.0], dtype=np.float32).reshape(1, 1, 1, 4)
    mask = np.array([False, True, True, False]).reshape(1, 1, 4)
    out = zscore(image, mask=mask)
    # inside: values 2, 4 -> mean 3, std 1; outside set to 0
    np.testing.assert_allclose(out.ravel(), [0.0, -1.0, 1.0, 0.0], atol=1e-6)


def test_zscore_rejects_empty_mask():
    with pytest.raises(InputError, match="mask is empty"):
        zscore(np.ones((1, 2, 2, 2)), mask=np.zeros((2, 2, 2), dtype=bool))


def test_pad_to_min_shape_centres_with_zeros():
    image = np.ones((2, 3, 5, 4), dtype=np.float32)
    label = np.full((3, 5, 4), 2, dtype=np.int64)
    img_p, lab_p = pad_to_min_shape(image, label, (6, 4, 4))
    assert img_p.shape == (2, 6, 5, 4) and lab_p.shape == (6, 5, 4)
    # x: 3 extra -> 1 before, 2 after; y, z already large enough
    expected = np.zeros((6, 5, 4))
    expected[1:4] = 1.0
    np.testing.assert_array_equal(img_p[0], expected)
    np.testing.assert_array_equal(lab_p, expected * 2)


def _volume(shape=(12, 10, 9), seed=0):
    rng = np.random.default_rng(seed)
    image = rng.normal(size=(2, *shape)).astype(np.float32)
    label = np.zeros(shape, dtype=np.int64)
    label[9, 1, 7] = 1  # one foreground voxel near a corner
    label[2, 8, 1] = 3
    return image, label


def test_sample_patch_matches_direct_slice():
    image, label = _volume()
    rng = np.random.default_rng(1)
    for _ in range(20):
        img_p, lab_p, (x, y, z) = sample_patch(image, label, (5, 4, 6), rng, fg_prob=0.5)
        assert 0 <= x <= 12 - 5 and 0 <= y <= 10 - 4 and 0 <= z <= 9 - 6
        np.testing.assert_array_equal(img_p, image[:, x : x + 5, y : y + 4, z : z + 6])
        np.testing.assert_array_equal(lab_p, label[x : x + 5, y : y + 4, z : z + 6])


def test_sample_patch_foreground_always_present_with_fg_prob_one():
    image, label = _volume()
    rng = np.random.default_rng(2)
    for _ in range(30):
        _, lab_p, _ = sample_patch(image, label, (3, 3, 3), rng, fg_prob=1.0)
        assert (lab_p > 0).any()


def test_sample_patch_fg_classes_selects_class():
    image, label = _volume()
    rng = np.random.default_rng(3)
    for _ in range(20):
        _, lab_p, origin = sample_patch(image, label, (3, 3, 3), rng, fg_prob=1.0, fg_classes=[3])
        assert (lab_p == 3).any()
        # centre 2, 8, 1 with half-size 1 -> origin 1, 7, 0 (z clipped at 0)
        assert origin == (1, 7, 0)


def test_sample_patch_uniform_covers_all_origins():
    image, label = _volume()
    image, label = image[:, :4, :4, :4], label[:4, :4, :4]
    rng = np.random.default_rng(4)
    origins = {sample_patch(image, label, (3, 3, 3), rng, fg_prob=0.0)[2] for _ in range(200)}
    assert origins == set(itertools.product((0, 1), repeat=3))


def test_sample_patch_pads_small_volume():
    image = np.arange(1, 1 + 2 * 3 * 4, dtype=np.float32).reshape(1, 2, 3, 4)
    label = np.ones((2, 3, 4), dtype=np.int64)
    img_p, lab_p, origin = sample_patch(image, label, (4, 3, 4), np.random.default_rng(0), fg_prob=0.0)
    # x padded by 1 before and 1 after: the only origin is -1 in input coordinates
    assert origin == (-1, 0, 0)
    expected = np.zeros((1, 4, 3, 4), dtype=np.float32)
    expected[:, 1:3] = image
    np.testing.assert_array_equal(img_p, expected)
    np.testing.assert_array_equal(lab_p, expected[0] > 0)


def test_sample_patch_without_label():
    image, _ = _volume()
    img_p, lab_p, (x, y, z) = sample_patch(image, None, (4, 4, 4), np.random.default_rng(5), fg_prob=1.0)
    assert lab_p is None
    np.testing.assert_array_equal(img_p, image[:, x : x + 4, y : y + 4, z : z + 4])


def test_random_flip_all_axes_and_none():
    image = np.arange(2 * 2 * 3 * 2, dtype=np.float32).reshape(2, 2, 3, 2)
    label = np.arange(12).reshape(2, 3, 2)
    img_f, lab_f = random_flip(image, label, np.random.default_rng(0), p=1.0)
    np.testing.assert_array_equal(img_f, image[:, ::-1, ::-1, ::-1])
    np.testing.assert_array_equal(lab_f, label[::-1, ::-1, ::-1])
    img_n, lab_n = random_flip(image, label, np.random.default_rng(0), p=0.0)
    np.testing.assert_array_equal(img_n, image)
    np.testing.assert_array_equal(lab_n, label)


def test_random_flip_known_2x1x1_array():
    image = np.array([1.0, 2.0], dtype=np.float32).reshape(1, 2, 1, 1)
    img_f, _ = random_flip(image, None, np.random.default_rng(0), p=1.0)
    np.testing.assert_array_equal(img_f.ravel(), [2.0, 1.0])


def test_random_flip_same_for_image_and_label():
    label = np.arange(24).reshape(2, 3, 4)
    image = np.stack([label, -label]).astype(np.float32)
    seen = set()
    for seed in range(16):
        img_f, lab_f = random_flip(image, label, np.random.default_rng(seed), p=0.5)
        np.testing.assert_array_equal(img_f[0], lab_f)
        np.testing.assert_array_equal(img_f[1], -lab_f)
        seen.add(lab_f.tobytes())
    assert len(seen) > 2  # different seeds give different flip combinations


def test_rot90_by_hand():
    plane = np.array([[1, 2], [3, 4]])
    label = plane.reshape(2, 2, 1)
    image = label[None].astype(np.float32)
    img_r, lab_r = rot90(image, label, k=1, axes=(0, 1))
    # counter-clockwise quarter turn of [[1, 2], [3, 4]] is [[2, 4], [1, 3]]
    np.testing.assert_array_equal(lab_r[:, :, 0], [[2, 4], [1, 3]])
    np.testing.assert_array_equal(img_r[0, :, :, 0], [[2, 4], [1, 3]])


def test_random_rot90_is_a_square_plane_rotation_of_both():
    # shape (3, 3, 2): only the (0, 1) plane is square
    label = np.arange(18).reshape(3, 3, 2)
    image = label[None].astype(np.float32)
    ks = set()
    for seed in range(20):
        img_r, lab_r = random_rot90(image, label, np.random.default_rng(seed))
        np.testing.assert_array_equal(img_r[0], lab_r)
        matches = [k for k in (1, 2, 3) if np.array_equal(lab_r, np.rot90(label, k=k, axes=(0, 1)))]
        assert len(matches) == 1
        ks.add(matches[0])
    assert ks == {1, 2, 3}


def test_random_rot90_no_square_plane_is_identity():
    label = np.arange(24).reshape(2, 3, 4)
    img_r, lab_r = random_rot90(label[None].astype(np.float32), label, np.random.default_rng(0))
    np.testing.assert_array_equal(lab_r, label)
    np.testing.assert_array_equal(img_r[0], label)


def test_scale_shift_fixed_ranges_by_hand():
    image = np.array([[-1.0, 0.0, 2.0]], dtype=np.float32).reshape(1, 3, 1, 1)
    out = scale_shift_intensity(image, np.random.default_rng(0), scale_range=(2.0, 2.0), shift_range=(1.0, 1.0))
    np.testing.assert_allclose(out.ravel(), [-1.0, 1.0, 5.0])


def test_scale_shift_random_is_affine_within_ranges():
    image = np.random.default_rng(0).normal(size=(2, 4, 4, 4)).astype(np.float32)
    out = scale_shift_intensity(image, np.random.default_rng(1))
    for c in range(2):
        slope, intercept = np.polyfit(image[c].ravel(), out[c].ravel(), deg=1)
        assert 0.9 <= slope <= 1.1 and -0.1 <= intercept <= 0.1
        np.testing.assert_allclose(out[c], image[c] * slope + intercept, atol=1e-5)


def test_adjust_gamma_by_hand():
    image = np.array([0.0, 0.25, 1.0], dtype=np.float32).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(adjust_gamma(image, gamma=2.0).ravel(), [0.0, 0.0625, 1.0])
    # negative values: min-max to [0, 0.5, 1], squared [0, 0.25, 1], back to [-1, 1] -> [-1, -0.5, 1]
    signed = np.array([-1.0, 0.0, 1.0], dtype=np.float32).reshape(1, 3, 1, 1)
    np.testing.assert_allclose(adjust_gamma(signed, gamma=2.0).ravel(), [-1.0, -0.5, 1.0])
    # inverted: -x = [1, 0, -1] -> [1, 0.5, 0] -> [1, 0.25, 0] -> [1, -0.5, -1] -> negate [-1, 0.5, 1]
    np.testing.assert_allclose(adjust_gamma(signed, gamma=2.0, invert=True).ravel(), [-1.0, 0.5, 1.0])


def test_adjust_gamma_constant_channel_unchanged():
    image = np.full((1, 2, 2, 2), -3.0, dtype=np.float32)
    np.testing.assert_array_equal(adjust_gamma(image, gamma=0.5), image)


def test_random_gamma_keeps_range_and_order():
    image = np.random.default_rng(0).normal(size=(1, 5, 5, 5)).astype(np.float32)
    out = random_gamma(image, np.random.default_rng(1), gamma_range=(1.5, 1.5))
    assert np.isclose(out.min(), image.min()) and np.isclose(out.max(), image.max())
    np.testing.assert_array_equal(np.argsort(out.ravel()), np.argsort(image.ravel()))
    low = image.min()
    np.testing.assert_allclose(out, ((image - low) / (image.max() - low)) ** 1.5 * (image.max() - low) + low, atol=1e-5)


def test_gaussian_noise_std():
    image = np.zeros((1, 40, 40, 40), dtype=np.float32)
    out = gaussian_noise(image, np.random.default_rng(0), std_range=(0.2, 0.2))
    assert abs(out.mean()) < 0.005
    assert abs(out.std() - 0.2) < 0.005


def test_augment_spatial_only_moves_label_with_image():
    label = np.arange(27).reshape(3, 3, 3) % 4
    image = np.stack([label, 10 + label]).astype(np.float32)
    for seed in range(10):
        img_a, lab_a = augment(image, label, np.random.default_rng(seed), p_scale_shift=0, p_gamma=0, p_noise=0)
        np.testing.assert_array_equal(img_a[0], lab_a)
        np.testing.assert_array_equal(img_a[1], 10 + lab_a)


def test_augment_flip_all_axes_only():
    label = np.arange(24).reshape(2, 3, 4)
    image = label[None].astype(np.float32)
    img_a, lab_a = augment(
        image, label, np.random.default_rng(0), p_flip=1.0, p_rot90=0, p_scale_shift=0, p_gamma=0, p_noise=0
    )
    np.testing.assert_array_equal(lab_a, label[::-1, ::-1, ::-1])
    np.testing.assert_array_equal(img_a[0], label[::-1, ::-1, ::-1])


def test_augment_intensity_leaves_label_alone():
    label = np.arange(27).reshape(3, 3, 3) % 4
    image = np.random.default_rng(0).normal(size=(1, 3, 3, 3)).astype(np.float32)
    img_a, lab_a = augment(image, label, np.random.default_rng(0), p_flip=0, p_rot90=0, p_scale_shift=1, p_noise=1)
    np.testing.assert_array_equal(lab_a, label)
    assert img_a.dtype == np.float32 and not np.allclose(img_a, image)
