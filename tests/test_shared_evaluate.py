"""shared.evaluate folders and CLI on tiny NIfTI cases, hand-worked; run: pytest -q tests/test_shared_evaluate.py"""

import csv
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from shared.errors import InputError
from shared.evaluate import evaluate_folders, main

REPO = Path(__file__).resolve().parents[1]
AFFINE = np.diag([1.0, 1.0, 2.0, 1.0])  # 1 x 1 x 2 mm voxels: 2 mm^3 each
SHAPE = (6, 6, 6)


def save(path: Path, labels: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(labels.astype(np.uint8), AFFINE), str(path))


def binary_cases() -> dict:
    """Three cases (gt, pred) with metrics worked out by hand in test_binary_folders_by_hand."""
    cases = {}
    gt = np.zeros(SHAPE, np.uint8)
    gt[1:3, 1:3, 1:3] = 1  # 8 voxels, one lesion
    cases["c1"] = (gt, gt.copy())  # perfect
    pred = np.zeros(SHAPE, np.uint8)
    pred[1:3, 1:3, 1:2] = 1  # 4 voxels inside the gt cube
    pred[5, 5, 5] = 1  # one false lesion
    cases["c2"] = (gt.copy(), pred)
    gt3 = np.zeros(SHAPE, np.uint8)
    gt3[0, 0, 0] = gt3[4, 4, 4] = 1  # two lesions, both missed
    cases["c3"] = (gt3, np.zeros(SHAPE, np.uint8))
    return cases


def write_folders(tmp_path: Path, cases: dict, pred_ending: str = ".nii.gz") -> tuple[Path, Path]:
    for name, (gt, pred) in cases.items():
        save(tmp_path / "gt" / f"{name}.nii.gz", gt)
        save(tmp_path / "pred" / f"{name}{pred_ending}", pred)
    return tmp_path / "pred", tmp_path / "gt"


def read_csv(path: Path) -> list:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def expected_binary_summary() -> dict:
    # per case (c1, c2, c3): dice 1, 8/13, 0; ppv 1, 4/5, 0; ltpr 1, 1, 0; lfpr 0, 1/2, 0
    # volumes in voxels: pred 8, 5, 0; gt 8, 8, 2 -> Pearson r = 26 / sqrt(294/9 * 24) = 26/28
    dsc, ppv, ltpr, lfpr, corr = (1 + 8 / 13) / 3, 0.6, 2 / 3, 1 / 6, 26 / 28
    return {
        "mean_dice": dsc,
        "mean_ppv": ppv,
        "mean_ltpr": ltpr,
        "mean_lfpr": lfpr,
        "volume_correlation": corr,
        "cscore": dsc / 8 + ppv / 8 + ltpr / 4 + (1 - lfpr) / 4 + corr / 4,
    }


def test_binary_folders_by_hand(tmp_path):
    pred_dir, gt_dir = write_folders(tmp_path, binary_cases(), pred_ending=".nii")  # .nii pairs with .nii.gz
    rows, summary = evaluate_folders(pred_dir, gt_dir)
    assert [(r["case"], r["class"]) for r in rows] == [("c1", "lesion"), ("c2", "lesion"), ("c3", "lesion")]
    assert [r["dice"] for r in rows] == pytest.approx([1.0, 8 / 13, 0.0])
    assert [r["lesion_fp"] for r in rows] == [0, 1, 0]
    assert [r["lesion_fn"] for r in rows] == [0, 0, 2]
    assert [r["volume_gt_mm3"] for r in rows] == pytest.approx([16.0, 16.0, 4.0])  # spacing read from the affine
    assert len(summary) == 1 and summary[0]["n_cases"] == 3
    assert {k: summary[0][k] for k in expected_binary_summary()} == pytest.approx(expected_binary_summary())


def test_labels_and_brats_regions(tmp_path):
    gt = np.zeros(SHAPE, np.uint8)
    gt[1:3, 1:3, 1:3] = 1
    gt[5, 5, 5] = 2
    pred = gt.copy()
    pred[1, 1, 1] = 2
    pred[5, 5, 5] = 0
    pred_dir, gt_dir = write_folders(tmp_path, {"m1": (gt, pred)})
    rows, _ = evaluate_folders(pred_dir, gt_dir, labels=[1, 2])
    # label 1: gt 8, pred 7, overlap 7; label 2: gt {(5,5,5)}, pred {(1,1,1)} -> no overlap
    assert [r["class"] for r in rows] == ["1", "2"]
    assert [[r["dice"], r["ltpr"], r["lfpr"]] for r in rows] == [pytest.approx([14 / 15, 1.0, 0.0]), [0.0, 0.0, 1.0]]
    rows, _ = evaluate_folders(pred_dir, gt_dir)  # default: every non-zero label is lesion, 9 vs 8 voxels
    assert rows[0]["dice"] == pytest.approx(16 / 17)

    gt = np.zeros(SHAPE, np.uint8)
    gt[1:3, 1:3, 1:3] = 2  # edema
    gt[1, 1, 1], gt[2, 2, 2] = 4, 1  # BraTS 2021 coding: enhancing 4, necrosis 1
    pred = gt.copy()
    pred[1, 1, 1], pred[2, 2, 2] = 1, 4
    pred_dir, gt_dir = write_folders(tmp_path / "brats", {"b1": (gt, pred)})
    rows, _ = evaluate_folders(pred_dir, gt_dir, regions="brats", brats_labels=(1, 2, 4))
    assert {r["class"]: r["dice"] for r in rows} == pytest.approx({"TC": 1.0, "WT": 1.0, "ET": 0.0})


def test_cli_writes_rows_and_summary(tmp_path):
    pred_dir, gt_dir = write_folders(tmp_path, binary_cases())
    out = tmp_path / "res" / "metrics.csv"
    argv = ["--pred", str(pred_dir), "--gt", str(gt_dir), "--connectivity", "6", "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "shared.evaluate", *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert "cscore" in result.stdout
    rows = read_csv(out)
    assert [r["case"] for r in rows] == ["c1", "c2", "c3"]
    assert [float(r["dice"]) for r in rows] == pytest.approx([1.0, 8 / 13, 0.0])
    (summary,) = read_csv(tmp_path / "res" / "metrics_summary.csv")
    assert {k: float(summary[k]) for k in expected_binary_summary()} == pytest.approx(expected_binary_summary())
    assert sorted(p.name for p in out.parent.iterdir()) == ["metrics.csv", "metrics_summary.csv"]


def test_cli_refuses_mismatched_case_sets(tmp_path):
    cases = binary_cases()
    pred_dir, gt_dir = write_folders(tmp_path, cases)
    (pred_dir / "c3.nii.gz").unlink()
    save(pred_dir / "x9.nii.gz", cases["c1"][1])
    out = tmp_path / "metrics.csv"
    argv = ["--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "shared.evaluate", *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith("error: ") and "missing in --pred" in message and "c3" in message
    assert "missing in --gt" in message and "x9" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt", "pred"]  # nothing written


def test_refuses_mismatched_shape_naming_the_file(tmp_path):
    pred_dir, gt_dir = write_folders(tmp_path, binary_cases())
    save(pred_dir / "c2.nii.gz", np.zeros((6, 6, 5), np.uint8))
    out = tmp_path / "metrics.csv"
    with pytest.raises(InputError, match=r"c2\.nii\.gz.*shape"):
        main(["--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out)])
    assert not out.exists() and not (tmp_path / "metrics_summary.csv").exists()


def test_refuses_prediction_in_another_grid_naming_the_file(tmp_path):
    pred_dir, gt_dir = write_folders(tmp_path, binary_cases())
    shifted = AFFINE.copy()
    shifted[0, 3] += 2.0  # same shape, origin moved by 2 mm
    nib.save(nib.Nifti1Image(binary_cases()["c3"][1], shifted), str(pred_dir / "c3.nii.gz"))
    out = tmp_path / "metrics.csv"
    with pytest.raises(InputError, match=r"c3\.nii\.gz: affine differs"):
        main(["--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out)])
    assert not out.exists()


def test_refuses_bad_folders_and_non_integer_labels(tmp_path):
    pred_dir, gt_dir = write_folders(tmp_path, binary_cases())
    with pytest.raises(InputError, match="--gt"):
        evaluate_folders(pred_dir, tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no .nii"):
        evaluate_folders(tmp_path / "empty", gt_dir)
    nib.save(nib.Nifti1Image(np.full(SHAPE, 0.4, np.float32), AFFINE), str(pred_dir / "c1.nii.gz"))
    with pytest.raises(InputError, match="non-integer"):
        evaluate_folders(pred_dir, gt_dir)
    with pytest.raises(InputError, match="connectivity"):
        evaluate_folders(pred_dir, gt_dir, connectivity=4)


def test_format_table_aligns_columns_and_formats_floats():
    from shared.evaluate import format_table

    text = format_table([{"name": "a", "dice": 0.5}, {"name": "long", "dice": 1.0 / 3}], floats="{:.2f}")
    assert text.split("\n") == ["name  dice", "a     0.50", "long  0.33"]
