"""Evaluate a folder of predicted label maps against a folder of reference label maps.

    python -m shared.evaluate --pred PRED_DIR --gt GT_DIR --out metrics.csv [--labels 1 2 3 | --regions brats]
        [--connectivity 26] [--cases CASE ... | --split split.json [--fold F] [--subset val]]

Files are paired by case name (`CASE.nii.gz` or `CASE.nii`). The cases of --pred are scored (or those of --cases
/ --split, which must all be predicted), so --gt can be a whole labelsTr folder; a prediction without a
reference is refused. Each case and class gives one row of `shared.metrics.case_metrics` in the CSV;
`<out stem>_summary.csv` holds per-class means plus the volume correlation across cases and the CScore.

Refused, so that no score is silently wrong: --labels values that occur in no scored file (unless the
dataset.json beside --gt declares them), and --regions brats on label maps that cannot hold the three BraTS
classes (a dataset.json that does not declare them, values other than --brats-labels, or references with a
single non-zero value, i.e. binary masks).
"""

import csv
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shared.atomic import atomic_path
from shared.brats import brats_values_for_gt
from shared.cli import check_output_file, make_parser, non_negative_int, positive_int, run_cli
from shared.dataset import check_declared, declared_label_values, load_dataset_json
from shared.errors import InputError, short_list
from shared.inputs import add_subset_args, nifti_stem, selected_cases
from shared.metrics import brats_regions, case_metrics, cscore, volume_correlation
from shared.nifti import read_nifti

_PRINTED = ("dice", "hd95", "ppv", "sensitivity", "ltpr", "lfpr", "lesion_f1", "volume_correlation", "cscore")


def case_name(filename: str) -> str | None:
    """Case name of a NIfTI file name ("BRATS_001.nii.gz" -> "BRATS_001"), or None for other and hidden files."""
    return nifti_stem(filename)


def list_cases(folder, flag: str) -> dict:
    """Map case name -> path of every NIfTI file in `folder`; `flag` names the argument in error messages."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"{flag} {folder}: not a folder.")
    cases = {}
    for path in sorted(folder.iterdir()):
        name = case_name(path.name)
        if name is None or not path.is_file():
            continue
        if name in cases:
            raise InputError(f"{flag} {folder}: case {name} has both a .nii and a .nii.gz file.")
        cases[name] = path
    if not cases:
        raise InputError(f"{flag} {folder}: no .nii or .nii.gz files found.")
    return cases


def _read_labels(path) -> tuple[np.ndarray, tuple, np.ndarray]:
    """Integer label map, voxel spacing and affine of one file; refuses non-integer voxel values."""
    volume = read_nifti(path, dtype=np.float64)
    labels = np.rint(volume.data)
    if not np.array_equal(labels, volume.data):
        raise InputError(f"{path}: label map holds non-integer values (a probability map instead of labels?).")
    return labels.astype(np.int32), volume.spacing, volume.affine


def class_masks(labels: np.ndarray, classes, regions: str | None, brats_labels=(1, 2, 3)) -> dict:
    """Binary masks to evaluate: BraTS regions, one mask per label value, or every non-zero label as "lesion"."""
    if regions == "brats":
        necrosis, edema, enhancing = brats_labels
        return brats_regions(labels, necrosis=necrosis, edema=edema, enhancing=enhancing)
    if classes:
        return {str(c): labels == c for c in classes}
    return {"lesion": labels > 0}


def declared_labels(gt_dir) -> tuple | None:
    """Label values declared by the dataset.json beside a `labelsTr`/`labelsTs` --gt folder, or None without one."""
    gt_dir = Path(gt_dir)
    if not gt_dir.name.startswith("labels") or not (gt_dir.parent / "dataset.json").is_file():
        return None
    return declared_label_values(load_dataset_json(gt_dir.parent)["labels"])


def scored_cases(pred_cases: dict, gt_cases: dict, cases=None, pred_dir="", gt_dir="") -> list[str]:
    """The cases to score, sorted: `cases` (all predicted and with a reference) or every case of --pred.

    A reference without a prediction is simply not scored (--gt may be a whole labelsTr folder); a prediction
    without a reference is refused, as is a listed case that was not predicted.
    """
    wanted = sorted(pred_cases) if cases is None else sorted(set(cases))
    not_predicted = [c for c in wanted if c not in pred_cases]
    no_reference = [c for c in wanted if c in pred_cases and c not in gt_cases]
    if not_predicted:
        raise InputError(f"--pred {pred_dir} lacks predictions of {len(not_predicted)} listed case(s): "
                         f"{short_list(not_predicted)}.")  # fmt: skip
    if no_reference:
        raise InputError(f"--gt {gt_dir} has no reference for {len(no_reference)} predicted case(s): "
                         f"{short_list(no_reference)}.")  # fmt: skip
    return wanted


def _check_brats_coding(path, labels: np.ndarray, brats_labels) -> None:
    """Refuse a label map holding values that are not background or one of the BraTS label values."""
    foreign = sorted(set(np.unique(labels).tolist()) - {0, *brats_labels})
    if foreign:
        raise InputError(
            f"{path}: label values {foreign} are not BraTS classes --brats-labels {' '.join(map(str, brats_labels))} "
            "(necrosis, edema, enhancing; BraTS 2021 files use 1 2 4)."
        )


def evaluate_folders(pred_dir, gt_dir, labels=None, connectivity: int = 26, regions: str | None = None,
                     brats_labels=None, cases=None) -> tuple[list, list]:  # fmt: skip
    """Per-case, per-class metrics of a prediction folder against a reference folder, and their summary.

    Args:
        pred_dir, gt_dir: folders of `CASE.nii.gz` / `CASE.nii` label maps; every scored case needs both.
        labels: label values evaluated one by one (binary `== value`); None -> one class "lesion" = label > 0.
            A value in no scored file (and not declared by a dataset.json beside gt_dir) is refused.
        connectivity: 6, 18 or 26 neighbours for the lesion-wise metrics.
        regions: "brats" to evaluate the TC/WT/ET regions instead of `labels` (refused on labels that cannot hold
            them, see the module docstring).
        brats_labels: (necrosis, edema, enhancing) label values used with regions="brats"; None takes them from
            the label names of the dataset.json beside a labelsTr/labelsTs gt_dir (`shared.brats`), and refuses
            when there is none or its names do not determine them.
        cases: only these case ids (all must be predicted); None scores every case of pred_dir.

    Returns:
        rows: one dict per (case, class): {"case", "class", **case_metrics}; spacing from the gt file.
        summary: one dict per class: {"class", "n_cases", "mean_<metric>" for each metric,
            "volume_correlation" (Pearson of pred vs gt mm^3 across cases), "cscore" (from the means and it)}.
    """
    if regions not in (None, "brats"):
        raise InputError(f"regions must be 'brats' or None, got {regions!r}.")
    if connectivity not in (6, 18, 26):
        raise InputError(f"connectivity must be 6, 18 or 26, got {connectivity!r}.")
    if regions == "brats":
        brats_labels, _ = brats_values_for_gt(gt_dir, brats_labels)
    brats_labels = tuple(int(v) for v in brats_labels or ())
    if regions == "brats" and (len(set(brats_labels)) != 3 or 0 in brats_labels):
        raise InputError(f"--brats-labels {brats_labels} must be three different non-zero label values.")
    declared = declared_labels(gt_dir)
    declared_in = str(Path(gt_dir).parent / "dataset.json")  # where `declared` comes from, for the refusals
    if regions == "brats" and declared is not None and not set(brats_labels) <= set(declared):
        raise InputError(f"--regions brats: {declared_in} declares the labels "
                         f"{list(declared)}, which cannot hold the BraTS classes {list(brats_labels)}.")  # fmt: skip
    if labels and declared is not None and set(labels) - set(declared):
        raise InputError(f"--labels {short_list(set(labels) - set(declared))}: not declared in "
                         f"{declared_in} (labels {list(declared)}).")  # fmt: skip
    pred_cases, gt_cases = list_cases(pred_dir, "--pred"), list_cases(gt_dir, "--gt")
    wanted = scored_cases(pred_cases, gt_cases, cases, pred_dir, gt_dir)

    rows, present, gt_present = [], set(), set()
    for case in tqdm(wanted, desc="evaluate", unit="case", disable=None):
        gt, spacing, gt_affine = _read_labels(gt_cases[case])
        pred, _, pred_affine = _read_labels(pred_cases[case])
        if pred.shape != gt.shape:
            raise InputError(f"{pred_cases[case]}: shape {pred.shape} differs from the reference shape {gt.shape}.")
        if not np.allclose(pred_affine, gt_affine, atol=1e-3):
            raise InputError(
                f"{pred_cases[case]}: affine differs from the reference's (not in the same grid; resample the "
                "prediction to the reference first)."
            )
        gt_values, pred_values = set(np.unique(gt).tolist()), set(np.unique(pred).tolist())
        if declared is not None:
            check_declared(gt_cases[case], gt_values, declared, source=declared_in)
            check_declared(pred_cases[case], pred_values, declared, source=declared_in)
        gt_present |= gt_values
        present |= gt_values | pred_values
        if regions == "brats":
            _check_brats_coding(gt_cases[case], gt, brats_labels)
            _check_brats_coding(pred_cases[case], pred, brats_labels)
        gt_masks = class_masks(gt, labels, regions, brats_labels)
        pred_masks = class_masks(pred, labels, regions, brats_labels)
        for name in gt_masks:
            metrics = case_metrics(pred_masks[name], gt_masks[name], spacing=spacing, connectivity=connectivity)
            rows.append({"case": case, "class": name, **metrics})

    absent = sorted(set(labels or ()) - present - set(declared or ()))
    if absent:
        found = sorted(present)
        raise InputError(f"--labels {short_list(absent)}: in none of the {len(wanted)} scored case(s) of --pred "
                         f"or --gt (values found: {found}); it would score Dice 1.0 for nothing.")  # fmt: skip
    if regions == "brats" and declared is None and len(gt_present - {0}) < 2:
        raise InputError(f"--regions brats: the references in --gt {gt_dir} hold only the values "
                         f"{sorted(gt_present)}, binary masks that cannot hold the three BraTS classes; score them "
                         "without --regions.")  # fmt: skip
    return rows, summarise(rows)


def summarise(rows: list) -> list:
    """Per-class means of every metric of `rows`, the volume correlation across cases and the CScore."""
    summary = []
    for name in dict.fromkeys(row["class"] for row in rows):  # classes in first-seen order
        class_rows = [row for row in rows if row["class"] == name]
        metric_keys = [key for key in class_rows[0] if key not in ("case", "class")]
        means = {f"mean_{key}": float(np.mean([row[key] for row in class_rows])) for key in metric_keys}
        corr = volume_correlation([r["volume_pred_mm3"] for r in class_rows], [r["volume_gt_mm3"] for r in class_rows])
        # the CScore is linear in its terms, so the mean of per-case scores equals the score of the means
        score = cscore(means["mean_dice"], means["mean_ppv"], means["mean_ltpr"], means["mean_lfpr"], corr)
        summary.append(
            {"class": name, "n_cases": len(class_rows), **means, "volume_correlation": corr, "cscore": float(score)}
        )
    return summary


def write_csv_atomic(path, rows: list) -> None:
    """Write dict rows to CSV via a temp file in the same folder and a rename, so no half-written file remains."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def summary_path(out) -> Path:
    """`metrics.csv` -> `metrics_summary.csv` beside it."""
    out = Path(out)
    return out.with_name(f"{out.stem}_summary{out.suffix or '.csv'}")


def format_summary(summary: list) -> str:
    """A plain-text table of the main summary numbers, one line per class."""
    header = ["class", "n"] + list(_PRINTED)
    lines = ["  ".join(f"{h:>12}" for h in header)]
    for entry in summary:
        values = [entry.get(f"mean_{key}", entry.get(key)) for key in _PRINTED]
        cells = [f"{entry['class']:>12}", f"{entry['n_cases']:>12d}"] + [f"{v:>12.4f}" for v in values]
        lines.append("  ".join(cells))
    return "\n".join(lines)


def parse_args(argv=None):
    """Command-line flags of `python -m shared.evaluate` (argv=None reads sys.argv)."""
    parser = make_parser(__doc__, prog="python -m shared.evaluate")
    parser.add_argument("--pred", required=True, help="folder of predicted label maps, CASE.nii.gz or CASE.nii")
    parser.add_argument("--gt", required=True, help="folder of reference label maps (e.g. a dataset's labelsTr)")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--labels", type=non_negative_int, nargs="+",
                       help="label values to evaluate one by one (default: all non-zero as one class)")  # fmt: skip
    group.add_argument("--regions", choices=["brats"], help="evaluate BraTS regions TC, WT, ET instead of labels")
    parser.add_argument("--brats-labels", type=positive_int, nargs=3, metavar=("NECROSIS", "EDEMA", "ENHANCING"),
                        help="label values of --regions brats (BraTS 2021 files: 1 2 4; nnU-Net's conversion: 2 1 3); "
                        "default: the label names of the dataset.json beside a labelsTr/labelsTs --gt")  # fmt: skip
    parser.add_argument("--connectivity", type=int, default=26, choices=[6, 18, 26],
                        help="neighbours joining voxels into a lesion")  # fmt: skip
    add_subset_args(parser)
    parser.add_argument("--out", required=True, help="per-case CSV to write; the summary goes to <stem>_summary.csv")
    return parser.parse_args(argv)


def format_table(rows: list[dict], floats: str = "{:.4f}") -> str:
    """A plain-text table of dict rows for the terminal."""
    keys = list(rows[0])
    cells = [[floats.format(r[k]) if isinstance(r[k], float) else str(r[k]) for k in keys] for r in rows]
    widths = [max(len(k), *(len(c[i]) for c in cells)) for i, k in enumerate(keys)]
    lines = ["  ".join(k.ljust(w) for k, w in zip(keys, widths))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def main(argv=None) -> None:
    """Evaluate, then write the per-case CSV and the summary CSV (nothing is written if any input is refused)."""
    args = parse_args(argv)
    check_output_file(args.out, "--out", suffixes=(".csv",))
    check_output_file(summary_path(args.out), "--out", suffixes=(".csv",))
    gt = Path(args.gt)
    dataset = gt.resolve().parent.name if gt.name.startswith("labels") else None  # a dataset's labelsTr folder
    cases = selected_cases(args.cases, args.split, fold=args.fold, subset=args.subset, dataset=dataset)
    rows, summary = evaluate_folders(
        args.pred,
        args.gt,
        labels=args.labels,
        connectivity=args.connectivity,
        regions=args.regions,
        brats_labels=args.brats_labels,
        cases=cases,
    )
    write_csv_atomic(args.out, rows)
    write_csv_atomic(summary_path(args.out), summary)
    print(format_summary(summary))
    print(f"wrote {args.out} ({len(rows)} rows) and {summary_path(args.out)}")


if __name__ == "__main__":
    run_cli(main)
