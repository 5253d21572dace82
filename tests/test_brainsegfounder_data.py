"""BrainSegFounder data choices: split files (nnU-Net, BSF fold lists, plain), leak-free pretraining cases.

Run: .venv/bin/python -m pytest -q tests/test_brainsegfounder_data.py
"""

import json

import pytest

from shared.dataset import read_split_file
from shared.errors import InputError

IDS = [f"BraTS2021_{i:05d}" for i in range(5)]


def test_nnunet_splits_final(tmp_path):
    path = tmp_path / "splits_final.json"
    path.write_text(json.dumps([{"train": IDS[2:], "val": IDS[:2]}, {"train": IDS[:3], "val": IDS[3:]}]))
    assert read_split_file(path, IDS, fold=1) == {"train": IDS[:3], "val": IDS[3:]}
    with pytest.raises(InputError, match=r"holds 2 folds, so --fold must lie in \[0, 2\)"):
        read_split_file(path, IDS, fold=2)


def test_bsf_fold_list_with_brats_and_nnunet_paths(tmp_path):
    entries = [
        {"fold": i % 2, "image": [f"TrainingData/{c}/{c}_flair.nii.gz", f"TrainingData/{c}/{c}_t1.nii.gz"],
         "label": f"TrainingData/{c}/{c}_seg.nii.gz"}
        for i, c in enumerate(IDS[:4])
    ]  # fmt: skip
    entries.append({"fold": 1, "image": [f"imagesTr/{IDS[4]}_0000.nii.gz"]})
    path = tmp_path / "brats21_folds.json"
    path.write_text(json.dumps({"training": entries}))
    assert read_split_file(path, IDS, fold=0) == {"train": [IDS[1], IDS[3], IDS[4]], "val": [IDS[0], IDS[2]]}
    path.write_text(json.dumps(entries))  # the bare list
    assert read_split_file(path, IDS, fold=1)["val"] == [IDS[1], IDS[3], IDS[4]]
    with pytest.raises(InputError, match="no entry has fold 3"):
        read_split_file(path, IDS, fold=3)
    with pytest.raises(InputError, match="names no case"):
        read_split_file(path, IDS[1:], fold=0)


def test_plain_and_run_split_files_are_checked(tmp_path):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"Dataset001_Tumour": {"train": IDS[:3], "val": IDS[3:]}}))
    assert read_split_file(path, IDS) == {"train": IDS[:3], "val": IDS[3:]}
    path.write_text(json.dumps({"train": IDS[:3], "val": IDS[2:]}))
    with pytest.raises(InputError, match="in both the training and the validation list"):
        read_split_file(path, IDS)
    path.write_text(json.dumps({"train": ["nope"], "val": []}))
    with pytest.raises(InputError, match=r"\['nope'\] are not cases"):
        read_split_file(path, IDS)
    path.write_text("{")
    with pytest.raises(InputError, match="not a readable JSON"):
        read_split_file(path, IDS)
