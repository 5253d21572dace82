"""shared.evaluate folders and CLI on tiny NIfTI cases, hand-worked; run: pytest -q tests/test_shared_evaluate.py"""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from shared.dataset import write_dataset_json
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


def test_cli_refuses_a_prediction_without_reference(tmp_path):
    cases = binary_cases()
    pred_dir, gt_dir = write_folders(tmp_path, cases)
    save(pred_dir / "x9.nii.gz", cases["c1"][1])
    out = tmp_path / "metrics.csv"
    argv = ["--pred", str(pred_dir), "--gt", str(gt_dir), "--out", str(out)]
    result = subprocess.run(
        [sys.executable, "-m", "shared.evaluate", *argv], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 2
    assert result.stderr == f"error: --gt {gt_dir} has no reference for 1 predicted case(s): x9.\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gt", "pred"]  # nothing written


def test_scores_the_predicted_cases_against_a_larger_reference_folder(tmp_path):
    pred_dir, gt_dir = write_folders(tmp_path, binary_cases())
    (pred_dir / "c1.nii.gz").unlink()  # held-out labels stay in --gt; only c2 and c3 were predicted
    rows, summary = evaluate_folders(pred_dir, gt_dir)
    assert [r["case"] for r in rows] == ["c2", "c3"] and summary[0]["n_cases"] == 2
    assert [r["dice"] for r in rows] == pytest.approx([8 / 13, 0.0])


def test_cases_and_split_select_the_scored_subset(tmp_path):
    pred_dir, gt_dir = write_folders(tmp_path, binary_cases())
    out = tmp_path / "res" / "m.csv"
    main(["--pred", str(pred_dir), "--gt", str(gt_dir), "--cases", "c3", "c1", "--out", str(out)])
    assert [r["case"] for r in read_csv(out)] == ["c1", "c3"]
    split = tmp_path / "split.json"
    split.write_text(json.dumps({"Dataset001_X": {"train": ["c1"], "val": ["c2", "c3"]}}))
    main(["--pred", str(pred_dir), "--gt", str(gt_dir), "--split", str(split), "--out", str(out)])
    assert [r["case"] for r in read_csv(out)] == ["c2", "c3"]
    folds = tmp_path / "splits_final.json"
    folds.write_text(json.dumps([{"train": ["c2", "c3"], "val": ["c1"]}, {"train": ["c1"], "val": ["c2"]}]))
    main(["--pred", str(pred_dir), "--gt", str(gt_dir), "--split", str(folds), "--fold", "1", "--out", str(out)])
    assert [r["case"] for r in read_csv(out)] == ["c2"]
    (pred_dir / "c2.nii.gz").unlink()
    with pytest.raises(InputError, match=r"^--pred .* lacks predictions of 1 listed case\(s\): c2\.$"):
        main(["--pred", str(pred_dir), "--gt", str(gt_dir), "--split", str(split), "--out", str(tmp_path / "n.csv")])
    assert not (tmp_path / "n.csv").exists()


def test_labels_in_neither_folder_are_refused(tmp_path):
    pred_dir, gt_dir = write_folders(tmp_path, binary_cases())
    out = tmp_path / "metrics.csv"
    with pytest.raises(InputError) as err:
        main(["--pred", str(pred_dir), "--gt", str(gt_dir), "--labels", "1", "7", "--out", str(out)])
    assert str(err.value) == ("--labels 7: in none of the 3 scored case(s) of --pred or --gt (values found: [0, 1]); "
                              "it would score Dice 1.0 for nothing.")  # fmt: skip
    assert not out.exists()
    rows, _ = evaluate_folders(pred_dir, gt_dir, labels=[1])
    assert [r["dice"] for r in rows] == pytest.approx([1.0, 8 / 13, 0.0])


def _in_dataset(tmp_path, labels: dict) -> tuple[Path, Path]:
    """The binary cases with --gt as the labelsTr folder of a dataset declaring `labels`."""
    pred_dir, gt_dir = write_folders(tmp_path, binary_cases())
    root = tmp_path / "Dataset001_X"
    write_dataset_json(root, ["FLAIR"], labels, num_training=3)
    gt_dir.rename(root / "labelsTr")
    return pred_dir, root / "labelsTr"


def test_declared_labels_decide_when_gt_is_a_dataset_labels_folder(tmp_path):
    pred_dir, gt_dir = _in_dataset(tmp_path, {"background": 0, "lesion": 1, "other": 2})
    rows, _ = evaluate_folders(pred_dir, gt_dir, labels=[2])  # declared but absent here: empty vs empty
    assert [r["dice"] for r in rows] == [1.0, 1.0, 1.0]
    with pytest.raises(InputError, match=r"^--labels 7: not declared in .*dataset\.json \(labels \[0, 1, 2\]\)\.$"):
        evaluate_folders(tmp_path / "not even read", gt_dir, labels=[7])  # refused before any file is read


def test_brats_regions_are_refused_on_binary_labels(tmp_path):
    pred_dir, gt_dir = write_folders(tmp_path, binary_cases())
    out = tmp_path / "metrics.csv"
    with pytest.raises(InputError, match=r"^--regions brats: the references in --gt .* hold only the values \[0, 1\], "
                                         r"binary masks that cannot hold the three BraTS classes"):  # fmt: skip
        main(["--pred", str(pred_dir), "--gt", str(gt_dir), "--regions", "brats", "--out", str(out)])
    assert not out.exists()
    pred_dir, gt_dir = _in_dataset(tmp_path / "ds", {"background": 0, "lesion": 1})
    with pytest.raises(InputError, match=r"dataset\.json declares the labels \[0, 1\], which cannot hold the BraTS "
                                         r"classes \[1, 2, 3\]\.$"):  # fmt: skip
        evaluate_folders(pred_dir, gt_dir, regions="brats")


def test_brats_regions_refuse_values_of_another_coding(tmp_path):
    gt = np.zeros(SHAPE, np.uint8)
    gt[1:3, 1:3, 1:3] = 2
    gt[1, 1, 1], gt[2, 2, 2] = 4, 1  # BraTS 2021 coding
    pred = gt.copy()
    pred[1, 1, 1] = 3  # nnU-Net coding
    pred_dir, gt_dir = write_folders(tmp_path, {"b1": (gt, pred)})
    with pytest.raises(InputError, match=rf"^{re.escape(str(gt_dir))}/b1\.nii\.gz: label values \[4\] are not BraTS "
                                         r"classes --brats-labels 1 2 3 \(necrosis, edema, enhancing"):  # fmt: skip
        evaluate_folders(pred_dir, gt_dir, regions="brats")
    with pytest.raises(InputError, match=rf"^{re.escape(str(pred_dir))}/b1\.nii\.gz: label values \[3\] are not"):
        evaluate_folders(pred_dir, gt_dir, regions="brats", brats_labels=(1, 2, 4))
    save(pred_dir / "b1.nii.gz", gt)
    rows, _ = evaluate_folders(pred_dir, gt_dir, regions="brats", brats_labels=(1, 2, 4))
    assert [r["dice"] for r in rows] == [1.0, 1.0, 1.0]


def test_output_paths_are_checked_before_any_work(tmp_path, capsys):
    (tmp_path / "folder.csv").mkdir()
    for out, message in ((tmp_path / "folder.csv", "is a folder; give a file name ending in .csv."),
                         (tmp_path / "metrics.txt", "file name must end in .csv.")):  # fmt: skip
        with pytest.raises(InputError, match=re.escape(message)):
            main(["--pred", str(tmp_path / "nowhere"), "--gt", str(tmp_path / "nowhere"), "--out", str(out)])
    (tmp_path / "m_summary.csv").mkdir()
    with pytest.raises(InputError, match=r"m_summary\.csv is a folder"):
        main(["--pred", str(tmp_path / "nowhere"), "--gt", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m.csv")])
    with pytest.raises(SystemExit) as exit_info:
        main(["--pred", "p", "--gt", "g", "--out", "m.csv", "--labels", "-1"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err == "error: --labels: must be a non-negative integer, got -1.\n"


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
