"""shared.augment against values computed by hand: 90-degree turns, identities, gamma statistics, the blur of a
delta, sampling frequencies, channel masks, batch independence, autocast, presets and argument checks.

Run: .venv/bin/python -m pytest -q tests/test_shared_augment.py
"""

import dataclasses
import math

import numpy as np
import pytest
import torch

from shared.augment import (
    PARAM_KEYS,
    PIPELINES,
    AugmentationPipeline,
    apply_augmentation,
    initial_patch_size,
    sample_params,
)
from shared.errors import InputError

EVERY_P_ONE = AugmentationPipeline(**{f: 1.0 for f in AugmentationPipeline.__dataclass_fields__ if f.startswith("p_")})


def assert_close(a, b, atol):
    diff = (a.float() - b.float()).abs()
    assert diff.max() <= atol, f"max |diff| {diff.max():.3g}, mean {diff.mean():.3g}"


def params_for(pipeline, batch=1, channels=1, seed=0, **overrides):
    params = sample_params(pipeline, batch, channels, np.random.default_rng(seed))
    for key, value in overrides.items():
        params[key] = torch.as_tensor(value, dtype=params[key].dtype).expand_as(params[key]).clone()
    return params


def volume(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def labels(shape, n=3, seed=0):
    return torch.randint(0, n, shape, generator=torch.Generator().manual_seed(seed)).to(torch.int16)


# A +90-degree angle k samples the input at R v: about axis 0, offset (a, b, c) reads (a, -c, b), i.e.
# rot90(k=-1) in the plane of axes (1, 2); about axis 1, (c, b, -a): rot90(k=1) in (0, 2); about axis 2,
# (-b, a, c): rot90(k=-1) in (0, 1) (Ry carries its sine with the other sign, as in batchgeneratorsv2).
@pytest.mark.parametrize("axis, plane, k", [(0, (1, 2), -1), (1, (0, 2), 1), (2, (0, 1), -1)])
def test_rotation_by_90_degrees_is_rot90(axis, plane, k):
    image, label = volume((2, 2, 6, 6, 6)), labels((2, 6, 6, 6))
    pipeline = AugmentationPipeline(p_rotation=1.0)
    angles = torch.zeros(2, 3, dtype=torch.float64)
    angles[:, axis] = math.pi / 2
    params = params_for(pipeline, batch=2, channels=2, rotation_angles=angles)
    out_image, out_label = apply_augmentation(image, label, params, pipeline, (6, 6, 6))
    assert_close(out_image, torch.rot90(image, k, [d + 2 for d in plane]), atol=1e-5)
    assert torch.equal(out_label, torch.rot90(label, k, [d + 1 for d in plane]))


def test_angle_zero_and_scale_one_is_the_identity():
    """Rotation and scaling switched on with neutral values resample the patch onto itself."""
    image, label = volume((2, 1, 7, 8, 9)), labels((2, 7, 8, 9))
    pipeline = AugmentationPipeline(p_rotation=1.0, p_scaling=1.0)
    params = params_for(pipeline, batch=2, rotation_angles=0.0, scaling_factors=1.0)
    out_image, out_label = apply_augmentation(image, label, params, pipeline, (7, 8, 9))
    assert_close(out_image, image, atol=1e-5)
    assert torch.equal(out_label, label)


def test_scaling_samples_a_ramp_exactly_and_pads_outside_with_label_zero():
    """Factor 2.5 on a 5-voxel patch of a 9-voxel ramp reads voxel coordinates 4 + 2.5 * (-2..2) = -1, 1.5, 4,
    6.5, 9: trilinear interpolation of a ramp is exact inside, the two ends lie outside (image 0, label -1
    cleaned to 0)."""
    image = torch.arange(9, dtype=torch.float32).view(9, 1, 1).expand(9, 9, 9)[None, None].contiguous()
    label = torch.ones(1, 9, 9, 9, dtype=torch.int16)
    pipeline = AugmentationPipeline(p_scaling=1.0)
    params = params_for(pipeline, scaling_factors=2.5)
    out_image, out_label = apply_augmentation(image, label, params, pipeline, (5, 5, 5))
    assert_close(out_image[0, 0, :, 2, 2], torch.tensor([0.0, 1.5, 4.0, 6.5, 0.0]), atol=1e-5)
    assert out_label[0, 0].eq(0).all() and out_label[0, 4].eq(0).all()
    assert out_label[0, 1:4, 1:4, 1:4].eq(1).all()


def test_a_region_smaller_than_the_patch_is_padded_around_its_centre():
    """A 4^3 region in a 6^3 patch starts at 4 // 2 - 6 // 2 = -1: one voxel of padding on each side, image 0
    and label -1, which the cleanup turns into 0."""
    image, label = torch.ones(1, 1, 4, 4, 4), torch.full((1, 4, 4, 4), 2, dtype=torch.int16)
    out_image, out_label = apply_augmentation(image, label, params_for(PIPELINES["none"]), PIPELINES["none"], (6, 6, 6))
    inside = torch.zeros(6, 6, 6, dtype=torch.bool)
    inside[1:5, 1:5, 1:5] = True
    assert torch.equal(out_image[0, 0], inside.float()) and torch.equal(out_label[0], 2 * inside.to(torch.int16))


def test_low_resolution_at_zoom_one_and_mirroring_twice_are_identities():
    image = volume((2, 2, 6, 7, 8))
    pipeline = AugmentationPipeline(p_low_resolution=1.0, p_low_resolution_per_channel=1.0)
    out, _ = apply_augmentation(image, None, params_for(pipeline, 2, 2, low_resolution_zooms=1.0), pipeline, (6, 7, 8))
    assert torch.equal(out, image)

    label = labels((2, 6, 7, 8))
    pipeline = AugmentationPipeline(p_mirror=1.0)
    params = params_for(pipeline, 2, 2)
    once, once_label = apply_augmentation(image, label, params, pipeline, (6, 7, 8))
    assert torch.equal(once, image.flip(2, 3, 4)) and torch.equal(once_label, label.flip(1, 2, 3))
    twice, twice_label = apply_augmentation(once, once_label, params, pipeline, (6, 7, 8))
    assert torch.equal(twice, image) and torch.equal(twice_label, label)


def test_low_resolution_at_zoom_one_half_is_nearest_then_linear():
    """Zoom 0.5 of an 8-voxel axis: 'nearest-exact' keeps voxels 1, 3, 5, 7, linear interpolation back to 8
    places output i at low-res coordinate (i + 0.5) / 2 - 0.5, clamped at 0."""
    ramp = torch.arange(8, dtype=torch.float32) ** 2
    image = ramp[None, None, :, None, None].expand(1, 1, 8, 2, 2).contiguous()
    pipeline = AugmentationPipeline(p_low_resolution=1.0, p_low_resolution_per_channel=1.0)
    params = params_for(pipeline, low_resolution_zooms=0.5)
    out, _ = apply_augmentation(image, None, params, pipeline, (8, 2, 2))
    low = ramp[[1, 3, 5, 7]]
    src = np.clip((np.arange(8) + 0.5) / 2 - 0.5, 0, 3)
    left = np.minimum(np.floor(src).astype(int), 3)
    right, weight = np.minimum(left + 1, 3), torch.tensor(src - left, dtype=torch.float32)
    assert_close(out[0, 0, :, 0, 0], low[left] * (1 - weight) + low[right] * weight, atol=1e-5)
    assert not torch.equal(out, image)


@pytest.mark.parametrize("name", ["gamma", "gamma_inverted"])
def test_gamma_with_retained_statistics_keeps_mean_and_std(name):
    image = volume((2, 3, 8, 8, 8)).exp()  # skewed, so the gamma curve changes the statistics
    pipeline = AugmentationPipeline(**{f"p_{name}": 1.0})
    params = params_for(pipeline, 2, 3, **{f"{name}_exponents": 1.4})
    out, _ = apply_augmentation(image, None, params, pipeline, (8, 8, 8))
    assert_close(out.mean((2, 3, 4)), image.mean((2, 3, 4)), atol=1e-4)
    assert_close(out.std((2, 3, 4)), image.std((2, 3, 4)), atol=1e-4)
    assert (out - image).abs().max() > 0.05
    unretained = apply_augmentation(image, None, params, AugmentationPipeline(gamma_retain_stats=False), (8, 8, 8))[0]
    assert (unretained.mean((2, 3, 4)) - image.mean((2, 3, 4))).abs().max() > 0.01


def test_blurring_a_delta_gives_a_normalised_gaussian():
    """Kernel sizes 3, 5, 7 for sigma 0.5, 0.8, 1.0 (the odd size nearest to 6 sigma + 0.5)."""
    image = torch.zeros(1, 1, 11, 11, 11)
    image[0, 0, 5, 5, 5] = 1.0
    sigmas = (0.5, 0.8, 1.0)
    pipeline = AugmentationPipeline(p_blur=1.0, p_blur_per_channel=1.0)
    params = params_for(pipeline, blur_sigmas=torch.tensor(sigmas, dtype=torch.float64))
    out, _ = apply_augmentation(image, None, params, pipeline, (11, 11, 11))
    expected = torch.ones(())
    for sigma, half in zip(sigmas, (1, 2, 3)):
        offsets = np.arange(-5, 6)
        g = np.where(np.abs(offsets) <= half, np.exp(-(offsets**2) / (2 * sigma**2)), 0.0)
        expected = expected[..., None] * torch.tensor(g / g.sum(), dtype=torch.float32)
    assert_close(out[0, 0], expected, atol=1e-6)
    assert abs(out.sum().item() - 1.0) < 1e-5


def test_sample_params_is_deterministic_and_has_its_keys():
    a = sample_params(PIPELINES["nnunet"], 4, 2, np.random.default_rng(5))
    b = sample_params(PIPELINES["nnunet"], 4, 2, np.random.default_rng(5))
    c = sample_params(PIPELINES["nnunet"], 4, 2, np.random.default_rng(6))
    assert tuple(a) == PARAM_KEYS
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_sample_params_gives_the_probabilities_and_ranges_it_claims():
    n = 20000
    p = sample_params(PIPELINES["nnunet"], n, 2, np.random.default_rng(0))
    tol = 4 * math.sqrt(0.25 / n)  # 4 standard deviations of a frequency
    for key, prob in [("rotation", 0.2), ("scaling", 0.2), ("noise", 0.1), ("blur", 0.2), ("brightness", 0.15),
                      ("contrast", 0.15), ("low_resolution", 0.25), ("gamma_inverted", 0.1), ("gamma", 0.3),
                      ("mirror", 0.5), ("scale_intensity", 0.0)]:  # fmt: skip
        assert abs(p[key].double().mean().item() - prob) < tol, key
    for key in ("blur", "low_resolution"):  # half of the channels of the samples that have the step
        chosen = p[f"{key}_channels"][p[key]]
        assert abs(chosen.double().mean().item() - 0.5) < 3 * tol
        assert not p[f"{key}_channels"][~p[key]].any()
    angles = p["rotation_angles"][p["rotation"]]
    assert math.pi / 6 >= angles.abs().max() > 0.5  # +-30 degrees, and the range is used
    assert (p["rotation_angles"][~p["rotation"]] == 0).all()
    factors = p["scaling_factors"][p["scaling"]]
    assert factors.min() >= 0.7 and factors.max() <= 1.4 and (p["scaling_factors"][~p["scaling"]] == 1).all()
    # BGContrast: half of the factors below 1, uniform on each side
    for key, low, high in [("brightness", 0.75, 1.25), ("contrast", 0.75, 1.25), ("gamma", 0.7, 1.5)]:
        values = p["gamma_exponents" if key == "gamma" else f"{key}_factors"][p[key]]
        assert values.min() >= low and values.max() <= high
        assert abs((values < 1).double().mean().item() - 0.5) < 3 * tol
        assert abs(values[values < 1].mean().item() - (low + 1) / 2) < 0.01
        assert abs(values[values >= 1].mean().item() - (1 + high) / 2) < 0.01
    assert p["noise_std"][p["noise"]].max() <= 0.1 and len(set(p["noise_seed"].tolist())) == n


def test_the_presets_draw_what_their_sources_say():
    n = 4000
    bsf = sample_params(PIPELINES["bsf_finetune"], n, 2, np.random.default_rng(1))
    assert bsf["scale_intensity"].all() and bsf["shift_intensity"].all() and not bsf["rotation"].any()
    assert bsf["scale_intensity_factors"].abs().max() <= 0.1 and bsf["shift_intensity_offsets"].abs().max() <= 0.1
    sam = sample_params(PIPELINES["sam_flips"], n, 1, np.random.default_rng(2))
    assert abs(sam["mirror"].double().mean().item() - 0.5) < 0.05
    assert not any(sam[k].any() for k in ("rotation", "noise", "gamma", "scale_intensity"))
    none = sample_params(PIPELINES["none"], n, 1, np.random.default_rng(3))
    assert not any(none[k].any() for k in PARAM_KEYS if none[k].dtype == torch.bool)
    assert initial_patch_size((16, 16, 16), PIPELINES["bsf_finetune"]) == (16, 16, 16)


def test_bsf_scale_then_shift_is_monai_semantics():
    """MONAI RandScaleIntensity: x * (1 + f); RandShiftIntensity: x + o; one f and o for all channels."""
    image = volume((2, 3, 4, 4, 4))
    pipeline = AugmentationPipeline(p_scale_intensity=1.0, p_shift_intensity=1.0)
    params = params_for(pipeline, 2, 3, seed=4)
    out, _ = apply_augmentation(image, None, params, pipeline, (4, 4, 4))
    f = params["scale_intensity_factors"].float()[:, None, None, None, None]
    o = params["shift_intensity_offsets"].float()[:, None, None, None, None]
    assert_close(out, image * (1 + f) + o, atol=1e-6)
    monai = pytest.importorskip("monai.transforms")
    b = 1
    ref = monai.ShiftIntensity(float(o[b]))(monai.ScaleIntensity(minv=None, maxv=None, factor=float(f[b]))(image[b]))
    assert_close(out[b], torch.as_tensor(ref), atol=1e-6)


def test_initial_patch_size_is_nnunets_get_patch_size():
    """128^3, 30 degrees: a turn about any axis stretches two sides to 128 (cos 30 + sin 30) = 174.85; divided
    by 0.85 and truncated: 205. (64, 160, 160): the x turn gives (64, 218.56, 58.56), y (24.62, 160, 170.56),
    z (135.43, 106.56, 160) -> max / 0.85 = (159.3, 257.1, 200.7)."""
    nnunet = PIPELINES["nnunet"]
    assert initial_patch_size((128, 128, 128), nnunet) == (205, 205, 205)
    assert initial_patch_size((64, 160, 160), nnunet) == (159, 257, 200)
    assert initial_patch_size((20, 20, 20), AugmentationPipeline(p_scaling=0.5)) == (23, 23, 23)
    assert initial_patch_size((20, 20, 20), PIPELINES["none"]) == (20, 20, 20)


def test_channel_mask_keeps_missing_channels_zero():
    region = initial_patch_size((8, 8, 8), EVERY_P_ONE)
    image = volume((2, 3, *region)) + 2
    image[0, 1] = 0
    image[1, 2] = 0
    mask = image.flatten(2).abs().amax(2) > 0
    params = params_for(EVERY_P_ONE, 2, 3, seed=1)
    out, _ = apply_augmentation(image, labels((2, *region)), params, EVERY_P_ONE, (8, 8, 8), channel_mask=mask)
    assert out[0, 1].eq(0).all() and out[1, 2].eq(0).all()
    assert out[mask].flatten(1).ne(0).all(1).all()  # the present channels were augmented, not blanked
    unmasked, _ = apply_augmentation(image, labels((2, *region)), params, EVERY_P_ONE, (8, 8, 8))
    assert unmasked[0, 1].ne(0).any()  # noise and shift would fill a missing channel


@pytest.mark.parametrize("chunk", [1, 3])
def test_a_sample_gives_the_same_result_alone_and_in_a_batch(chunk):
    """chunk=3 runs every step vectorised over the batch (the default on GPUs), chunk=1 sample by sample (the
    CPU default): a sample's result is the same bits either way, and the same as on its own."""
    region = initial_patch_size((8, 9, 10), EVERY_P_ONE)
    image, label = volume((3, 2, *region), seed=2), labels((3, *region), n=4, seed=2)
    params = params_for(EVERY_P_ONE, 3, 2, seed=2)
    params["rotation"][2] = params["scaling"][2] = False  # one cropped sample among resampled ones
    batch_image, batch_label = apply_augmentation(image, label, params, EVERY_P_ONE, (8, 9, 10), chunk=chunk)
    one = {k: v[1:2] for k, v in params.items()}
    alone_image, alone_label = apply_augmentation(image[1:2], label[1:2], one, EVERY_P_ONE, (8, 9, 10))
    assert torch.equal(alone_image[0], batch_image[1]) and torch.equal(alone_label[0], batch_label[1])
    assert not torch.equal(batch_image[0], batch_image[1])
    last = {k: v[2:] for k, v in params.items()}
    last_image, last_label = apply_augmentation(image[2:], label[2:], last, EVERY_P_ONE, (8, 9, 10))
    assert torch.equal(last_image[0], batch_image[2]) and torch.equal(last_label[0], batch_label[2])


def test_inputs_are_not_modified_and_label_none_gives_the_same_image():
    region = initial_patch_size((6, 6, 6), EVERY_P_ONE)
    image, label = volume((2, 1, *region)), labels((2, *region))
    image_copy, label_copy = image.clone(), label.clone()
    params = params_for(EVERY_P_ONE, 2, 1, seed=3)
    with_label, _ = apply_augmentation(image, label, params, EVERY_P_ONE, (6, 6, 6))
    without_label, none = apply_augmentation(image, None, params, EVERY_P_ONE, (6, 6, 6))
    assert torch.equal(image, image_copy) and torch.equal(label, label_copy)
    assert none is None and torch.equal(with_label, without_label)


def test_autocast_bfloat16_runs_in_float32():
    region = initial_patch_size((6, 6, 6), EVERY_P_ONE)
    image, label = volume((2, 2, *region)), labels((2, *region))
    params = params_for(EVERY_P_ONE, 2, 2, seed=4)
    plain = apply_augmentation(image, label, params, EVERY_P_ONE, (6, 6, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        autocast = apply_augmentation(image, label, params, EVERY_P_ONE, (6, 6, 6))
    assert autocast[0].dtype == torch.float32
    assert torch.equal(plain[0], autocast[0]) and torch.equal(plain[1], autocast[1])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_with_the_same_params():
    pipeline = dataclasses.replace(EVERY_P_ONE, p_noise=0.0)  # noise differs by device (its generator)
    region = initial_patch_size((16, 16, 16), pipeline)
    image, label = volume((2, 2, *region)), labels((2, *region), n=3)
    params = params_for(pipeline, 2, 2, seed=5)
    cpu = apply_augmentation(image, label, params, pipeline, (16, 16, 16))
    cuda = apply_augmentation(image.cuda(), label.cuda(), params, pipeline, (16, 16, 16))
    assert_close(cuda[0].cpu(), cpu[0], atol=1e-4)
    assert (cuda[1].cpu() != cpu[1]).double().mean() < 1e-3  # only float16 ties may settle differently


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: initial_patch_size((16, 16), PIPELINES["nnunet"]), "patch_size"),
        (lambda: initial_patch_size(128, PIPELINES["nnunet"]), "patch_size"),
        (lambda: AugmentationPipeline(p_rotation=1.5), "p_rotation"),
        (lambda: AugmentationPipeline(scaling_range=(1.4, 0.7)), "scaling_range"),
        (lambda: AugmentationPipeline(low_resolution_zoom_range=(0.5, 2.0)), "low_resolution_zoom_range"),
        (lambda: sample_params(PIPELINES["nnunet"], 0, 1, np.random.default_rng(0)), "batch_size"),
        (lambda: _apply(patch=(4, 4)), "patch_size"),
        (lambda: _apply(image=torch.zeros(1, 4, 4, 4)), "image"),
        (lambda: _apply(label=torch.zeros(1, 4, 4, 4, dtype=torch.uint8)), "label"),
        (lambda: _apply(label=torch.zeros(1, 4, 4, 5, dtype=torch.int16)), "label"),
        (lambda: _apply(params={}), "params"),
        (lambda: _apply(params=sample_params(PIPELINES["none"], 2, 1, np.random.default_rng(0))), "params"),
        (lambda: _apply(channel_mask=torch.ones(1, 2, dtype=torch.bool)), "channel_mask"),
        (lambda: _apply(chunk=0), "chunk"),
    ],
)
def test_bad_arguments_raise_one_sentence(call, message):
    with pytest.raises(InputError, match=message):
        call()


def _apply(image=None, label=None, params=None, patch=(4, 4, 4), channel_mask=None, chunk=None):
    image = torch.zeros(1, 1, 4, 4, 4) if image is None else image
    label = torch.zeros(1, 4, 4, 4, dtype=torch.int16) if label is None else label
    params = sample_params(PIPELINES["none"], 1, 1, np.random.default_rng(0)) if params is None else params
    return apply_augmentation(image, label, params, PIPELINES["none"], patch, channel_mask=channel_mask, chunk=chunk)
