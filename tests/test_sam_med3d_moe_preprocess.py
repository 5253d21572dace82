"""The torchio preprocessing of SAM-Med3D by hand: torchio's mask-centred crop start, crop/paste with zero padding,
z-normalisation over the positive voxels, and mapping input clicks into the resampled RAS grid.

Run: pytest tests/test_sam_med3d_moe_preprocess.py
"""

import numpy as np

from sam_med3d_moe.predict import input_to_model
from sam_med3d_moe.preprocess import crop_start, paste_at, to_model_grid, znorm_positive
from shared.sampling import read_region


def _torchio_crop_start(bbox_min, bbox_max, size):
    """torchio's `_compute_mask_center_crop_or_pad` for one axis, step by step (crop_ini - pad_ini)."""
    center = (bbox_min + bbox_max + 1) / 2  # torchio's bb_max is exclusive
    if (size % 2 == 0) ^ (center % 1 == 0):
        center -= 0.5
    begin = center - size / 2
    crop_ini, pad_ini = (begin, 0) if begin >= 0 else (0, -begin)
    return int(crop_ini) - int(pad_ini)


def test_crop_start_matches_torchio_mask_centred_crop_or_pad():
    # by hand, size 128: box [10, 20] -> centre 15.5 -> 15 -> start -49; box [10, 21] -> centre 16 -> start -48
    assert crop_start([10, 10, 10], [20, 21, 200], 128).tolist() == [-49, -48, 41]
    rng = np.random.default_rng(0)
    for _ in range(500):
        size = int(rng.integers(1, 140))
        lo = rng.integers(-5, 200, size=3)
        hi = lo + rng.integers(0, 150, size=3)
        want = [_torchio_crop_start(int(a), int(b), size) for a, b in zip(lo, hi)]
        assert crop_start(lo, hi, size).tolist() == want, (lo, hi, size)


def test_crop_and_paste_round_trip_with_padding():
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    start = crop_start([0, 5, 3], [0, 5, 3], 4)  # a one-voxel box at 0: the cube starts 2 voxels outside
    assert start.tolist() == [-2, 3, 1]
    crop = read_region(data, start, (4, 4, 4))
    assert crop[:2].sum() == 0 and crop[2, 0, 0] == data[0, 3, 1] and crop[2, 1, 0] == data[0, 4, 1]
    assert crop[2, 2, 3] == data[0, 5, 4] and crop[:, 3].sum() == 0  # y = 6 lies outside the volume
    back = paste_at(crop, start, data.shape)
    assert np.array_equal(back[0:2, 3:6, 1:5], data[0:2, 3:6, 1:5]) and back.sum() == data[0:2, 3:6, 1:5].sum()


def test_znorm_uses_the_positive_voxels_and_the_unbiased_std():
    image = np.array([0.0, 0.0, 1.0, 2.0, 3.0, -1.0], dtype=np.float32)
    out = znorm_positive(image)
    mean, std = 2.0, 1.0  # over [1, 2, 3]: unbiased variance ((1 + 0 + 1) / 2) = 1
    assert np.allclose(out, (image - mean) / std)


def test_input_points_map_to_the_resampled_ras_grid():
    affine = np.array([[-1.0, 0, 0, 10], [0, 0, 2.0, -5], [0, -1.0, 0, 3], [0, 0, 0, 1]])  # flips + permutation
    data = np.zeros((12, 9, 7), dtype=np.float32)
    point = np.array([7, 5, 2])
    data[tuple(point)] = 1.0
    rs, canon_affine, _, canon_shape = to_model_grid(data, affine, spacing=0.5, order=0)  # finer: exact copies
    assert canon_shape == (12, 7, 9) and rs.shape == (24, 28, 18)
    mapped = input_to_model(point[None].astype(float), affine, canon_affine, canon_shape, rs.shape)[0]
    hits = np.argwhere(rs > 0)
    assert np.allclose(mapped, hits.mean(axis=0), atol=1e-6)
