"""Checks the intensity normalisations the cache applies (z-scores, percentile scaling, CT window) by hand:
pytest -q tests/test_shared_intensity.py"""

import numpy as np
import pytest

from shared.errors import InputError
from shared.intensity import normalise_intensity, percentile_scale, zscore


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


def test_percentile_scale_maps_zero_to_zero_and_the_percentile_to_one():
    channel = np.zeros((1, 10, 10, 2), np.float32)
    channel[0, :, :, 1] = np.arange(1, 101, dtype=np.float32).reshape(10, 10)  # non-zero voxels 1..100
    top = np.percentile(np.arange(1, 101), 99.5)  # 99.505
    out = percentile_scale(channel)
    assert out[0, 0, 0, 0] == 0.0 and out[0, 0, 0, 1] == pytest.approx(1 / top)
    assert out.max() == 1.0 and (out[0, :, :, 1] == 1.0).sum() == 1  # only 100 lies above the percentile
    assert not percentile_scale(np.zeros((1, 2, 2, 2))).any()  # an empty channel stays zero


def test_normalise_intensity_modes_by_hand():
    image = np.array([[[[0.0, 2.0], [4.0, 6.0]]], [[[0.0, 0.0], [1.0, 3.0]]]], np.float32)  # (2, 1, 2, 2)
    np.testing.assert_array_equal(normalise_intensity(image, "none"), image)
    whole = normalise_intensity(image, "zscore")
    assert whole[0].mean() == pytest.approx(0, abs=1e-6) and whole[0].std() == pytest.approx(1, abs=1e-6)
    # inside the voxels where any channel is non-zero (3 of 4); the voxel outside becomes 0
    inside = normalise_intensity(image, "zscore_nonzero")
    values = np.array([2.0, 4.0, 6.0])
    np.testing.assert_allclose(inside[0, 0].ravel()[1:], (values - values.mean()) / values.std(), rtol=1e-6)
    assert inside[0, 0, 0, 0] == 0 and inside[1, 0, 0, 0] == 0
    np.testing.assert_allclose(normalise_intensity(np.array([[[[-1000.0, 0.0, 3000.0]]]]), "ct"), [[[[0, 0.5, 1]]]])
    with pytest.raises(InputError, match="minmax"):
        normalise_intensity(image, "minmax")
