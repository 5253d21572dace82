"""Evaluate BrainSegFounder predictions with the paper's metrics.

    python -m brainsegfounder.evaluate --pred preds/ --gt DATASET_DIR/labelsTr --task brats --out eval.csv
    python -m brainsegfounder.evaluate --pred preds/ --gt ATLAS/labelsTr --task atlas --out eval.csv

brats: Dice of the TC/WT/ET regions (paper Table 4). Which label values are necrosis, edema and enhancing
tumour comes from the label names of the dataset.json beside a labelsTr/labelsTs `--gt` folder (nnU-Net's
BraTS conversion: edema 1, necrosis 2, enhancing 3), or from `--brats-labels`; without either the command
refuses, as it does when a file holds a label value that is none of the three. atlas: Dice, lesion-wise F1,
simple lesion count difference and volume difference (paper Table 6, ATLAS v2.0 challenge; 6-connected lesions
as the official scoring's `scipy.ndimage.label`). The per-case numbers come from `shared.evaluate`; this prints
the table and writes the per-case CSV (columns `case`, `class`, `dice`, ...) and `<stem>_summary.csv`.
"""

import argparse

import nibabel as nib
import numpy as np

from brainsegfounder.regions import HINT, dataset_beside, describe, labels_from_dataset
from shared.cli import run_cli
from shared.errors import InputError
from shared.evaluate import evaluate_folders, list_cases, summary_path, write_csv_atomic

COLUMNS = {
    "brats": ("dice",),
    "atlas": ("dice", "lesion_f1", "lesion_count_diff", "volume_diff_vox"),
}


def brats_values(gt_dir, explicit=None) -> tuple[tuple[int, int, int], str]:
    """(necrosis, edema, enhancing) for scoring `gt_dir`, and their source: --brats-labels, or the names in the
    dataset.json beside a labelsTr/labelsTs folder; refuses in one sentence when neither is there."""
    root = dataset_beside(gt_dir)
    if root is not None:
        return labels_from_dataset(root, explicit)
    if explicit is not None:
        return tuple(int(v) for v in explicit), "--brats-labels"
    raise InputError(f"--gt {gt_dir} is not the labelsTr/labelsTs folder of a dataset with a dataset.json naming "
                     f"its labels; {HINT}.")  # fmt: skip


def check_values(folder, flag: str, allowed) -> None:
    """Refuse a label map holding a value outside `allowed`: the regions would silently leave it out."""
    for path in list_cases(folder, flag).values():
        found = set(np.unique(np.asarray(nib.load(path).dataobj)).astype(np.int64).tolist())
        extra = sorted(found - set(allowed))
        if extra:
            raise InputError(f"{path}: label value(s) {extra} are none of background 0 and the BraTS classes "
                             f"{sorted(set(allowed) - {0})}; check --brats-labels or dataset.json.")  # fmt: skip


def evaluate(pred_dir, gt_dir, task: str, brats_labels=None) -> tuple[list, list]:
    """Per-case rows and per-class summary of a prediction folder for `task` ("brats" or "atlas").

    For "brats", `brats_labels` are the (necrosis, edema, enhancing) values (see `brats_values`).
    """
    if task == "brats":
        allowed = {0, *brats_labels}
        check_values(gt_dir, "--gt", allowed)
        check_values(pred_dir, "--pred", allowed)
        return evaluate_folders(pred_dir, gt_dir, regions="brats", brats_labels=tuple(brats_labels))
    return evaluate_folders(pred_dir, gt_dir, connectivity=6)


def format_table(summary: list, task: str) -> str:
    """The task's mean metrics, one line per class (region)."""
    columns = COLUMNS[task]
    lines = [f"{'class':>8} {'n':>4} " + " ".join(f"{c:>18}" for c in columns)]
    for entry in summary:
        cells = " ".join(f"{entry[f'mean_{c}']:>18.4f}" for c in columns)
        lines.append(f"{entry['class']:>8} {entry['n_cases']:>4d} {cells}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pred", required=True, help="folder of predicted label maps CASE.nii.gz")
    parser.add_argument("--gt", required=True, help="folder of reference label maps with the same case names "
                        "(a dataset's labelsTr/labelsTs: its dataset.json names the BraTS labels)")  # fmt: skip
    parser.add_argument("--task", choices=sorted(COLUMNS), default="brats", help="which paper table's metrics")
    parser.add_argument("--brats-labels", type=int, nargs=3, metavar=("NECROSIS", "EDEMA", "ENH"),
                        help="label values of the BraTS classes in both folders, overriding the dataset.json "
                        "names (BraTS 2021 files: 1 2 4; nnU-Net's conversion: 2 1 3)")  # fmt: skip
    parser.add_argument("--out", required=True, help="per-case CSV; the summary goes to <stem>_summary.csv")
    args = parser.parse_args(argv)
    values = None
    if args.task == "brats":
        values, source = brats_values(args.gt, args.brats_labels)
        print(describe(values, source))
    rows, summary = evaluate(args.pred, args.gt, args.task, values)
    write_csv_atomic(args.out, rows)
    write_csv_atomic(summary_path(args.out), summary)
    print(format_table(summary, args.task))
    print(f"wrote {args.out} ({len(rows)} rows) and {summary_path(args.out)}")


if __name__ == "__main__":
    run_cli(main)
