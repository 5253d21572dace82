"""BrainSegFounder data: a --split-file's split (the layouts: tests/test_shared_splits.py), leak-free pretraining
cases, the batch draws.

Run: .venv/bin/python -m pytest -q tests/test_brainsegfounder_data.py
"""

import json

import numpy as np
import pytest
import torch

from brainsegfounder.data import SegDraw, SSLDraw, cache_cases, preprocessing, ssl_validation_views
from brainsegfounder.regions import region_channels, region_targets
from brainsegfounder.splits import few_shot_subsets, file_split, held_out_split, pretraining_split
from shared.augment import PIPELINES, BatchAugmentation
from shared.errors import InputError
from shared.phantom import write_phantom_datasets

IDS = [f"BraTS2021_{i:05d}" for i in range(5)]


def test_file_split_sorts_and_refuses_other_datasets_and_no_training_case(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"Dataset001_X": {"train": IDS[2::-1], "test": IDS[3:]}}))
    assert file_split(path, tmp_path / "Dataset001_X", IDS, fold=0) == {"train": IDS[:3], "val": []}
    with pytest.raises(InputError, match=r"^--split-file .*split\.json holds the splits of Dataset001_X, not of "
                       r"Dataset002_Y\.$"):  # fmt: skip
        file_split(path, tmp_path / "Dataset002_Y", IDS, fold=0)
    path.write_text(json.dumps([{"train": [], "val": IDS[::-1]}]))
    with pytest.raises(InputError, match=r"^--split-file .*split\.json: the training list of Dataset001_X is empty\.$"):
        file_split(path, tmp_path / "Dataset001_X", IDS, fold=0)
    path.write_text(json.dumps([{"train": IDS[4:1:-1], "val": IDS[1::-1]}]))
    assert file_split(path, tmp_path / "Dataset001_X", IDS, fold=0) == {"train": IDS[2:], "val": IDS[:2]}


def _dataset(root, n_labelled=6, n_unlabelled=0, n_test=2):
    """A dataset.json plus empty-named channel files: list_cases only reads names (nothing here loads images)."""
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (root / folder).mkdir(parents=True)
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": {"background": 0, "x": 1},
                                                   "file_ending": ".nii.gz"}))  # fmt: skip
    for i in range(n_labelled + n_unlabelled):
        (root / "imagesTr" / f"c{i:02d}_0000.nii.gz").touch()
        if i < n_labelled:
            (root / "labelsTr" / f"c{i:02d}.nii.gz").touch()
    for i in range(n_test):
        (root / "imagesTs" / f"t{i:02d}_0000.nii.gz").touch()
    return root


def test_pretraining_never_sees_what_finetuning_holds_out(tmp_path):
    root = _dataset(tmp_path / "Dataset001_X", n_labelled=6, n_unlabelled=2)
    for kwargs in ({"fold": 1, "folds": 3}, {"fold": 0, "folds": 5, "holdout": 2}):
        tune = held_out_split(root, **kwargs)
        ssl = pretraining_split(root, **kwargs)
        assert ssl["val"] == tune["val"] and len(tune["val"]) == 2 and ssl["imagesTs"] == []
        assert set(ssl["train"]) == set(tune["train"]) | {"c06", "c07"}  # unlabelled cases: never held out
        assert not set(ssl["train"]) & set(tune["val"])
    assert held_out_split(root, fold=0, folds=5, holdout=2) == held_out_split(root, fold=3, folds=5, holdout=2)
    everything = pretraining_split(root, fold=0, folds=5, transductive=True)
    assert len(everything["train"]) == 8 and everything["imagesTs"] == ["t00", "t01"] and everything["val"] == []
    unlabelled = _dataset(tmp_path / "Dataset002_UKB", n_labelled=0, n_unlabelled=5)
    split = pretraining_split(unlabelled, fold=2, folds=5)
    assert len(split["val"]) == 1 and len(split["train"]) == 4
    assert pretraining_split(unlabelled, fold=-1, folds=5)["val"] == []
    split_file = tmp_path / "splits_final.json"
    split_file.write_text(json.dumps([{"train": ["c00", "c01", "c02"], "val": ["c04", "c03"]}]))
    assert held_out_split(root, fold=0, folds=5, split_file=split_file) == {"train": ["c00", "c01", "c02"],
                                                                            "val": ["c03", "c04"]}  # fmt: skip
    assert pretraining_split(root, fold=0, folds=5, split_file=split_file)["val"] == ["c03", "c04"]
    assert pretraining_split(unlabelled, fold=0, folds=5, split_file=split_file)["val"] == ["c03", "c04"]


def test_few_shot_subsets():
    ids = [f"c{i:02d}" for i in range(30)]
    subsets = few_shot_subsets(ids, 0.1, seed=0, repeats=5)
    assert [len(s) for s in subsets] == [3] * 5  # ceil(0.1 * 30) = 3 despite 0.1 * 30 = 3.0000000000000004
    assert len({tuple(s) for s in subsets}) == 5 and all(set(s) <= set(ids) for s in subsets)
    assert few_shot_subsets(ids, 0.1, seed=0, repeats=2) == subsets[:2]  # repeat r does not depend on --repeats
    assert few_shot_subsets(ids, 0.1, seed=1, repeats=1) != subsets[:1]
    small = few_shot_subsets(ids[:4], 0.5, seed=0, repeats=6)  # C(4, 2) = 6: all distinct where they exist
    assert len({tuple(s) for s in small}) == 6
    assert few_shot_subsets(ids[:3], 0.05, seed=0, repeats=1)[0][0] in ids[:3]  # at least one case


@pytest.fixture(scope="module")
def cached(tmp_path_factory):
    """Two phantom tumour cases in a fine-tuning cache and an SSL cache (64 x 32 x 32)."""
    root = tmp_path_factory.mktemp("bsf_draw")
    data = write_phantom_datasets(root / "data", datasets=["tumour"], cases=2, shape=(64, 32, 32), seed=2)[0]
    seg = cache_cases(data, preprocessing(["T1", "FLAIR"], "zscore"), ["PhantomTumour_000", "PhantomTumour_001"],
                      cache_root=root / "cache", processes=1)  # fmt: skip
    ssl = cache_cases(data, preprocessing(["T1"], "percentile"), ["PhantomTumour_000", "PhantomTumour_001"],
                      cache_root=root / "cache", processes=1)  # fmt: skip
    return seg, ssl


def test_segmentation_draw_reads_the_cache_and_centres_the_last_patch_on_tumour(cached):
    seg, _ = cached
    pipeline = PIPELINES["bsf_finetune"]
    draw = SegDraw(tuple(seg), ("FLAIR", "T1", "FLAIR"), 3, (32, 32, 32), (32, 32, 32), pipeline)
    batch = draw(np.random.default_rng(5))
    assert batch["image"].shape == (3, 3, 32, 32, 32) and batch["label"].shape == (3, 32, 32, 32)
    assert torch.equal(batch["image"][:, 0], batch["image"][:, 2])  # FLAIR fed to two channels
    # forced_foreground(2, 3, 0.33): the last sample holds a stored tumour voxel (a 16^3 patch at random misses
    # the tumour in about a third of the draws)
    small = SegDraw(tuple(seg), ("FLAIR",), 3, (16, 16, 16), (16, 16, 16), pipeline)
    assert all((small(np.random.default_rng(s))["label"][2] > 0).any() for s in range(20))
    again = draw(np.random.default_rng(5))
    assert all(torch.equal(batch[k], again[k]) for k in ("image", "label"))  # a function of the Generator
    # the image patch is the cached z-scored volume: channel FLAIR of some case, somewhere
    volumes = [np.load(c.image) for c in seg]
    assert any(np.isin(batch["image"][0, 1].numpy(), v[0]).mean() > 0.99 for v in volumes)
    augmented = BatchAugmentation(pipeline, (32, 32, 32))(batch)
    targets = region_channels(augmented["label"], "brats", (1, 2, 3))
    expected = np.stack([region_targets(lab, (1, 2, 3)) for lab in augmented["label"].numpy()])
    assert targets.shape == (3, 3, 32, 32, 32) and np.array_equal(targets.numpy(), expected)


def test_ssl_draw_repeats_a_modality_and_validation_views_are_fixed(cached):
    _, ssl = cached
    views = SSLDraw(tuple(ssl), ("T1", "T1"), 2, 2, (64, 32, 32))(np.random.default_rng(0))
    assert views["inputs"].shape == (8, 2, 64, 32, 32) and views["labels"].shape == (8,)
    assert torch.equal(views["targets"][:, 0], views["targets"][:, 1])  # one modality in two channels
    assert 0.0 <= views["targets"].min() and views["targets"].max() <= 1.0  # percentile scaling
    a = ssl_validation_views(ssl[0], ("T1",), (64, 32, 32), 2, np.random.default_rng([0, 0]))
    b = ssl_validation_views(ssl[0], ("T1",), (64, 32, 32), 2, np.random.default_rng([0, 0]))
    assert all(torch.equal(a[k], b[k]) for k in a)
