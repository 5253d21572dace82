"""Lesions that touch only at a corner are one lesion (26-connectivity) through every default: shared.lesion_metrics,
shared.metrics.case_metrics, shared.evaluate and the mome, moe_missing and brainsegfounder evaluate CLIs;
pytest -q tests/test_shared_lesion_connectivity.py

One volume pair holds it all: gt {(1,1,1), (2,2,2)} + {(5,5,5)}, pred {(1,1,1)} + {(5,5,5), (6,6,6)}. With 26
neighbours both masks have 2 lesions, all detected: LTPR 1, LFPR 0, lesion F1 1. With 6 (or 18) neighbours the
corner pairs split: 3 lesions each, gt (2,2,2) missed and pred (6,6,6) false: LTPR 2/3, LFPR 1/3, F1 2/3.
(brainsegfounder.evaluate --task atlas uses 6 on purpose, as the official ATLAS scoring; --task brats is default.)
"""

import csv
import dataclasses

import nibabel as nib
import numpy as np
import pytest

from shared import lesion_metrics
from shared.checkpoint import save_checkpoint
from shared.dataset import write_dataset_json
from shared.lesion_metrics import LesionCounts
from shared.metrics import case_metrics

SHAPE = (8, 8, 8)
AFFINE = np.eye(4)
AT_26 = {"n_gt_lesions": 2, "n_pred_lesions": 2, "ltpr": 1.0, "lfpr": 0.0, "lesion_f1": 1.0}
AT_6 = {"n_gt_lesions": 3, "n_pred_lesions": 3, "ltpr": 2 / 3, "lfpr": 1 / 3, "lesion_f1": 2 / 3}


def corner_pair(value: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """(pred, gt) uint8 label maps described in the module docstring, lesion voxels set to `value`."""
    pred, gt = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    for voxel in ((1, 1, 1), (2, 2, 2), (5, 5, 5)):
        gt[voxel] = value
    for voxel in ((1, 1, 1), (5, 5, 5), (6, 6, 6)):
        pred[voxel] = value
    return pred, gt


def save(path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), AFFINE), str(path))


def lesion_numbers(row: dict) -> dict:
    return {key: float(row[key]) for key in AT_26}


def test_the_data_tells_26_from_6():
    pred, gt = corner_pair()
    assert lesion_numbers(case_metrics(pred, gt, connectivity=26)) == pytest.approx(AT_26)
    for connectivity in (6, 18):
        assert lesion_numbers(case_metrics(pred, gt, connectivity=connectivity)) == pytest.approx(AT_6)


def test_library_defaults_are_26():
    pred, gt = corner_pair()
    assert lesion_metrics.label_lesions(gt)[1] == 2
    assert lesion_metrics.lesion_counts(pred, gt) == LesionCounts(tp=2, fn=0, fp=0, n_gt=2, n_pred=2)
    assert lesion_metrics.ltpr(pred, gt) == 1.0
    assert lesion_metrics.lfpr(pred, gt) == 0.0
    assert lesion_metrics.lesion_f1(pred, gt) == 1.0
    pair, lone = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    pair[1, 1, 1] = pair[2, 2, 2] = lone[1, 1, 1] = 1
    assert lesion_metrics.lesion_count_difference(pair, lone) == 0  # 6 neighbours: |2 - 1| = 1
    assert lesion_metrics.lesion_count_difference(pair, lone, connectivity=6) == 1
    assert lesion_numbers(case_metrics(pred, gt)) == pytest.approx(AT_26)


def test_shared_evaluate_cli_default_is_26(tmp_path):
    from shared.evaluate import evaluate_folders, main

    pred, gt = corner_pair()
    save(tmp_path / "pred" / "c1.nii.gz", pred)
    save(tmp_path / "gt" / "c1.nii.gz", gt)
    rows, _ = evaluate_folders(tmp_path / "pred", tmp_path / "gt")
    assert lesion_numbers(rows[0]) == pytest.approx(AT_26)
    main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--out", str(tmp_path / "m.csv")])
    (row,) = csv.DictReader(open(tmp_path / "m.csv"))
    assert lesion_numbers(row) == pytest.approx(AT_26)


def _dataset(root, gt, labels=None, channels=("FLAIR",)):
    """A one-case nnU-Net dataset (case c1) whose label is `gt`; the image is a ramp in the same grid."""
    write_dataset_json(root, list(channels), labels or {"background": 0, "lesion": 1}, num_training=1)
    for channel in range(len(channels)):
        save(root / "imagesTr" / f"c1_{channel:04d}.nii.gz", np.arange(512, dtype=np.float32).reshape(SHAPE))
    save(root / "labelsTr" / "c1.nii.gz", gt)
    return root


def test_mome_evaluate_default_is_26(tmp_path):
    from mome import evaluate

    pred, gt = corner_pair()
    data = _dataset(tmp_path / "Dataset001_Corner", gt)
    save(tmp_path / "pred" / data.name / "c1_0000.nii.gz", pred)
    evaluate.main(["--data", str(data), "--pred", str(tmp_path / "pred"), "--out", str(tmp_path / "eval")])
    (row,) = csv.DictReader(open(tmp_path / "eval" / "per_image.csv"))
    assert lesion_numbers(row) == pytest.approx(AT_26)
    (row,) = evaluate.score_images(evaluate.collect_images([data], None, "val"), tmp_path / "pred")
    assert lesion_numbers(row) == pytest.approx(AT_26)


def test_moe_missing_evaluate_default_is_26(tmp_path, monkeypatch):
    from moe_missing import evaluate
    from moe_missing.model import MoEUNetConfig, build_model
    from moe_missing.train import KIND

    pred, gt = corner_pair()
    data = _dataset(tmp_path / "Dataset001_Corner", gt)
    cfg = MoEUNetConfig(modalities=("FLAIR",), features=(2, 2), num_experts=1)
    save_checkpoint(tmp_path / "run" / "checkpoint.pt", kind=KIND, config=dataclasses.asdict(cfg),
                    model=build_model(cfg).state_dict(), args={"patch": [8, 8, 8]})  # fmt: skip
    # the model's output is not the point here: every configuration "predicts" the corner pair
    monkeypatch.setattr(evaluate, "predict_image", lambda *args, **kwargs: pred.copy())
    evaluate.main(["--data", str(data), "--models", str(tmp_path / "run" / "checkpoint.pt"), "--device", "cpu",
                   "--out", str(tmp_path / "eval")])  # fmt: skip
    (row,) = csv.DictReader(open(tmp_path / "eval" / "per_case.csv"))
    assert {k: float(row[k]) for k in ("ltpr", "lfpr")} == pytest.approx({"ltpr": 1.0, "lfpr": 0.0})
    (row,) = evaluate.evaluate_models(data, [tmp_path / "run" / "checkpoint.pt"], ["m"], None, device="cpu")
    assert (row["ltpr"], row["lfpr"]) == (1.0, 0.0)


def test_brainsegfounder_evaluate_default_is_26(tmp_path):
    from brainsegfounder import evaluate

    pred, gt = corner_pair(value=3)  # enhancing tumour: ET = label 3
    pred[7, 0, 0] = gt[7, 0, 0] = 2  # an edema voxel, so the labels hold BraTS classes
    save(tmp_path / "pred" / "c1.nii.gz", pred)
    save(tmp_path / "gt" / "c1.nii.gz", gt)
    evaluate.main(["--pred", str(tmp_path / "pred"), "--gt", str(tmp_path / "gt"), "--out", str(tmp_path / "e.csv")])
    rows = {row["class"]: row for row in csv.DictReader(open(tmp_path / "e.csv"))}
    assert lesion_numbers(rows["ET"]) == pytest.approx(AT_26)
