"""shared.augment vs batchgeneratorsv2 0.3.6: given the same sampled parameters, every step of nnU-Net v2's
training augmentation gives the same image and labels as BGv2's own per-sample `_apply_to_image` /
`_apply_to_segmentation`, with nnU-Net's settings (nnUNetTrainer.get_training_transforms, 3D).

Run: .venv/bin/python -m pytest -q tests/test_shared_augment_parity.py (skipped without batchgeneratorsv2)
"""

import importlib
import importlib.util
import sys
import types

import numpy as np
import pytest
import torch

from shared.augment import PIPELINES, AugmentationPipeline, apply_augmentation, initial_patch_size, sample_params

pytest.importorskip("batchgeneratorsv2")


def import_bgv2() -> types.SimpleNamespace:
    """batchgeneratorsv2's transform modules. They import pandas and scikit-image at import time, which are not
    installed here; stand-ins are put in sys.modules only while importing: SpatialTransform calls
    `pd.unique` on a label channel (np.unique gives the same values, sorted, and BGv2 sorts them), and the blur
    module imports `skimage.data.camera` for its demo only."""
    stubs = {}
    if importlib.util.find_spec("pandas") is None:
        stubs["pandas"] = types.ModuleType("pandas")
        stubs["pandas"].unique = np.unique
    if importlib.util.find_spec("skimage") is None:
        stubs["skimage"], stubs["skimage.data"] = types.ModuleType("skimage"), types.ModuleType("skimage.data")
        stubs["skimage.data"].camera = None
        stubs["skimage"].data = stubs["skimage.data"]
    sys.modules.update(stubs)
    try:
        names = {
            "spatial": "spatial.spatial", "noise": "intensity.gaussian_noise", "blur": "noise.gaussian_blur",
            "brightness": "intensity.brightness", "contrast": "intensity.contrast",
            "low_resolution": "spatial.low_resolution", "gamma": "intensity.gamma", "mirror": "spatial.mirroring",
            "remove_label": "utils.remove_label", "random": "utils.random", "compose": "utils.compose",
        }  # fmt: skip
        return types.SimpleNamespace(
            **{key: importlib.import_module(f"batchgeneratorsv2.transforms.{name}") for key, name in names.items()}
        )
    finally:
        for name in stubs:
            del sys.modules[name]


def nnunet_transforms(bg, patch_size, every_p_one: bool = False) -> dict:
    """nnU-Net v2's training transforms for 3D patches (no dummy 2D, no masking, cascade or regions), by name,
    with BGv2's classes; `every_p_one` sets every probability (also per channel) to 1. Mirroring has no
    probability to set in BGv2 (0.5 per axis)."""
    p = (lambda value: 1.0) if every_p_one else (lambda value: value)
    contrast = bg.contrast.BGContrast
    return {
        "spatial": bg.spatial.SpatialTransform(
            patch_size, patch_center_dist_from_border=0, random_crop=False, p_elastic_deform=0,
            p_rotation=p(0.2), rotation=(-np.pi / 6, np.pi / 6), p_scaling=p(0.2), scaling=(0.7, 1.4),
            p_synchronize_scaling_across_axes=1, bg_style_seg_sampling=False, border_mode_seg="constant",
            padding_value_seg=-1,
        ),
        "noise": bg.noise.GaussianNoiseTransform(noise_variance=(0, 0.1), p_per_channel=1, synchronize_channels=True),
        "blur": bg.blur.GaussianBlurTransform(
            blur_sigma=(0.5, 1.0), synchronize_channels=False, synchronize_axes=False, p_per_channel=p(0.5),
            benchmark=True,
        ),
        "brightness": bg.brightness.MultiplicativeBrightnessTransform(
            multiplier_range=contrast((0.75, 1.25)), synchronize_channels=False, p_per_channel=1
        ),
        "contrast": bg.contrast.ContrastTransform(
            contrast_range=contrast((0.75, 1.25)), preserve_range=True, synchronize_channels=False, p_per_channel=1
        ),
        "low_resolution": bg.low_resolution.SimulateLowResolutionTransform(
            scale=(0.5, 1), synchronize_channels=False, synchronize_axes=True, ignore_axes=None,
            allowed_channels=None, p_per_channel=p(0.5),
        ),
        "gamma_inverted": bg.gamma.GammaTransform(
            gamma=contrast((0.7, 1.5)), p_invert_image=1, synchronize_channels=False, p_per_channel=1,
            p_retain_stats=1,
        ),
        "gamma": bg.gamma.GammaTransform(
            gamma=contrast((0.7, 1.5)), p_invert_image=0, synchronize_channels=False, p_per_channel=1,
            p_retain_stats=1,
        ),
        "mirror": bg.mirror.MirrorTransform(allowed_axes=(0, 1, 2)),
        "remove_label": bg.remove_label.RemoveLabelTansform(-1, 0),
    }  # fmt: skip


def nnunet_compose(bg, patch_size, every_p_one: bool = False):
    """nnU-Net's pipeline as BGv2 runs it: ComposeTransforms of RandomTransform-wrapped steps."""
    steps = nnunet_transforms(bg, patch_size, every_p_one)
    apply_p = {"noise": 0.1, "blur": 0.2, "brightness": 0.15, "contrast": 0.15, "low_resolution": 0.25,
               "gamma_inverted": 0.1, "gamma": 0.3}  # fmt: skip
    wrapped = [
        bg.random.RandomTransform(t, apply_probability=1.0 if every_p_one else apply_p[name]) if name in apply_p else t
        for name, t in steps.items()
    ]
    return bg.compose.ComposeTransforms(wrapped)


def bgv2_apply_sample(bg, steps: dict, image, label, params: dict, b: int):
    """Sample b through BGv2's steps with our parameters injected into its `_apply_to_*` calls.

    Args:
        steps: from `nnunet_transforms` (only the spatial step's patch size matters).
        image: (C, X0, Y0, Z0) float32; label: (1, X0, Y0, Z0) integer. Both are changed in place.

    Returns:
        image (C, x, y, z), label (1, x, y, z).
    """
    C = image.shape[0]
    every = torch.arange(C)
    # the spatial grid is built by BGv2 itself, from our angles and factor passed as its "random" scalars
    spatial = steps["spatial"]
    spatial.p_rotation, spatial.p_scaling = float(params["rotation"][b]), float(params["scaling"][b])
    spatial.rotation = lambda image, dim: float(params["rotation_angles"][b, dim])
    spatial.scaling = lambda image, dim: float(params["scaling_factors"][b])
    geometry = spatial.get_parameters(image=image)
    image = spatial._apply_to_image(image, **geometry)
    label = spatial._apply_to_segmentation(label, **geometry)

    if params["noise"][b]:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(params["noise_seed"][b]))
            noise = {"apply_mask": torch.ones(C, dtype=torch.bool), "apply_idx": every, "num_apply": C}
            image = steps["noise"]._apply_to_image(image, sigmas=float(params["noise_std"][b]), **noise)
    if params["blur"][b]:
        blurred = params["blur_channels"][b]
        sigmas = [params["blur_sigmas"][b, c].tolist() for c in range(C) if blurred[c]]
        image = steps["blur"]._apply_to_image(image, apply_to_channel=blurred, sigmas=sigmas)
    if params["brightness"][b]:
        factors = torch.Tensor(params["brightness_factors"][b].tolist())
        image = steps["brightness"]._apply_to_image(image, apply_to_channel=every, multipliers=factors)
    if params["contrast"][b]:
        factors = params["contrast_factors"][b].float()
        image = steps["contrast"]._apply_to_image(image, apply_to_channel=every, multipliers=factors)
    if params["low_resolution"][b]:
        chosen = params["low_resolution_channels"][b].nonzero().flatten()
        zooms = torch.Tensor([[float(params["low_resolution_zooms"][b, c])] * 3 for c in chosen])
        image = steps["low_resolution"]._apply_to_image(image, apply_to_channel=chosen, scales=zooms)
    for name, inverted in (("gamma_inverted", True), ("gamma", False)):
        if params[name][b]:
            flags = {"retain_stats": torch.ones(C, dtype=torch.bool), "invert_image": torch.full((C,), inverted)}
            gammas = params[f"{name}_exponents"][b].float()
            image = steps[name]._apply_to_image(image, apply_to_channel=every, gamma=gammas, **flags)
    axes = [k for k in range(3) if params["mirror"][b, k]]
    image = steps["mirror"]._apply_to_image(image, axes=axes)
    label = steps["mirror"]._apply_to_segmentation(label, axes=axes)
    label = steps["remove_label"]._apply_to_segmentation(label)
    return image, label


@pytest.fixture(scope="module")
def bg():
    return import_bgv2()


def smooth_volume(shape, seed):
    """Random (..., X, Y, Z) float32 with structure at several scales (a box-blurred noise plus noise)."""
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    flat = x.reshape(-1, 1, *shape[-3:])
    smooth = torch.nn.functional.avg_pool3d(flat, 5, stride=1, padding=2, count_include_pad=False).view(shape)
    return 3 * smooth + 0.3 * x + 1


def blob_labels(shape, n_labels, seed):
    """(X, Y, Z) int16 labels 0 .. n_labels - 1: nested thresholds of a smooth random field."""
    field = smooth_volume((1, *shape), seed)[0]
    levels = torch.quantile(field.flatten(), torch.linspace(0, 1, n_labels + 1)[1:-1])
    return torch.bucketize(field, levels).to(torch.int16)


def compare(bg, pipeline, image, label, patch, seed, atol):
    """Sample params from `pipeline` for the batch, apply ours (sample by sample and as one batch) and BGv2 per
    sample, compare; returns the params."""
    params = sample_params(pipeline, image.shape[0], image.shape[1], np.random.default_rng(seed))
    ours_image, ours_label = apply_augmentation(image, label, params, pipeline, patch)
    # the whole batch at once (the GPU default) gives the same bits as sample by sample (the CPU default)
    batched_image, batched_label = apply_augmentation(image, label, params, pipeline, patch, chunk=len(image))
    assert torch.equal(batched_image, ours_image) and torch.equal(batched_label, ours_label)
    steps = nnunet_transforms(bg, patch)
    for b in range(image.shape[0]):
        ref_image, ref_label = bgv2_apply_sample(bg, steps, image[b].clone(), label[b][None].clone(), params, b)
        diff = (ours_image[b] - ref_image).abs()
        assert diff.max() <= atol, f"sample {b}: max |diff| {diff.max():.3g}, mean {diff.mean():.3g}"
        mismatched = (ours_label[b] != ref_label[0]).sum()
        assert mismatched == 0, f"sample {b}: {int(mismatched)} of {ref_label.numel()} labels differ"
    return params


PATCH = (20, 24, 16)  # anisotropic, so that a swapped axis cannot go unnoticed


def test_rotation_and_scaling_match_bgv2(bg):
    """Rotation alone, scaling alone and both; 2-, 3- and 4-label samples; scaling up to 1.4 reaches outside
    the read region (padding label -1, then 0), one read region already holds -1 as the loader pads, and one
    has gaps between its label values."""
    region = initial_patch_size(PATCH, PIPELINES["nnunet"])
    cases = [(2, 0.5, 0.5), (3, 1.0, 0.0), (4, 0.0, 1.0), (2, 1.0, 1.0), (3, 1.0, 1.0)]
    for i, (n_labels, p_rotation, p_scaling) in enumerate(cases):
        pipeline = AugmentationPipeline(p_rotation=p_rotation, p_scaling=p_scaling)
        image = smooth_volume((3, 2, *region), seed=i)
        label = torch.stack([blob_labels(region, n_labels, seed=10 * i + b) for b in range(3)])
        label[1, :2] = -1
        label[2] *= 2  # a gap in the label values (0, 2, 4, ...)
        params = compare(bg, pipeline, image, label, PATCH, seed=i, atol=1e-5)
    assert params["rotation"].any() and params["scaling"].any()


def test_resampled_labels_tie_break_like_bgv2(bg):
    """A 90-degree turn of an even-sized region about its centre puts many sample points exactly between
    voxels (interpolated score 500): those ties must go to the same label as in BGv2."""
    image = smooth_volume((2, 1, 12, 12, 12), seed=3)
    label = torch.stack([blob_labels((12, 12, 12), n, seed=n) for n in (2, 3)])
    pipeline = AugmentationPipeline(p_rotation=1.0, rotation_range=(np.pi / 2, np.pi / 2))
    compare(bg, pipeline, image, label, (9, 9, 9), seed=0, atol=1e-5)


@pytest.mark.parametrize(
    "name, pipeline",
    [
        ("noise", AugmentationPipeline(p_noise=1.0)),
        ("blur", AugmentationPipeline(p_blur=1.0)),
        ("brightness", AugmentationPipeline(p_brightness=1.0)),
        ("contrast", AugmentationPipeline(p_contrast=1.0)),
        ("low_resolution", AugmentationPipeline(p_low_resolution=1.0)),
        ("gamma_inverted", AugmentationPipeline(p_gamma_inverted=1.0)),
        ("gamma", AugmentationPipeline(p_gamma=1.0)),
        ("mirror", AugmentationPipeline(p_mirror=0.5)),
    ],
)
def test_each_step_matches_bgv2(bg, name, pipeline):
    image = smooth_volume((4, 3, *PATCH), seed=5)
    label = torch.stack([blob_labels(PATCH, 3, seed=b) for b in range(4)])
    params = compare(bg, pipeline, image, label, PATCH, seed=7, atol=1e-5)
    if name == "mirror":
        assert params["mirror"].any() and not params["mirror"].all()
    elif name in ("blur", "low_resolution"):  # half of the channels, so the selection is exercised
        assert params[f"{name}_channels"].any() and not params[f"{name}_channels"].all()


def test_whole_pipeline_with_every_probability_one_matches_bgv2(bg):
    every = {f: 1.0 for f in AugmentationPipeline.__dataclass_fields__ if f.startswith("p_")}
    pipeline = AugmentationPipeline(**{**every, "p_scale_intensity": 0.0, "p_shift_intensity": 0.0})
    region = initial_patch_size(PATCH, pipeline)
    image = smooth_volume((2, 2, *region), seed=11)
    label = torch.stack([blob_labels(region, n, seed=n) for n in (2, 3)])
    compare(bg, pipeline, image, label, PATCH, seed=3, atol=1e-4)


def test_nnunet_compose_runs_and_keeps_the_label_set(bg):
    """The ComposeTransforms used by the benchmark runs on one sample and yields a patch of labels from the
    input's set (-1 cleaned away)."""
    region = initial_patch_size(PATCH, PIPELINES["nnunet"])
    label = blob_labels(region, 3, seed=0)[None]
    compose = nnunet_compose(bg, PATCH, every_p_one=True)
    state = np.random.get_state()
    with torch.random.fork_rng(devices=[]):
        out = compose(image=smooth_volume((1, *region), seed=0), segmentation=label)
    np.random.set_state(state)
    assert out["image"].shape == (1, *PATCH)
    assert set(out["segmentation"].unique().tolist()) <= {0, 1, 2}
