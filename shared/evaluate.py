"""Evaluate a folder of predicted label maps against a folder of reference label maps.

    python -m shared.evaluate --pred PRED_DIR --gt GT_DIR --out metrics.csv [--labels 1 2 3 | --regions brats]
        [--connectivity 26]

Files are paired by case name (`CASE.nii.gz` or `CASE.nii` in both folders). Each case and class gives one row of
`shared.metrics.case_metrics` in the CSV; `<out stem>_summary.csv` holds per-class means plus the volume
correlation across cases and the CScore built from them.
"""

import argparse
import csv
from pathlib import Path

import numpy as np
from tqdm import tqdm

from shared.atomic import atomic_path
from shared.cli import run_cli
from shared.errors import InputError
from shared.metrics import brats_regions, case_metrics, cscore, volume_correlation
from shared.nifti import read_nifti

_LIST_LIMIT = 10  # cases named in an error message before "and N more"
_PRINTED = ("dice", "hd95", "ppv", "sensitivity", "ltpr", "lfpr", "lesion_f1", "volume_correlation", "cscore")


def case_name(filename: str) -> str | None:
    """Case name of a NIfTI file name ("BRATS_001.nii.gz" -> "BRATS_001"), or None for other files."""
    for ending in (".nii.gz", ".nii"):
        if filename.endswith(ending) and len(filename) > len(ending):
            return filename[: -len(ending)]
    return None


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


def _short_list(names) -> str:
    """Sorted names joined by commas, cut after _LIST_LIMIT so one message stays one readable sentence."""
    names = sorted(names)
    text = ", ".join(names[:_LIST_LIMIT])
    return text + (f" and {len(names) - _LIST_LIMIT} more" if len(names) > _LIST_LIMIT else "")


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


def evaluate_folders(
    pred_dir, gt_dir, labels=None, connectivity: int = 26, regions: str | None = None, brats_labels=(1, 2, 3)
) -> tuple[list, list]:
    """Per-case, per-class metrics of a prediction folder against a reference folder, and their summary.

    Args:
        pred_dir, gt_dir: folders of `CASE.nii.gz` / `CASE.nii` label maps; both must hold the same cases.
        labels: label values evaluated one by one (binary `== value`); None -> one class "lesion" = label > 0.
        connectivity: 6, 18 or 26 neighbours for the lesion-wise metrics.
        regions: "brats" to evaluate the TC/WT/ET regions instead of `labels`.
        brats_labels: (necrosis, edema, enhancing) label values used with regions="brats".

    Returns:
        rows: one dict per (case, class): {"case", "class", **case_metrics}; spacing from the gt file.
        summary: one dict per class: {"class", "n_cases", "mean_<metric>" for each metric,
            "volume_correlation" (Pearson of pred vs gt mm^3 across cases), "cscore" (from the means and it)}.
    """
    if regions not in (None, "brats"):
        raise InputError(f"regions must be 'brats' or None, got {regions!r}.")
    if connectivity not in (6, 18, 26):
        raise InputError(f"connectivity must be 6, 18 or 26, got {connectivity!r}.")
    pred_cases, gt_cases = list_cases(pred_dir, "--pred"), list_cases(gt_dir, "--gt")
    missing_pred, missing_gt = set(gt_cases) - set(pred_cases), set(pred_cases) - set(gt_cases)
    if missing_pred or missing_gt:
        parts = []
        if missing_pred:
            parts.append(f"missing in --pred {pred_dir}: {_short_list(missing_pred)}")
        if missing_gt:
            parts.append(f"missing in --gt {gt_dir}: {_short_list(missing_gt)}")
        raise InputError("prediction and reference folders hold different cases; " + "; ".join(parts) + ".")

    rows = []
    for case in tqdm(sorted(gt_cases), desc="evaluate", unit="case"):
        gt, spacing, gt_affine = _read_labels(gt_cases[case])
        pred, _, pred_affine = _read_labels(pred_cases[case])
        if pred.shape != gt.shape:
            raise InputError(f"{pred_cases[case]}: shape {pred.shape} differs from the reference shape {gt.shape}.")
        if not np.allclose(pred_affine, gt_affine, atol=1e-3):
            raise InputError(
                f"{pred_cases[case]}: affine differs from the reference's (not in the same grid; resample the "
                "prediction to the reference first)."
            )
        gt_masks = class_masks(gt, labels, regions, brats_labels)
        pred_masks = class_masks(pred, labels, regions, brats_labels)
        for name in gt_masks:
            metrics = case_metrics(pred_masks[name], gt_masks[name], spacing=spacing, connectivity=connectivity)
            rows.append({"case": case, "class": name, **metrics})
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


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags of `python -m shared.evaluate` (argv=None reads sys.argv)."""
    parser = argparse.ArgumentParser(prog="python -m shared.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("--pred", required=True, help="folder of predicted label maps, CASE.nii.gz or CASE.nii")
    parser.add_argument("--gt", required=True, help="folder of reference label maps with the same case names")
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--labels", type=int, nargs="+", help="label values to evaluate one by one (default: all non-zero as one)"
    )
    group.add_argument("--regions", choices=["brats"], help="evaluate BraTS regions TC, WT, ET instead of labels")
    parser.add_argument(
        "--brats-labels",
        type=int,
        nargs=3,
        default=(1, 2, 3),
        metavar=("NECROSIS", "EDEMA", "ENHANCING"),
        help="label values used by --regions brats (BraTS 2021 files: 1 2 4; nnU-Net conversions: 1 2 3)",
    )
    parser.add_argument(
        "--connectivity", type=int, default=26, choices=[6, 18, 26], help="neighbours joining voxels into a lesion"
    )
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
    rows, summary = evaluate_folders(
        args.pred,
        args.gt,
        labels=args.labels,
        connectivity=args.connectivity,
        regions=args.regions,
        brats_labels=tuple(args.brats_labels),
    )
    write_csv_atomic(args.out, rows)
    write_csv_atomic(summary_path(args.out), summary)
    print(format_summary(summary))
    print(f"wrote {args.out} ({len(rows)} rows) and {summary_path(args.out)}")


if __name__ == "__main__":
    run_cli(main)
