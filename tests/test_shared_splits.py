"""shared.splits: nnU-Net's k-folds, and every split-file layout read into one representation and checked;
pytest -q tests/test_shared_splits.py"""

import json
from pathlib import Path

import numpy as np
import pytest

from shared.dataset import write_dataset_json
from shared.errors import InputError
from shared.splits import dataset_split, kfold_splits, read_split, split_dataset, split_datasets, write_split

IDS = [f"BraTS2021_{i:05d}" for i in range(5)]
DS = "Dataset001_Tumour"


def write_json(path: Path, data) -> Path:
    path.write_text(json.dumps(data))
    return path


def touched_dataset(root: Path, labelled, unlabelled=()) -> Path:
    """A dataset.json and empty channel / label files: the k-fold split reads names, never voxels."""
    write_dataset_json(root, ["T1w", "t2-flair"], {"background": 0, "lesion": 1}, num_training=len(labelled))
    for folder in ("imagesTr", "labelsTr"):
        (root / folder).mkdir(parents=True, exist_ok=True)
    for case in (*labelled, *unlabelled):
        (root / "imagesTr" / f"{case}_0000.nii.gz").touch()
    for case in labelled:
        (root / "labelsTr" / f"{case}.nii.gz").touch()
    return root


# ----------------------------------------------------------------------------- k-folds (from test_shared_dataset)


# Fold 0-2 validation sets of a public nnU-Net v2 splits_final.json (github.com/EvaBr/cardiovas, 30 cases, seed
# 12345); its folds 3-4 were edited by hand (their lists are not even sorted), so they are not used.
_D = [2, 3, 4, 6, 7, 8, 10, 11, 12, 13, 14, 15, 16, 17, 20]
_N = [2, 5, 6, 7, 8, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]
CARDIOVAS = [f"Diseased_{i}" for i in _D] + [f"Normal_{i}" for i in _N]
CARDIOVAS_VAL = [
    ["Diseased_13", "Diseased_2", "Diseased_6", "Normal_11", "Normal_14", "Normal_5"],
    ["Diseased_10", "Diseased_16", "Diseased_17", "Normal_16", "Normal_17", "Normal_2"],
    ["Diseased_3", "Diseased_4", "Diseased_7", "Normal_15", "Normal_18", "Normal_19"],
]


def test_kfold_matches_nnunet_splits_final():
    splits = kfold_splits(CARDIOVAS[::-1], k=5, seed=12345)
    for fold, val in enumerate(CARDIOVAS_VAL):
        assert splits[fold][1] == val
        assert splits[fold][0] == sorted(set(CARDIOVAS) - set(val))


def test_kfold_partition_deterministic_order_independent():
    ids = [f"case_{i:03d}" for i in range(11)]
    splits = kfold_splits(ids, k=3)
    assert [len(v) for _, v in splits] == [4, 4, 3]
    assert sorted(c for _, v in splits for c in v) == ids
    for train, val in splits:
        assert sorted(train + val) == ids and not set(train) & set(val)
    shuffled = list(np.random.default_rng(0).permutation(ids))
    assert kfold_splits(shuffled, k=3) == splits
    assert kfold_splits(ids, k=3, seed=1) != splits


def test_kfold_bad_arguments():
    with pytest.raises(InputError, match=r"k: number of folds must be between 2 and the number of cases \(3\), got 1"):
        kfold_splits(["a", "b", "c"], k=1)
    with pytest.raises(InputError, match=r"got 4"):
        kfold_splits(["a", "b", "c"], k=4)
    with pytest.raises(InputError, match=r"case_ids: duplicate case ids \['b'\]"):
        kfold_splits(["a", "b", "b"], k=2)


def test_split_dataset_uses_labelled_cases_only(tmp_path):
    dataset = touched_dataset(tmp_path / "Dataset001_Tiny", ["a", "b", "c"], unlabelled=["d"])  # d is never split
    assert split_dataset(dataset, fold=-1, folds=3) == {"train": ["a", "b", "c"], "val": []}
    vals = [split_dataset(dataset, fold=f, folds=3) for f in range(3)]
    assert sorted(v for s in vals for v in s["val"]) == ["a", "b", "c"]
    for s in vals:
        assert len(s["val"]) == 1 and sorted(s["train"] + s["val"]) == ["a", "b", "c"]
    with pytest.raises(InputError, match=r"--fold must be -1 or in \[0, 3\), got 3"):
        split_dataset(dataset, fold=3, folds=3)
    with pytest.raises(InputError, match="3 labelled cases cannot be split into --folds 4"):
        split_dataset(dataset, fold=0, folds=4)


def test_split_datasets_splits_each_folder_by_its_name(tmp_path):
    a = touched_dataset(tmp_path / "Dataset001_A", ["a0", "a1", "a2"])
    b = touched_dataset(tmp_path / "Dataset002_B", ["b0", "b1", "b2", "b3"])
    assert split_datasets([a, b], fold=1, folds=3) == {"Dataset001_A": split_dataset(a, 1, 3),
                                                       "Dataset002_B": split_dataset(b, 1, 3)}  # fmt: skip
    assert split_datasets([b], fold=-1, folds=3) == {"Dataset002_B": {"train": ["b0", "b1", "b2", "b3"], "val": []}}
    seeded = split_datasets([a], fold=0, folds=3, seed=2)["Dataset001_A"]
    assert seeded == split_dataset(a, 0, 3, seed=2) != split_dataset(a, 0, 3)  # the seed reaches the k-fold rule


# ----------------------------------------------------------------------------- split files: one representation

SPLIT = {"train": IDS[:3], "val": IDS[3:]}


def bsf_entry(case: str, fold: int) -> dict:
    """One case of BrainSegFounder's brats21_folds.json, in the original BraTS layout."""
    folder = f"TrainingData/{case}/{case}"
    return {"fold": fold, "image": [f"{folder}_flair.nii.gz", f"{folder}_t1.nii.gz"], "label": f"{folder}_seg.nii.gz"}


def test_every_layout_reads_to_the_same_split(tmp_path):
    layouts = {
        "run split.json": ({DS: SPLIT}, None),
        "plain": (SPLIT, None),
        "nnU-Net splits_final.json": ([{"train": IDS[2:], "val": IDS[:2]}, SPLIT], 1),
        "BSF fold list": ({"training": [bsf_entry(c, 2 if c in SPLIT["val"] else 0) for c in IDS]}, 2),
        "bare BSF fold list": ([bsf_entry(c, 2 if c in SPLIT["val"] else 0) for c in IDS], 2),
    }
    for name, (content, fold) in layouts.items():
        path = write_json(tmp_path / f"{name}.json", content)
        assert read_split(path, fold=fold, case_ids={DS: IDS}) == {DS: SPLIT}, name
        if "BSF" not in name:  # without case ids a split that names no dataset stays unnamed
            assert read_split(path, fold=fold) == {DS if name == "run split.json" else None: SPLIT}, name
    fixed = write_json(tmp_path / "fixed.json", {DS: {"train": IDS[:3], "test": IDS[3:]}, "Other": {"train": []}})
    assert read_split(fixed) == {DS: {"train": IDS[:3], "test": IDS[3:]}, "Other": {"train": []}}


def test_a_written_split_json_reads_back(tmp_path):
    split = {DS: SPLIT, "Dataset002_B": {"train": ["b0"], "val": []}}
    path = tmp_path / "run" / "split.json"  # the run folder need not exist yet
    write_split(path, split)
    assert read_split(path) == split and json.loads(path.read_text()) == split
    assert [p.name for p in path.parent.iterdir()] == ["split.json"]  # written atomically: no temp file left
    assert read_split(path, case_ids={DS: IDS, "Dataset002_B": ["b0"]}) == split


def test_nnunet_splits_final(tmp_path):
    path = write_json(tmp_path / "splits_final.json", [{"train": IDS[2:], "val": IDS[:2]}, SPLIT])
    assert read_split(path, case_ids={DS: IDS}, fold=1)[DS] == {"train": IDS[:3], "val": IDS[3:]}
    with pytest.raises(InputError, match=r"^--fold 2: .*splits_final\.json holds folds 0 to 1\.$"):
        read_split(path, case_ids={DS: IDS}, fold=2)
    with pytest.raises(InputError, match=r"^--split .*splits_final\.json is an nnU-Net splits_final\.json of 2 folds; "
                       r"pass --fold\.$"):  # fmt: skip
        read_split(path)


def test_bsf_fold_list_with_brats_and_nnunet_paths(tmp_path):
    entries = [bsf_entry(c, i % 2) for i, c in enumerate(IDS[:4])]
    entries.append({"fold": 1, "image": [f"imagesTr/{IDS[4]}_0000.nii.gz"]})
    path = write_json(tmp_path / "brats21_folds.json", {"training": entries})
    assert read_split(path, case_ids={DS: IDS}, fold=0)[DS] == {"train": [IDS[1], IDS[3], IDS[4]],
                                                                "val": [IDS[0], IDS[2]]}  # fmt: skip
    write_json(path, entries)  # the bare list
    assert read_split(path, case_ids={DS: IDS}, fold=1)[DS]["val"] == [IDS[1], IDS[3], IDS[4]]
    with pytest.raises(InputError, match=r"^--fold 3: .*brats21_folds\.json holds folds 0 to 1\.$"):
        read_split(path, case_ids={DS: IDS}, fold=3)
    with pytest.raises(InputError, match=r"^--fold -1: .*brats21_folds\.json holds folds 0 to 1\.$"):
        read_split(path, case_ids={DS: IDS}, fold=-1)
    with pytest.raises(InputError, match="names no case"):
        read_split(path, case_ids={DS: IDS[1:]}, fold=0)
    with pytest.raises(InputError, match=r"^--split .*brats21_folds\.json is a BrainSegFounder fold list, which names "
                       "cases by image path; it is read only against the cases of a dataset\\.$"):  # fmt: skip
        read_split(path, fold=0)
    write_json(path, [{"fold": 0, "image": [f"TrainingData/{IDS[0]}/flair.nii.gz"]}, {"fold": 1, "label": "x/b.nii"}])
    assert read_split(path, case_ids={DS: [IDS[0], "b"]}, fold=1)[DS] == {"train": [IDS[0]], "val": ["b"]}  # by folder
    write_json(path, [{"fold": 0, "image": ["a.nii.gz"]}, {"fold": 4, "image": ["b.nii.gz"]}])
    with pytest.raises(InputError, match=r"^--fold 1: .*brats21_folds\.json holds folds 0, 4\.$"):
        read_split(path, case_ids={DS: ["a", "b"]}, fold=1)
    assert read_split(path, case_ids={DS: ["a", "b"]}, fold=4) == {DS: {"train": ["a"], "val": ["b"]}}
    write_json(path, [{"fold": "0", "image": ["a.nii.gz"]}])
    with pytest.raises(InputError, match=r'brats21_folds\.json: every entry\'s "fold" must be a fold number\.$'):
        read_split(path, case_ids={DS: ["a"]}, fold=0)


def test_plain_and_run_split_files_are_checked(tmp_path):
    path = write_json(tmp_path / "split.json", {DS: {"train": IDS[:3], "val": IDS[3:]}})
    assert read_split(path, case_ids={DS: IDS}) == {DS: {"train": IDS[:3], "val": IDS[3:]}}
    write_json(path, {"train": IDS[:3], "val": IDS[2:]})
    with pytest.raises(InputError, match=r"^--split .*split\.json: case id\(s\) \['BraTS2021_00002'\] are in both "
                       r"'train' and 'val'\.$"):  # fmt: skip
        read_split(path)  # a case both trained on and held out is refused even without the dataset's ids
    write_json(path, {"train": ["nope"], "val": []})
    with pytest.raises(InputError, match=r"^--split .*split\.json: Dataset001_Tumour has no case\(s\) \['nope'\]\.$"):
        read_split(path, case_ids={DS: IDS})
    path.write_text("{")
    with pytest.raises(InputError, match=r"^--split .*split\.json: not a readable JSON split file \(.*\)\.$"):
        read_split(path, case_ids={DS: IDS})


def test_refusals_name_the_flag_and_the_file(tmp_path):
    with pytest.raises(InputError, match=r"^--split-file .*missing\.json: file not found\.$"):
        read_split(tmp_path / "missing.json", flag="--split-file")
    for content in (3, [], {}, "text"):
        path = write_json(tmp_path / "odd.json", content)
        with pytest.raises(
            InputError,
            match=r'^--split-file .*odd\.json: expected \{dataset: \{"train": \[\.\.\.\], '
            r'"val": \[\.\.\.\]\}\}, \{"train": \[\.\.\.\], "val": \[\.\.\.\]\} or a list of folds\.$',
        ):
            read_split(path, flag="--split-file")
    path = write_json(tmp_path / "ids.json", {"A": {"train": [], "val": [1, 2]}})
    with pytest.raises(InputError, match=r"^--split .*ids\.json \[A\] val must be a list of case ids\.$"):
        read_split(path)
    path = write_json(tmp_path / "notrain.json", {"A": {"val": ["a"]}})
    with pytest.raises(InputError, match=r'^--split .*notrain\.json \[A\]: expected \{"train": \[\.\.\.\], "val": '
                       r"\[\.\.\.\]\}\.$"):  # fmt: skip
        read_split(path)
    path = write_json(tmp_path / "folds.json", [{"train": ["a"], "test": ["b", "a"]}])
    with pytest.raises(InputError, match=r"folds\.json fold 0: case id\(s\) \['a'\] are in both 'train' and 'test'\.$"):
        read_split(path, fold=0)
    path = write_json(tmp_path / "empty.json", {DS: {"train": [], "val": IDS}})
    assert read_split(path, case_ids={DS: IDS}) == {DS: {"train": [], "val": IDS}}
    with pytest.raises(InputError, match=r"^--split .*empty\.json: the training list of Dataset001_Tumour is empty\.$"):
        read_split(path, case_ids={DS: IDS}, need_train=True)
    assert read_split(path, case_ids={"Other": ["x"]}, need_train=True)[DS]["train"] == []  # not a dataset at hand


def test_strict_fold_refuses_a_fold_for_one_split(tmp_path):
    run = write_json(tmp_path / "split.json", {DS: SPLIT})
    plain = write_json(tmp_path / "plain.json", SPLIT)
    assert read_split(run, fold=3) == {DS: SPLIT}  # --fold of a training CLI has other uses: the file ignores it
    with pytest.raises(InputError, match=r"^--fold 3: .*split\.json is a split\.json of a training run \(one split\), "
                       r"not a list of folds\.$"):  # fmt: skip
        read_split(run, fold=3, strict_fold=True)
    with pytest.raises(InputError, match=r'^--fold 0: .*plain\.json is a plain \{"train", "val"\} split \(one split\)'):
        read_split(plain, fold=0, strict_fold=True)
    assert read_split(plain, strict_fold=True) == {None: SPLIT}


def test_unnamed_splits_go_to_the_dataset_that_holds_their_ids(tmp_path):
    ids = {"Dataset001_A": ["a0", "a1", "a2"], "Dataset002_B": ["b0", "b1"]}
    path = write_json(tmp_path / "splits_final.json", [{"train": ["b0"], "val": ["b1"]}])
    assert read_split(path, fold=0, case_ids=ids) == {"Dataset002_B": {"train": ["b0"], "val": ["b1"]}}
    write_json(path, [{"train": ["a0"], "val": ["x1"]}])
    with pytest.raises(InputError, match=r"^--split .*splits_final\.json: its case ids belong to none of the --data "
                       r"datasets \['Dataset001_A', 'Dataset002_B'\]\.$"):  # fmt: skip
        read_split(path, fold=0, case_ids=ids)
    with pytest.raises(InputError, match=r"belong to several of the --data datasets"):
        read_split(path, fold=0, case_ids={"A": ["a0", "x1"], "B": ["a0", "x1", "b0"]})
    with pytest.raises(InputError, match=r"Dataset001_A has no case\(s\) \['x1'\]\.$"):
        read_split(path, fold=0, case_ids={"Dataset001_A": ids["Dataset001_A"]})  # one dataset: its unknown ids
    named = write_json(tmp_path / "fixed.json", {"Dataset001_A": {"train": ["a0"], "test": ["zz"]},
                                                 "Dataset009_Z": {"train": ["z0"], "test": ["z1"]}})  # fmt: skip
    with pytest.raises(InputError, match=r"^--split .*fixed\.json: Dataset001_A has no case\(s\) \['zz'\]\.$"):
        read_split(named, case_ids=ids)
    write_json(named, {"Dataset009_Z": {"train": ["z0"], "test": ["z1"]}})
    assert read_split(named, case_ids=ids) == {"Dataset009_Z": {"train": ["z0"], "test": ["z1"]}}  # not at hand


def test_dataset_split_picks_the_unnamed_the_named_or_the_only_split():
    where = "--split s.json"
    assert dataset_split({None: SPLIT}, "anything", where=where) == SPLIT
    two = {"A": {"train": ["a"]}, "B": {"train": ["b"]}}
    assert dataset_split(two, "B", where=where) == {"train": ["b"]}
    assert dataset_split({"A": SPLIT}, where=where) == SPLIT
    with pytest.raises(InputError, match=r"^--split s\.json holds the splits of A, B, not of C\.$"):
        dataset_split(two, "C", where=where)
    with pytest.raises(InputError, match=r"^--split s\.json holds the splits of A, not of C\.$"):
        dataset_split({"A": SPLIT}, "C", where=where)
    with pytest.raises(InputError, match=r"^--split s\.json holds the splits of several datasets \(A, B\); which one "
                       r"is meant is not known here\.$"):  # fmt: skip
        dataset_split(two, where=where)
