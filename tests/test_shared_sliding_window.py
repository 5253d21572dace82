"""Tile placement, Gaussian map, blended tiling vs hand values: pytest -q tests/test_shared_sliding_window.py"""

import itertools
import math

import pytest
import torch

from shared.errors import InputError
from shared.sliding_window import gaussian_importance_map, sliding_window_inference, tile_starts


def assert_close(actual, expected, atol=1e-6, rtol=1e-6):
    """allclose that reports the max and mean difference (float32 blending rounds at about 1e-7 relative)."""
    diff = (actual - expected).abs()
    ok = bool((diff <= atol + rtol * expected.abs()).all())
    assert ok, f"max diff {diff.max():.3g}, mean {diff.mean():.3g}"


@pytest.mark.parametrize(
    "size, patch, overlap, expected",
    [
        (10, 4, 0.5, [0, 2, 4, 6]),  # max step 2, 6 / 2 = 3 steps
        (8, 4, 0.5, [0, 2, 4]),
        (10, 4, 0.25, [0, 3, 6]),  # max step floor(3) = 3
        (11, 4, 0.5, [0, 2, 4, 5, 7]),  # 4 steps of 7/4 = 1.75, rounded
        (10, 4, 0.0, [0, 3, 6]),  # max step 4: ceil(6 / 4) = 2 steps of 3
        (160, 128, 0.5, [0, 32]),
        (196, 128, 0.5, [0, 34, 68]),  # MONAI would place 0, 64, 68
        (4, 4, 0.5, [0]),
        (3, 4, 0.5, [0]),
    ],
)
def test_tile_starts_by_hand(size, patch, overlap, expected):
    assert tile_starts(size, patch, overlap) == expected


def test_tile_starts_rules_hold():
    for size, patch, overlap in itertools.product(range(1, 40), range(1, 12), (0.0, 0.25, 0.5, 0.7, 0.9)):
        starts = tile_starts(size, patch, overlap)
        if size <= patch:
            assert starts == [0]
            continue
        limit = max(1, math.floor(patch * (1 - overlap) + 1e-9))
        steps = [b - a for a, b in zip(starts, starts[1:])]
        assert starts[0] == 0 and starts[-1] == size - patch
        assert all(1 <= s <= limit for s in steps), (size, patch, overlap, starts)
        # the fewest tiles that can satisfy the step limit
        assert len(starts) == math.ceil((size - patch) / limit) + 1


def test_tile_starts_rejects_bad_overlap():
    with pytest.raises(InputError, match="overlap"):
        tile_starts(10, 4, 1.0)


def test_gaussian_map_against_direct_loops():
    patch, sigma_scale = (3, 4, 5), 1 / 8
    g = gaussian_importance_map(patch, sigma_scale=sigma_scale, dtype=torch.float64)
    direct = torch.empty(patch, dtype=torch.float64)
    for i, j, k in itertools.product(*(range(n) for n in patch)):
        value = 1.0
        for idx, n in zip((i, j, k), patch):
            c, s = (n - 1) / 2, n * sigma_scale
            value *= math.exp(-((idx - c) ** 2) / (2 * s**2))
        direct[i, j, k] = value
    direct /= direct.max()
    # clipping to the smallest positive value changes nothing here: no entry underflows
    assert_close(g, direct, atol=1e-12)
    assert g.max() == 1.0


def test_gaussian_map_has_no_zeros():
    # sigma 1/64 of 64 = 1 voxel: the corners underflow float32, so they are clipped to the smallest positive
    g = gaussian_importance_map((64, 64, 64), sigma_scale=1 / 64)
    positive = gaussian_importance_map((64, 64, 64), sigma_scale=1 / 64, min_value=0.0)
    assert (positive == 0).any()
    assert g.min() > 0 and g.min() == positive[positive > 0].min()
    assert gaussian_importance_map((8, 8, 8), min_value=1e-3).min() == pytest.approx(1e-3)


@pytest.mark.parametrize("overlap", [0.5, 0.25])
@pytest.mark.parametrize("gaussian", [True, False])
def test_identity_model_reproduces_input(overlap, gaussian):
    image = torch.randn(2, 3, 10, 9, 7)
    out = sliding_window_inference(
        lambda x: x, image, patch_size=(4, 4, 4), overlap=overlap, tiles_per_batch=3, gaussian=gaussian
    )
    assert out.dtype == torch.float32 and out.shape == image.shape
    assert_close(out, image)


def test_identity_conv_reproduces_input_with_mirroring():
    conv = torch.nn.Conv3d(2, 2, kernel_size=1, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.eye(2).view(2, 2, 1, 1, 1))
    image = torch.randn(1, 2, 9, 6, 8)
    out = sliding_window_inference(conv, image, patch_size=(4, 4, 4), mirror_axes=(0, 1, 2))
    assert_close(out, image)


def test_volume_smaller_than_patch_is_zero_padded_and_cropped():
    image = torch.randn(1, 2, 3, 5, 2)
    assert_close(sliding_window_inference(lambda x: x, image, patch_size=(4, 6, 4)), image)

    def tile_mean(x):
        return x.mean(dim=(2, 3, 4), keepdim=True).expand_as(x)

    out = sliding_window_inference(tile_mean, image, patch_size=(4, 6, 4))
    # one zero-padded tile of 4 * 6 * 4 = 96 voxels: every output is the channel sum / 96
    expected = (image.sum(dim=(2, 3, 4), keepdim=True) / 96).expand_as(image)
    assert_close(out, expected)

    def ramp_w(x):
        return x * torch.arange(x.shape[4], dtype=x.dtype)

    # W = 2 in a patch of 4: one zero slice before and one after, so the voxels sit at tile positions 1 and 2
    out = sliding_window_inference(ramp_w, image, patch_size=(4, 6, 4))
    assert_close(out, image * torch.tensor([1.0, 2.0]))


def test_odd_padding_puts_the_smaller_half_before_as_nnunet_and_monai():
    # nnU-Net's pad_nd_image and MONAI's SpatialPad put shortfall // 2 before and the rest after; a model whose
    # output depends on the absolute position in its tile sees where the zeros went
    image = torch.randn(1, 1, 3, 4, 2)
    patch = (4, 7, 5)  # shortfalls 1, 3, 3 -> before 0, 1, 1 and after 1, 2, 2

    def position_code(x):
        d, h, w = (torch.arange(n, dtype=x.dtype) for n in x.shape[2:])
        return x + 100 * d.view(-1, 1, 1) + 10 * h.view(1, -1, 1) + w.view(1, 1, -1)

    out = sliding_window_inference(position_code, image, patch_size=patch)
    before = (0, 1, 1)
    d, h, w = (torch.arange(n, dtype=image.dtype) + b for n, b in zip(image.shape[2:], before))
    expected = image + 100 * d.view(-1, 1, 1) + 10 * h.view(1, -1, 1) + w.view(1, 1, -1)
    assert_close(out, expected)


def test_mirroring_averages_flipped_predictions():
    # model: x times the position along D within the tile (0, 1, 2, 3): not mirror-equivariant
    def ramp(x):
        return x * torch.arange(x.shape[2], dtype=x.dtype).view(1, 1, -1, 1, 1)

    image = torch.randn(1, 1, 4, 3, 3)  # one tile
    plain = sliding_window_inference(ramp, image, patch_size=(4, 3, 3))
    assert_close(plain, ramp(image))
    # flipped back, the mirrored pass weights position i by 3 - i; the mean weight is 3 / 2 everywhere
    mirrored = sliding_window_inference(ramp, image, patch_size=(4, 3, 3), mirror_axes=(0,))
    assert_close(mirrored, 1.5 * image)
    # mirroring along H or W leaves the D ramp as it is
    assert_close(sliding_window_inference(ramp, image, patch_size=(4, 3, 3), mirror_axes=(1, 2)), ramp(image))


def test_tiles_are_batched_and_list_outputs_use_element_zero():
    calls = []

    def model(x):
        calls.append(x.shape[0])
        return [2 * x, x[:, :, ::2, ::2, ::2]]  # deep-supervision style outputs

    image = torch.randn(2, 1, 10, 4, 4)  # 4 tiles along D
    out = sliding_window_inference(model, image, patch_size=(4, 4, 4), tiles_per_batch=3, mirror_axes=(2,))
    assert_close(out, 2 * image)
    # batches of 3 and 1 tiles, each holding both images, each run once per mirroring
    assert calls == [6, 6, 2, 2]


def _naive_blend(model, image, patch, starts_per_axis):
    """One tile at a time, weights computed with explicit loops."""
    weight = torch.empty(patch)
    for idx in itertools.product(*(range(n) for n in patch)):
        weight[idx] = math.prod(math.exp(-((i - (n - 1) / 2) ** 2) / (2 * (n / 8) ** 2)) for i, n in zip(idx, patch))
    weight /= weight.max()
    num, den = None, torch.zeros(image.shape[2:])
    for start in itertools.product(*starts_per_axis):
        win = tuple(slice(s, s + p) for s, p in zip(start, patch))
        out = model(image[(..., *win)])
        if num is None:
            num = torch.zeros(image.shape[0], out.shape[1], *image.shape[2:])
        num[(..., *win)] += out * weight
        den[win] += weight
    return num / den


def test_conv_model_matches_naive_tiled_blend():
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv3d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv3d(4, 3, 3, padding=1)
    )
    image = torch.randn(1, 2, 10, 8, 6)
    with torch.no_grad():
        expected = _naive_blend(model, image, (4, 4, 4), ([0, 2, 4, 6], [0, 2, 4], [0, 2]))
    out = sliding_window_inference(model, image, patch_size=(4, 4, 4), tiles_per_batch=2)
    assert_close(out, expected, atol=1e-5)


def test_conv_matches_full_volume_away_from_tile_borders():
    # a 3x3x3 conv sees only its 1-voxel neighbourhood: a voxel that is not on an inner tile face of any tile
    # covering it gets the same value from every tile as from the whole-volume conv
    torch.manual_seed(1)
    conv = torch.nn.Conv3d(1, 2, 3, padding=1)
    image = torch.randn(1, 1, 14, 11, 9)
    patch = (6, 6, 6)
    with torch.no_grad():
        full = conv(image)
    out = sliding_window_inference(conv, image, patch_size=patch, overlap=0.5)
    dirty = torch.zeros(image.shape[2:], dtype=torch.bool)
    size = image.shape[2:]
    for start in itertools.product(*(tile_starts(s, p, 0.5) for s, p in zip(size, patch))):
        inner = torch.zeros(size, dtype=torch.bool)
        inner[tuple(slice(s, s + p) for s, p in zip(start, patch))] = True
        core = torch.zeros(size, dtype=torch.bool)
        # shrink by one voxel on each face that is not also a face of the volume
        core[tuple(slice(s + (s > 0), s + p - (s + p < n)) for s, p, n in zip(start, patch, size))] = True
        dirty |= inner & ~core
    clean = ~dirty
    assert clean.sum() > 100
    assert_close(out[..., clean], full[..., clean], atol=1e-5)
    assert (out[..., dirty] - full[..., dirty]).abs().max() > 1e-3  # the borders do differ


def test_bad_arguments_raise():
    with pytest.raises(InputError, match="image must be"):
        sliding_window_inference(lambda x: x, torch.zeros(1, 4, 4, 4), patch_size=(2, 2, 2))
    with pytest.raises(InputError, match="mirror_axes"):
        sliding_window_inference(lambda x: x, torch.zeros(1, 1, 4, 4, 4), patch_size=(2, 2, 2), mirror_axes=(3,))
    with pytest.raises(InputError, match="classes"):
        sliding_window_inference(lambda x: x, torch.zeros(1, 1, 4, 4, 4), patch_size=(2, 2, 2), num_classes=3)
