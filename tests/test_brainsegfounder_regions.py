"""BraTS regions from dataset.json label names (shared.metrics.brats_labels_from_names) and their use in scoring.

Run: .venv/bin/python -m pytest -q tests/test_brainsegfounder_regions.py
"""

import csv
import json

import nibabel as nib
import numpy as np
import pytest

from brainsegfounder import evaluate
from brainsegfounder.regions import region_targets, regions_to_labels
from shared.errors import InputError
from shared.metrics import brats_labels_from_names, brats_regions

NNUNET_MSD = {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}
NNUNET_137 = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (NNUNET_MSD, (2, 1, 3)),
        (NNUNET_137, (2, 1, 3)),
        ({"background": 0, "necrosis": 1, "edema": 2, "enhancing": 3}, (1, 2, 3)),  # the demo phantoms
        ({"background": 0, "NCR/NET": 1, "ED": 2, "ET": 4}, (1, 2, 4)),  # BraTS 2021 abbreviations
        ({"background": 0, "peritumoral_oedema": 2, "GD-enhancing tumour": 4, "necrotic core": 1}, (1, 2, 4)),
        ({"background": 0, "non_enhancing_and_necrosis": 2, "edema": 1, "enhancing_tumor": 3}, (2, 1, 3)),
    ],
)
def test_values_from_names(labels, expected):
    assert brats_labels_from_names(labels) == (expected, "")


@pytest.mark.parametrize(
    ("labels", "reason"),
    [
        ({"background": 0, "lesion": 1}, "no label names the necrosis and the edema and the enhancing"),
        ({"background": 0, "edema": 1, "enhancing": 3}, "no label names the necrosis"),
        ({"background": 0, "necrosis": 1, "non-enhancing": 2, "edema": 3, "enhancing": 4}, "two labels name"),
        ({"background": 0, "necrosis": 1, "edema": 1, "enhancing": 3}, "not three distinct"),
        ({"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [2, 3]}, "several"),
    ],
)
def test_undetermined_names_say_why(labels, reason):
    values, why = brats_labels_from_names(labels)
    assert values is None and reason in why


def test_nnunet_labels_read_with_the_old_default_give_a_wrong_tumour_core():
    # the example: a prediction equal to the reference minus its edema has a perfect tumour core
    reference = np.array([0, 1, 1, 1, 2, 2, 3, 3, 3, 3]).reshape(1, 2, 5)  # nnU-Net: 1 edema, 2 necrosis, 3 ET
    prediction = np.where(reference == 1, 0, reference)
    necrosis, edema, enhancing = brats_labels_from_names(NNUNET_137)[0]
    right = brats_regions(reference, necrosis=necrosis, edema=edema, enhancing=enhancing)
    right_pred = brats_regions(prediction, necrosis=necrosis, edema=edema, enhancing=enhancing)
    assert np.array_equal(right["TC"], right_pred["TC"]) and right["TC"].sum() == 6
    wrong, wrong_pred = brats_regions(reference), brats_regions(prediction)  # 1 read as necrosis
    assert not np.array_equal(wrong["TC"], wrong_pred["TC"])


def _nnunet_brats(root, labels=NNUNET_137):
    """A two-case dataset in nnU-Net's BraTS convention (1 edema, 2 necrosis, 3 enhancing), labels only."""
    (root / "labelsTr").mkdir(parents=True)
    (root / "imagesTr").mkdir()
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "T1"}, "labels": labels,
                                                   "file_ending": ".nii.gz", "numTraining": 2}))  # fmt: skip
    rng = np.random.default_rng(0)
    for case in ("a", "b"):
        label = rng.integers(0, 4, size=(6, 6, 6)).astype(np.uint8)
        nib.save(nib.Nifti1Image(label, np.eye(4)), root / "labelsTr" / f"{case}.nii.gz")
    return root / "labelsTr"


def test_evaluate_reads_the_regions_from_the_dataset_json(tmp_path):
    # the check: a prediction equal to the reference minus its edema has TC 1.0 (0.46 with 1 2 3 read as
    # necrosis, edema, enhancing)
    gt = _nnunet_brats(tmp_path / "Dataset137_BraTS2021")
    preds = tmp_path / "preds"
    preds.mkdir()
    for path in gt.iterdir():
        label = np.asarray(nib.load(path).dataobj)
        nib.save(nib.Nifti1Image(np.where(label == 1, 0, label).astype(np.uint8), np.eye(4)), preds / path.name)
    evaluate.main(["--pred", str(preds), "--gt", str(gt), "--task", "brats", "--out", str(tmp_path / "e.csv")])
    dice = {(r["case"], r["class"]): float(r["dice"]) for r in csv.DictReader(open(tmp_path / "e.csv"))}
    assert all(dice[(c, "TC")] == 1.0 and dice[(c, "ET")] == 1.0 and dice[(c, "WT")] < 1.0 for c in "ab")
    evaluate.main(["--pred", str(preds), "--gt", str(gt), "--brats-labels", "1", "2", "3", "--out",
                   str(tmp_path / "old.csv")])  # fmt: skip
    # the explicit override wins: 1 read as necrosis again gives the wrong tumour core
    old = {(r["case"], r["class"]): float(r["dice"]) for r in csv.DictReader(open(tmp_path / "old.csv"))}
    assert all(old[(c, "TC")] < 0.8 for c in "ab")


def test_evaluate_refuses_what_the_names_cannot_score(tmp_path):
    gt = _nnunet_brats(tmp_path / "Dataset002_Binary", labels={"background": 0, "lesion": 1, "other": 2, "x": 3})
    with pytest.raises(InputError, match="does not determine the BraTS regions.*--brats-labels"):
        evaluate.main(["--pred", str(gt), "--gt", str(gt), "--out", str(tmp_path / "e.csv")])
    gt = _nnunet_brats(tmp_path / "Dataset003_Extra", labels={"background": 0, "edema": 1, "necrosis": 2, "ET": 4})
    # the files hold 3, which this dataset.json does not declare: refused before any region is built
    with pytest.raises(InputError, match=r"a.nii.gz: label values \[3\] are not declared in .*dataset.json"):
        evaluate.main(["--pred", str(gt), "--gt", str(gt), "--out", str(tmp_path / "e.csv")])
    # declared, but not one of the three BraTS classes: refused too (it would be dropped from every region)
    gt = _nnunet_brats(tmp_path / "Dataset004_Other", labels={"background": 0, "edema": 1, "necrosis": 2, "x": 3,
                                                               "enhancing": 4})  # fmt: skip
    with pytest.raises(InputError, match=r"a.nii.gz: label values \[3\] are not BraTS classes"):
        evaluate.main(["--pred", str(gt), "--gt", str(gt), "--out", str(tmp_path / "e.csv")])
    assert not (tmp_path / "e.csv").exists()


def test_regions_to_labels_by_hand():
    # [TC, WT, ET] masks of four voxels -> nnU-Net values (necrosis 2, edema 1, enhancing 3)
    masks = np.array([[0, 1, 1, 0], [1, 1, 1, 0], [0, 0, 1, 0]], dtype=bool).reshape(3, 1, 1, 4)
    assert regions_to_labels(masks, (2, 1, 3)).ravel().tolist() == [1, 2, 3, 0]
    assert np.array_equal(region_targets(regions_to_labels(masks, (2, 1, 3)), (2, 1, 3)), masks.astype(np.float32))
