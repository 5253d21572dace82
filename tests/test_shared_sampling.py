"""Checks patch placement (nnU-Net's get_bbox bounds, foreground centring, oversampling) and padded reads:
pytest -q tests/test_shared_sampling.py"""

import numpy as np
import pytest

from shared.cache import CachedCase
from shared.errors import InputError
from shared.sampling import (
    forced_foreground,
    foreground_start,
    patch_start,
    pick_foreground_voxel,
    random_start,
    read_region,
    start_bounds,
)


def test_start_bounds_by_hand():
    # read 6, final 4 on 10 voxels: pad 2 -> starts -1 .. 10 + 1 - 6 = 5
    assert start_bounds((10, 10, 10), (6, 6, 6), (4, 4, 4)) == ([-1] * 3, [5] * 3)
    # volume of 3 smaller than the read patch 6: pad 3 -> starts -2 .. 3 + 1 + 1 - 6 = -1
    assert start_bounds((3, 10, 20), (6, 6, 6), (4, 4, 4)) == ([-2, -1, -1], [-1, 5, 15])
    # no augmentation margin: the patch stays inside
    assert start_bounds((10, 8, 9), (4, 4, 4), (4, 4, 4)) == ([0, 0, 0], [6, 4, 5])


def test_random_start_covers_exactly_the_bounds():
    rng = np.random.default_rng(0)
    starts = np.array([random_start((10, 3, 10), (6, 6, 6), (4, 4, 4), rng) for _ in range(2000)])
    assert set(starts[:, 0]) == set(range(-1, 6)) and set(starts[:, 1]) == {-2, -1}


def test_oversampling_forces_the_last_samples_as_nnunet():
    assert [forced_foreground(j, 2, 0.33) for j in range(2)] == [False, True]
    assert [forced_foreground(j, 3, 0.33) for j in range(3)] == [False, False, True]
    assert [forced_foreground(j, 4, 0.5) for j in range(4)] == [False, False, True, True]
    assert not any(forced_foreground(j, 5, 0.0) for j in range(5))


def fake_case(tmp_path, classes):
    """A CachedCase whose foreground file holds `classes` {value: list of voxels}."""
    coords, info, start = [], {}, 0
    for value, voxels in classes.items():
        coords += voxels
        info[value] = {"start": start, "stop": start + len(voxels), "voxels": len(voxels), "bbox": None}
        start += len(voxels)
    path = tmp_path / "fg.npy"
    np.save(path, np.asarray(coords, dtype=np.int32).reshape(-1, 3))
    return CachedCase("x", "D", image="", label="", foreground=str(path), shape=(20, 20, 20), channels=("T1",),
                      available=(1,), classes=info)  # fmt: skip


def test_foreground_voxel_comes_from_a_uniformly_chosen_present_class(tmp_path):
    case = fake_case(tmp_path, {1: [[1, 1, 1]], 2: [[5, 5, 5], [6, 6, 6], [7, 7, 7]]})
    rng = np.random.default_rng(0)
    picks = [tuple(pick_foreground_voxel(case, rng)) for _ in range(3000)]
    share_class_1 = picks.count((1, 1, 1)) / len(picks)
    assert abs(share_class_1 - 0.5) < 0.04  # class first, then voxel: class 1 is half the draws, not a quarter
    assert set(picks) == {(1, 1, 1), (5, 5, 5), (6, 6, 6), (7, 7, 7)}
    assert {tuple(pick_foreground_voxel(case, rng, classes=[2])) for _ in range(50)} <= {(5, 5, 5), (6, 6, 6),
                                                                                         (7, 7, 7)}  # fmt: skip
    assert pick_foreground_voxel(case, rng, classes=[3]) is None


def test_foreground_patch_is_centred_on_the_voxel_and_clipped_only_below(tmp_path):
    assert foreground_start((20, 20, 20), (8, 8, 8), (6, 6, 6), (10, 0, 19)) == (6, -1, 15)  # 19 - 4 is not clipped
    case = fake_case(tmp_path, {1: [[10, 10, 10]]})
    start = patch_start(case, (8, 8, 8), (8, 8, 8), np.random.default_rng(0), foreground=True)
    assert start == (6, 6, 6)
    empty = fake_case(tmp_path, {})
    start = patch_start(empty, (8, 8, 8), (8, 8, 8), np.random.default_rng(0), foreground=True)
    lows, highs = start_bounds((20, 20, 20), (8, 8, 8), (8, 8, 8))
    assert all(lo <= s <= hi for s, lo, hi in zip(start, lows, highs))  # no foreground: a random patch


def test_read_region_equals_padding_then_slicing():
    rng = np.random.default_rng(1)
    volume = rng.normal(size=(3, 5, 6, 7)).astype(np.float32)
    padded = np.pad(volume, [(0, 0), (4, 4), (4, 4), (4, 4)])
    for start in [(-2, 0, 3), (3, 4, 5), (-4, -4, -4), (0, 0, 0)]:
        box = read_region(volume, start, (4, 5, 6), channels=[2, 0, 2])
        s = [v + 4 for v in start]
        expected = padded[[2, 0, 2], s[0] : s[0] + 4, s[1] : s[1] + 5, s[2] : s[2] + 6]
        np.testing.assert_array_equal(box, expected)
    label = rng.integers(0, 3, size=(5, 6, 7)).astype(np.uint8)
    np.testing.assert_array_equal(read_region(label, (1, 1, 1), (2, 2, 2)), label[1:3, 1:3, 1:3])
    assert not read_region(label, (10, 10, 10), (2, 2, 2)).any()  # entirely outside: all fill
    padded_label = read_region(label, (-1, 0, 0), (2, 2, 2), fill=-1, dtype=np.int16)
    assert padded_label.dtype == np.int16 and (padded_label[0] == -1).all()
    np.testing.assert_array_equal(padded_label[1], label[0, 0:2, 0:2])


def test_bad_sizes_are_refused():
    with pytest.raises(InputError, match="read_size"):
        start_bounds((4, 4, 4), (4, 4), (4, 4, 4))
    with pytest.raises(InputError, match="size"):
        read_region(np.zeros((4, 4, 4)), (0, 0, 0), (0, 2, 2))
