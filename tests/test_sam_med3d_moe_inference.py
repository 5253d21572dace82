"""Targets larger than the model crop: the tiling of a box, the blend of overlapping crops and the extension of a
click's mask across the crop faces it reaches, with a stand-in model that segments exactly what is bright.

Run: pytest tests/test_sam_med3d_moe_inference.py
"""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from sam_med3d_moe.inference import Blend, axis_starts, interior_voxel, segment_box, segment_clicks, segment_label
from shared.errors import InputError


class BrightModel:
    """A predictor whose mask is "bright voxel of the crop": logit +10 where the z-normalised crop is > 0."""

    def __init__(self, size: int = 16) -> None:
        self.cfg = SimpleNamespace(image_size=size, low_res=size)  # low-res = full size: upsampling is the identity
        self.device = torch.device("cpu")
        self.crops = 0

    def embed(self, image):
        self.crops += 1
        return image

    def step(self, emb, points=None, boxes=None, masks=None, routing=None):
        return torch.where(emb > 0, 10.0, -10.0)

    def stepper(self, emb, routing=None):
        return lambda points=None, boxes=None, masks=None: self.step(emb)


def _bar(shape=(70, 20, 20)):
    """A background of 1 with a bright bar along the first axis, 46 voxels long (longer than two 16^3 crops)."""
    image = np.ones(shape, dtype=np.float32)
    bar = np.zeros(shape, dtype=bool)
    bar[12:58, 8:12, 8:12] = True
    image[bar] = 100.0
    return image, bar


def test_axis_starts_cover_the_box_with_half_overlap():
    assert axis_starts(10, 20, 64) == [-17]  # fits: torchio's centring, floor((10 + 20 + 1 - 64) / 2)
    assert axis_starts(0, 99, 64) == [0, 18, 36]  # 100 voxels: ceil(36 / 32) + 1 = 3 crops from 0 to 36
    rng = np.random.default_rng(0)
    for _ in range(200):
        size = int(rng.integers(4, 40))
        lo = int(rng.integers(-10, 50))
        hi = lo + int(rng.integers(0, 150))
        starts = axis_starts(lo, hi, size)
        covered = set().union(*(range(s, s + size) for s in starts))
        assert set(range(lo, hi + 1)) <= covered
        assert all(b - a <= size // 2 for a, b in zip(starts, starts[1:]))  # neighbours overlap by >= half


def test_blend_averages_overlapping_logits_and_drops_what_lies_outside():
    blend = Blend((4, 1, 1))
    blend.add([0, 0, 0], np.full((2, 1, 1), 3.0))
    blend.add([1, 0, 0], np.full((2, 1, 1), -5.0))
    blend.add([3, 0, 0], np.full((2, 1, 1), 1.0))  # half outside the volume
    assert blend.sum[:, 0, 0].tolist() == [3.0, -2.0, -5.0, 1.0] and blend.count[:, 0, 0].tolist() == [1, 2, 1, 1]
    assert blend.mask()[:, 0, 0].tolist() == [True, False, False, True]


def test_interior_voxel_is_the_deepest():
    mask = np.zeros((7, 7, 7), bool)
    mask[1:6, 1:6, 1:6] = True
    mask[0, 0, 0] = True
    assert interior_voxel(mask).tolist() == [3, 3, 3]


def test_a_click_on_a_target_longer_than_the_crop_extends_across_the_faces_it_reaches():
    image, bar = _bar()
    model = BrightModel()
    mask, starts = segment_clicks(model, image, [(np.array([35.0, 9.0, 10.0]), 1)], ["--point 35 9 10"])
    # first crop x 27..42; both x faces reached -> 19 and 35, then 11 and 43; the bar (x 12..57) ends inside those
    assert np.array_equal(mask, bar) and sorted(int(s[0]) for s in starts) == [11, 19, 27, 35, 43]
    assert all(s[1:].tolist() == starts[0][1:].tolist() for s in starts)  # the bar never reaches a y or z face
    with pytest.raises(InputError, match="needs 3 crops of 2 allowed"):
        segment_clicks(BrightModel(), image, [(np.array([35.0, 9.0, 10.0]), 1)], ["--point 35 9 10"], max_crops=2)


def test_a_click_outside_the_first_crop_is_refused():
    image, _ = _bar()
    clicks = [(np.array([35.0, 9.0, 10.0]), 1), (np.array([50.0, 9.0, 10.0]), 0)]
    with pytest.raises(InputError, match="--negative 50 9 10 lies outside the 16\\^3 crop around the first click"):
        segment_clicks(BrightModel(), image, clicks, ["--point 35 9 10", "--negative 50 9 10"])


def test_a_box_and_a_label_larger_than_the_crop_are_tiled():
    image, bar = _bar()
    mask, starts = segment_box(BrightModel(), image, np.array([10, 6, 6]), np.array([59, 13, 13]))
    assert np.array_equal(mask, bar) and len(starts) == 6  # x 10..59 = 50 voxels: ceil((50 - 16) / 8) + 1 crops
    model = BrightModel()
    mask, starts = segment_label(model, image, bar, num_clicks=2, rng=np.random.default_rng(0))
    assert np.array_equal(mask, bar) and model.crops == len(starts) == 5  # the bar's 46 voxels: ceil(30 / 8) + 1
