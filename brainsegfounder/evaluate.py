"""Evaluate BrainSegFounder predictions with the paper's metrics (Dice as BSF's code computes it).

    python -m brainsegfounder.evaluate --pred preds/ --gt DATASET_DIR/labelsTr --task brats --out eval.csv
    python -m brainsegfounder.evaluate --pred preds/ --gt ATLAS/labelsTr --task atlas --out eval.csv

brats: Dice of the TC/WT/ET regions (paper Table 4). Which label values are necrosis, edema and enhancing
tumour comes from the label names of the dataset.json beside a labelsTr/labelsTs `--gt` folder (nnU-Net's
BraTS conversion: edema 1, necrosis 2, enhancing 3), or from `--brats-labels`; without either the command
refuses, as it does when a file holds a label value that is none of the three.
atlas: Dice, lesion-wise F1, simple lesion count difference and volume difference (paper Table 6, ATLAS v2.0
challenge; 6-connected lesions as the official scoring's `scipy.ndimage.label`).

The predicted cases are scored (`--gt` may be a whole labelsTr folder), or those of `--cases` / `--split FILE`
(a run's split.json, or nnU-Net's splits_final.json with `--fold`). The per-case numbers come from
`shared.evaluate`; this prints the table and writes the per-case CSV (columns `case`, `class`, `dice`, ...)
and `<stem>_summary.csv`.

`--empty-reference skip` (default, the paper's MONAI DiceMetric): a case whose reference class is empty has no
Dice (NaN in the CSV) and is left out of the mean Dice, the `skipped` column counts them; `score`: empty
prediction and reference 1, a prediction on an empty reference 0 (`brainsegfounder.scoring`).
"""

from pathlib import Path

from brainsegfounder.scoring import add_empty_reference_arg, region_means
from shared import cli
from shared.brats import brats_values_for_gt, dataset_beside, describe
from shared.cli import run_cli
from shared.evaluate import evaluate_folders, summary_path, write_csv_atomic
from shared.inputs import add_subset_args, selected_cases

COLUMNS = {
    "brats": ("dice",),
    "atlas": ("dice", "lesion_f1", "lesion_count_diff", "volume_diff_vox"),
}


def evaluate(pred_dir, gt_dir, task: str, brats_labels=None, cases=None) -> tuple[list, list]:
    """Per-case rows and per-class summary of a prediction folder for `task` ("brats" or "atlas").

    For "brats", `brats_labels` are the (necrosis, edema, enhancing) values (`shared.brats.brats_values_for_gt`);
    a label value that is none of them is refused by `shared.evaluate`. `cases`: only these (None: every predicted
    case).
    """
    if task == "brats":
        return evaluate_folders(pred_dir, gt_dir, regions="brats", brats_labels=tuple(brats_labels), cases=cases)
    return evaluate_folders(pred_dir, gt_dir, connectivity=6, cases=cases)


def skip_empty_references(rows: list, summary: list) -> tuple[list, list]:
    """BSF / MONAI DiceMetric convention: a case whose reference is empty has no Dice (NaN in its row) and is
    left out of that class's mean Dice; each summary entry gains `n_skipped_dice`. The other metrics keep
    their own conventions; the CScore, built from the 1 / 0 mean Dice, is dropped."""
    per_case = {}  # the shape of `brainsegfounder.scoring.case_scores`, so that one rule skips for both
    for row in rows:
        scores = per_case.setdefault(row["case"], {"dice": {}, "empty": []})
        scores["dice"][row["class"]] = row["dice"]
        if row["volume_gt_vox"] == 0:
            scores["empty"].append(row["class"])
    means = region_means(per_case, [entry["class"] for entry in summary], "skip")
    rows = [{**row, "dice": float("nan")} if row["volume_gt_vox"] == 0 else row for row in rows]
    out = []
    for entry in summary:
        entry = {k: v for k, v in entry.items() if k != "cscore"}
        entry["mean_dice"], entry["n_skipped_dice"] = means[entry["class"]], means["skipped"][entry["class"]]
        out.append(entry)
    return rows, out


def format_table(summary: list, task: str) -> str:
    """The task's mean metrics, one line per class (region), with the cases left out of the mean Dice."""
    columns = COLUMNS[task]
    lines = [f"{'class':>8} {'n':>4} {'skipped':>7} " + " ".join(f"{c:>18}" for c in columns)]
    for entry in summary:
        cells = " ".join(f"{entry[f'mean_{c}']:>18.4f}" for c in columns)
        lines.append(f"{entry['class']:>8} {entry['n_cases']:>4d} {entry.get('n_skipped_dice', 0):>7d} {cells}")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = cli.make_parser(__doc__, prog="python -m brainsegfounder.evaluate")
    parser.add_argument("--pred", required=True, help="folder of predicted label maps CASE.nii.gz (each is scored)")
    parser.add_argument("--gt", required=True, help="folder of reference label maps, e.g. a dataset's labelsTr "
                        "(its dataset.json names the BraTS labels)")  # fmt: skip
    parser.add_argument("--task", choices=sorted(COLUMNS), default="brats", help="which paper table's metrics")
    parser.add_argument("--brats-labels", type=cli.positive_int, nargs=3, metavar=("NECROSIS", "EDEMA", "ENH"),
                        help="label values of the BraTS classes in both folders, overriding the dataset.json "
                        "names (BraTS 2021 files: 1 2 4; nnU-Net's conversion: 2 1 3)")  # fmt: skip
    add_empty_reference_arg(parser)
    add_subset_args(parser)
    parser.add_argument("--out", required=True, help="per-case CSV; the summary goes to <stem>_summary.csv")
    args = parser.parse_args(argv)
    cli.check_output_file(args.out, "--out", suffixes=(".csv",))
    gt = Path(args.gt)
    dataset = gt.resolve().parent.name if dataset_beside(gt) is not None else None
    cases = selected_cases(args.cases, args.split, fold=args.fold, subset=args.subset, dataset=dataset)
    values = None
    if args.task == "brats":
        values, source = brats_values_for_gt(args.gt, args.brats_labels)
        print(describe(values, source))
    rows, summary = evaluate(args.pred, args.gt, args.task, values, cases=cases)
    if args.empty_reference == "skip":
        rows, summary = skip_empty_references(rows, summary)
    write_csv_atomic(args.out, rows)
    write_csv_atomic(summary_path(args.out), summary)
    print(format_table(summary, args.task))
    print(f"wrote {args.out} ({len(rows)} rows) and {summary_path(args.out)}")


if __name__ == "__main__":
    run_cli(main)
