"""The training batches of moe_missing (paper 3.2 crops, Eq. 2 codes, gate noise) and the held-out validation.

Run: .venv/bin/python -m pytest -q tests/test_moe_missing_data.py
"""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_missing.data import MissingModalityBatches, case_codes, preprocessing
from moe_missing.losses import modality_dropout_objective
from moe_missing.model import MoEUNetConfig, build_model
from moe_missing.predict import window_logits
from moe_missing.validate import improved, validation_score
from shared.augment import PIPELINES, BatchAugmentation, initial_patch_size
from shared.cache import build_cache
from shared.metrics import dice
from shared.phantom import write_phantom_datasets

PATCH = (16, 16, 16)


@pytest.fixture(scope="module")
def raw(tmp_path_factory):
    """4 MS phantoms of 20^3 voxels at 1 mm; case 001 has no T1 file."""
    root = tmp_path_factory.mktemp("phantoms")
    (folder,) = write_phantom_datasets(root, datasets=["ms"], cases=4, shape=(20, 20, 20), seed=1)
    (folder / "imagesTr" / "PhantomMS_001_0000.nii.gz").unlink()
    return folder


@pytest.fixture(scope="module")
def cases(raw):
    return build_cache(raw, preprocessing(("T1", "T2", "FLAIR")), cache_root=raw.parent / "cache", progress=False)


def test_the_cache_keeps_a_missing_channel_as_zeros_marked_unavailable(cases):
    by_id = {c.case_id: c for c in cases}
    assert by_id["PhantomMS_001"].available == (0, 1, 1) and by_id["PhantomMS_000"].available == (1, 1, 1)
    assert not np.asarray(by_id["PhantomMS_001"].open_image()[0]).any()
    assert by_id["PhantomMS_000"].spacing == (1.0, 1.0, 1.0)


def test_the_cache_follows_the_modality_order(raw, cases):
    """Another --modalities order gives another cache entry with its channels in that order, never a stale one."""
    first = next(c for c in cases if c.case_id == "PhantomMS_000")
    prep = preprocessing(("FLAIR", "T1", "T2"))
    (swapped,) = build_cache(raw, prep, case_ids=["PhantomMS_000"], cache_root=raw.parent / "cache", progress=False)
    assert swapped.channels == ("FLAIR", "T1", "T2") and Path(swapped.image).parent != Path(first.image).parent
    np.testing.assert_array_equal(np.asarray(swapped.open_image()), np.asarray(first.open_image())[[2, 0, 1]])


def test_batch_is_a_function_of_the_step_generator_with_z_scored_crops(cases):
    draw = MissingModalityBatches(cases, batch_size=6, patch=PATCH, fg_prob=1.0)
    batch = draw(np.random.default_rng(7))
    again = draw(np.random.default_rng(7))
    assert all(torch.equal(batch[k], again[k]) for k in ("image", "label", "code", "eps"))
    assert batch["image"].shape == (6, 3, *PATCH) and batch["label"].shape == (6, *PATCH)
    assert batch["eps"].shape == (12, 3)  # one gate-noise draw per sample of the full and the dropped view
    for b in range(6):
        for k in range(3):
            channel = batch["image"][b, k]
            if batch["available"][b, k]:  # per crop and channel: mean 0, std 1 (population)
                assert abs(channel.mean().item()) < 1e-5 and channel.std(correction=0).item() == pytest.approx(
                    1, abs=1e-4
                )
            else:
                assert not channel.any()  # a missing channel stays zero
        assert (batch["code"][b] <= batch["available"][b]).all() and batch["code"][b].any()  # a subset it has


def test_crops_are_centred_on_a_lesion_voxel_with_probability_fg_prob(cases):
    def lesion_share(fg_prob):  # share of 4^3 crops that hold a lesion voxel
        labels = MissingModalityBatches(cases, batch_size=400, patch=(4, 4, 4), fg_prob=fg_prob)(
            np.random.default_rng(1))["label"]  # fmt: skip
        return (labels.flatten(1).sum(1) > 0).float().mean().item()

    random_share = lesion_share(0.0)
    assert random_share < 0.5  # small crops placed at random mostly miss the lesions
    assert lesion_share(1.0) == 1.0  # each crop holds the lesion voxel it is centred on
    # 80 %: centred crops plus the random ones that hit by chance (400 crops: SE ~ 0.02)
    assert lesion_share(0.8) == pytest.approx(0.8 + 0.2 * random_share, abs=0.08)


def test_modality_dropout_codes_are_uniform_and_a_dedicated_code_is_fixed(cases):
    full = [c for c in cases if c.available == (1, 1, 1)]
    draw = MissingModalityBatches(full, batch_size=700, patch=(4, 4, 4), fg_prob=0.0)
    codes = draw(np.random.default_rng(0))["code"].numpy()
    _, counts = np.unique(codes, axis=0, return_counts=True)
    assert len(counts) == 7 and all(abs(n - 100) < 40 for n in counts)  # 1/7 each, ~4 sigma
    dedicated = MissingModalityBatches(cases, batch_size=3, patch=(4, 4, 4), dedicated="101")
    assert dedicated(np.random.default_rng(0))["code"].tolist() == [[1.0, 0.0, 1.0]] * 3


def test_augmented_batches_keep_a_missing_channel_zero(cases):
    # nnU-Net's pipeline with every intensity step always on: noise alone would fill a zero channel
    pipeline = dataclasses.replace(PIPELINES["nnunet"], p_noise=1.0, p_brightness=1.0, p_contrast=1.0, p_gamma=1.0,
                                   p_rotation=1.0)  # fmt: skip
    no_t1 = [c for c in cases if c.case_id == "PhantomMS_001"]
    draw = MissingModalityBatches(no_t1, batch_size=2, patch=(8, 8, 8), fg_prob=0.5, pipeline=pipeline)
    batch = draw(np.random.default_rng(3))
    assert batch["image"].shape[2:] == initial_patch_size((8, 8, 8), pipeline) and "aug" in batch
    out = BatchAugmentation(pipeline, (8, 8, 8))(batch)
    assert out["image"].shape == (2, 3, 8, 8, 8) and out["label"].shape == (2, 8, 8, 8)
    assert not out["image"][:, 0].any() and out["image"][:, 1:].abs().sum() > 0  # T1 (missing) stays exactly 0
    assert set(out["label"].unique().tolist()) <= {0, 1}  # nnU-Net's -1 padding is cleaned up
    assert "aug" not in MissingModalityBatches(no_t1, batch_size=2, patch=(8, 8, 8))(np.random.default_rng(3))


def test_case_codes_follow_the_channels_the_case_has():
    assert len(case_codes((1, 1, 1), None)) == 7
    assert case_codes((0, 1, 1), None) == [(0, 1, 0), (0, 0, 1), (0, 1, 1)]
    assert case_codes((1, 1, 1), "101") == [(1, 0, 1)] and case_codes((0, 1, 1), "101") == []


def test_validation_objective_is_eq2_exactly_and_dice_of_the_argmax(cases):
    torch.manual_seed(0)
    model = build_model(MoEUNetConfig(features=(4, 8))).eval()
    case = next(c for c in cases if c.case_id == "PhantomMS_000")
    image = torch.from_numpy(np.array(case.open_image()))[None]
    label = torch.from_numpy(np.array(case.open_label(), dtype=np.int64))[None]

    def whole_volume(x, code):
        return window_logits(model, x, code, patch_size=PATCH)

    score = validation_score(model, [case], patch=PATCH, device=torch.device("cpu"))
    assert score["pairs"] == 7
    assert score["objective"] == pytest.approx(modality_dropout_objective(whole_volume, image, label).item(), rel=1e-6)
    dices = []
    for code in case_codes(case.available, None):
        m = torch.tensor([code], dtype=torch.float32)
        pred = whole_volume(image * m[:, :, None, None, None], m).argmax(1)
        dices.append(dice(pred.numpy() == 1, label.numpy() == 1))
    assert score["dice"] == pytest.approx(np.mean(dices))
    assert not model.training
    assert improved(0.5, {"metric": "objective", "value": 0.6, "step": 1}, "objective")
    assert not improved(0.5, {"metric": "dice", "value": 0.6, "step": 1}, "dice") and not improved(
        float("nan"), None, "dice"
    )
