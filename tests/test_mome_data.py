"""MoME's data path: one cache per dataset for every label rule, per-sample targets and foreground classes, missing
channels never sampled, --keep-labels heads. Run: .venv/bin/python -m pytest -q tests/test_mome_data.py
"""

import argparse
import dataclasses

import numpy as np
import pytest
import torch
from test_mome_evaluate import TUMOUR_LABELS, write_dataset

from mome import train_expert
from mome.data import MoMEDraw, prepare_data
from shared.augment import PIPELINES, BatchAugmentation, initial_patch_size
from shared.checkpoint import load_checkpoint
from shared.harness import DistInfo
from shared.intensity import zscore

SINGLE = DistInfo(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), is_main=True)


def tumour_dataset(root):
    """Two cases with T1 and T1ce (declared channels 0 and 2); case b lacks its T1ce file.

    Label: necrosis (1) in one corner, edema (2) in the opposite one, enhancing (3) beside the necrosis.
    """
    rng = np.random.default_rng(0)
    label = np.zeros((16, 16, 16), np.uint8)
    label[1:4, 1:4, 1:4], label[12:15, 12:15, 12:15], label[4:6, 1:4, 1:4] = 1, 2, 3
    images = {0: rng.normal(5, 2, (16, 16, 16)), 2: rng.normal(9, 3, (16, 16, 16))}
    cases = {"a": (label, images), "b": (label, {0: images[0]})}
    return write_dataset(root / "Dataset001_Tumour", {"0": "T1", "2": "T1ce"}, TUMOUR_LABELS, cases), images


def args_for(root, cache, **kw):
    defaults = dict(data=[str(root)], split_file=None, fold=-1, folds=5, cache=str(cache), label_rule=[],
                    modalities=["T1", "T1ce", "T2", "FLAIR", "DWI"], keep_labels=False)  # fmt: skip
    return argparse.Namespace(**(defaults | kw))


def test_one_cache_serves_every_label_rule_and_targets_are_made_per_sample(tmp_path):
    root, images = tumour_dataset(tmp_path)
    _, plain = prepare_data(args_for(root, tmp_path / "cache"), SINGLE)
    _, core = prepare_data(args_for(root, tmp_path / "cache", label_rule=["T1ce=necrosis,enhancing"]), SINGLE)
    assert [c.image for c in plain.cases] == [c.image for c in core.cases]  # the same cache files
    assert len(list((tmp_path / "cache" / root.name).iterdir())) == 1  # one cache folder for the dataset
    # 3 samples: a/T1, a/T1ce, b/T1 (b's T1ce file is missing: a zero channel, never sampled)
    assert [(plain.cases[c].case_id, m) for c, m in zip(core.case_of, core.modalities)] == [
        ("a", "T1"), ("a", "T1ce"), ("b", "T1")]  # fmt: skip
    assert core.lesion == [(1, 2, 3), (1, 3), (1, 2, 3)] and core.experts.tolist() == [0, 1, 0]
    assert core.grid == (16, 16, 16)
    # the cached channels are the whole-volume z-score of the files of the declared indices 0 and 2
    cached = core.cases[0].open_image()
    np.testing.assert_allclose(cached[1], zscore(images[2][None])[0], atol=1e-5)

    t1ce = dataclasses.replace(
        core,
        case_of=core.case_of[1:2],
        channels=core.channels[1:2],
        modalities=core.modalities[1:2],
        experts=core.experts[1:2],
        lesion=core.lesion[1:2],
    )
    # the whole volume as the patch: the batch is the cached T1ce channel and its tumour-core mask
    whole = MoMEDraw(
        t1ce,
        batch_size=2,
        patch_size=(16, 16, 16),
    )(np.random.default_rng(0))
    np.testing.assert_array_equal(whole["image"][0, 0].numpy(), cached[1])
    np.testing.assert_array_equal(whole["label"][0].numpy(), np.isin(core.cases[0].open_label(), (1, 3)))
    assert whole["expert"].tolist() == [1, 1]
    # 8^3 patches: the forced sample (index 1) is centred on a tumour-core voxel, never on the edema corner,
    # whose patch would hold no tumour core
    draw = MoMEDraw(t1ce, batch_size=2, patch_size=(8, 8, 8), oversample=0.5)
    for seed in range(20):
        batch = draw(np.random.default_rng(seed))
        assert batch["image"].shape == (2, 1, 8, 8, 8) and batch["label"].dtype == torch.int64
        assert set(batch["label"].unique().tolist()) <= {0, 1} and batch["label"][1].any()


def test_universal_nnunet_gets_every_channel_phase_1_one_modality_phase_2_those_with_an_expert(tmp_path):
    root, _ = tumour_dataset(tmp_path)
    only_t1 = args_for(root, tmp_path / "cache", modalities=["T1"])
    pick = {m: prepare_data(only_t1, SINGLE, only_modality=m)[1] for m in ("all", "T1", None)}
    assert pick["all"].modalities == ["T1", "T1ce", "T1"] and pick["all"].experts.tolist() == [0, -1, 0]
    assert pick["T1"].modalities == pick[None].modalities == ["T1", "T1"]


def test_keep_labels_sizes_the_heads_from_the_declared_labels(tmp_path, monkeypatch):
    root, _ = tumour_dataset(tmp_path)
    monkeypatch.setenv("BRAINSEG_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    train_expert.main(["--modality", "T1", "--data", str(root), "--keep-labels", "--features", "4", "8", "--patch",
                       "16", "16", "16", "--batch-size", "2", "--steps-per-epoch", "2", "--epochs", "1", "--fold",
                       "-1", "--device", "cpu", "--no-compile", "--workers", "0", "--out", str(out)])  # fmt: skip
    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["config"]["num_classes"] == 4  # labels 0..3 (the crash was "Target 3 is out of bounds")
    assert ckpt["model"]["decoder.seg_layers.0.weight"].shape[0] == 4


@pytest.mark.parametrize("oversample,forced", [(0.33, [False, True]), (0.0, [False, False]), (1.0, [True, True])])
def test_draw_forces_nnunets_last_samples_to_foreground(tmp_path, oversample, forced):
    root, _ = tumour_dataset(tmp_path)
    _, data = prepare_data(args_for(root, tmp_path / "cache"), SINGLE)
    draw = MoMEDraw(data, batch_size=2, patch_size=(4, 4, 4), oversample=oversample)
    hits = np.zeros(2)
    for seed in range(40):
        hits += draw(np.random.default_rng(seed))["label"].flatten(1).any(1).numpy()
    # a 4^3 patch placed at random rarely meets one of the three small lesions; a forced one always does
    for j in range(2):
        assert (hits[j] == 40) if forced[j] else (hits[j] < 30), (oversample, hits)


def test_augmented_batches_read_nnunets_initial_patch_and_come_out_binary(tmp_path):
    root, _ = tumour_dataset(tmp_path)
    _, data = prepare_data(args_for(root, tmp_path / "cache"), SINGLE)
    pipeline = PIPELINES["nnunet"]
    draw = MoMEDraw(data, batch_size=2, patch_size=(8, 8, 8), pipeline=pipeline)
    read = initial_patch_size((8, 8, 8), pipeline)
    assert draw.read_size == read and min(read) > 8  # room for rotations and scaling
    outside = False
    for seed in range(10):
        batch = draw(np.random.default_rng(seed))
        assert batch["image"].shape == (2, 1, *read) and set(batch["aug"]) >= {"rotation", "mirror"}
        assert set(batch["label"].unique().tolist()) <= {-1, 0, 1}  # -1: read outside the volume
        outside |= bool((batch["label"] == -1).any())
        out = BatchAugmentation(pipeline, (8, 8, 8))(batch)
        assert out["image"].shape == (2, 1, 8, 8, 8) and "aug" not in out
        assert set(out["label"].unique().tolist()) <= {0, 1}
    assert outside
