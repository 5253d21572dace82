"""Evaluate BrainSegFounder predictions with the paper's metrics.

    python -m brainsegfounder.evaluate --pred preds/ --gt DATASET_DIR/labelsTr --task brats --out eval.csv
    python -m brainsegfounder.evaluate --pred preds/ --gt ATLAS/labelsTr --task atlas --out eval.csv

brats: Dice of the TC/WT/ET regions (paper Table 4). atlas: Dice, lesion-wise F1, simple lesion count
difference and volume difference (paper Table 6, ATLAS v2.0 challenge; 6-connected lesions as the official
scoring's `scipy.ndimage.label`). The per-case numbers come from `shared.evaluate`; this prints the table
and writes the per-case CSV and `<stem>_summary.csv`.
"""

import argparse

from shared.cli import run_cli
from shared.evaluate import evaluate_folders, summary_path, write_csv_atomic

COLUMNS = {
    "brats": ("dice",),
    "atlas": ("dice", "lesion_f1", "lesion_count_diff", "volume_diff_vox"),
}


def evaluate(pred_dir, gt_dir, task: str, brats_labels=(1, 2, 3)) -> tuple[list, list]:
    """Per-case rows and per-class summary of a prediction folder for `task` ("brats" or "atlas")."""
    if task == "brats":
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
    parser.add_argument("--gt", required=True, help="folder of reference label maps with the same case names")
    parser.add_argument("--task", choices=sorted(COLUMNS), default="brats", help="which paper table's metrics")
    parser.add_argument("--brats-labels", type=int, nargs=3, default=(1, 2, 3), metavar=("NECROSIS", "EDEMA", "ENH"),
                        help="label values of the BraTS classes in both folders (BraTS 2021 files: 1 2 4)")  # fmt: skip
    parser.add_argument("--out", required=True, help="per-case CSV; the summary goes to <stem>_summary.csv")
    args = parser.parse_args(argv)
    rows, summary = evaluate(args.pred, args.gt, args.task, args.brats_labels)
    write_csv_atomic(args.out, rows)
    write_csv_atomic(summary_path(args.out), summary)
    print(format_table(summary, args.task))
    print(f"wrote {args.out} ({len(rows)} rows) and {summary_path(args.out)}")


if __name__ == "__main__":
    run_cli(main)
