"""Five-fold cross-validation table (BrainSegFounder Tables 4 and 8): per-fold TC / WT / ET / mean Dice and the
average over the folds.

    for f in 0 1 2 3 4; do
        python -m brainsegfounder.finetune --data BRATS_DIR --channels FLAIR T1ce T1 T2 --init runs/stage2/best.pt \
            --fold $f --folds 5 --out runs/cv/fold$f
    done
    python -m brainsegfounder.crossval runs/cv/fold0 runs/cv/fold1 runs/cv/fold2 runs/cv/fold3 runs/cv/fold4 \
        --out runs/cv/table.csv

Each argument is the `--out` folder of one `brainsegfounder.finetune` call holding one run (one
`--train-fraction`, one repeat), validated on its own fold. The folders must share data, target, `--folds`
and `--split-file`, hold different folds, and validate on disjoint cases (checked); fewer folders than folds
are scored and said so. A fold's number per region is its validation Dice at the last step (`--score final`)
or at its best validation (`--score best`, chosen on the same cases, so optimistic); the average row is the
mean over the folds of each column, as the paper's. `--empty-reference` as in `brainsegfounder.fewshot`
(default skip, BSF's MONAI DiceMetric). Writes `--out` (one row per fold and the average).
"""

from pathlib import Path

import numpy as np

from brainsegfounder.fewshot import read_arm, run_scores
from brainsegfounder.scoring import add_empty_reference_arg, describe_skipped
from shared import cli
from shared.cli import run_cli
from shared.errors import InputError
from shared.evaluate import write_csv_atomic


def read_fold(folder, score: str, empty_reference: str) -> dict:
    """{"fold", "folds", "split_file", "data", "target", "val_cases", "regions", "scores"} of one finetune run."""
    summary = read_arm(folder)
    if "fold" not in summary or "val_cases" not in summary:
        raise InputError(f"{folder}: its summary.json records no fold (written by an older finetune; rerun it).")
    if summary.get("holdout"):
        raise InputError(f"{folder}: trained with --holdout, a fixed held-out set, not a cross-validation fold.")
    runs = run_scores(summary, score, str(folder), empty_reference)
    if len(runs) != 1:
        raise InputError(f"{folder}: holds {len(runs)} runs (fractions x repeats); a cross-validation fold is one "
                         "finetune run (one --train-fraction, --repeats 1).")  # fmt: skip
    return {**{k: summary.get(k) for k in ("fold", "folds", "split_file", "data", "target", "val_cases", "regions")},
            "scores": next(iter(runs.values()))}  # fmt: skip


def collect_folds(folders, score: str, empty_reference: str) -> list[dict]:
    """The folds sorted by fold index, after checking that they are folds of one cross-validation."""
    folds = []
    for folder in folders:
        fold = {**read_fold(folder, score, empty_reference), "folder": str(folder)}
        for other in folds:
            for key in ("data", "target", "folds", "split_file"):
                if fold[key] != other[key]:
                    raise InputError(f"{folder}: {key} {fold[key]!r} differs from {other[key]!r} of "
                                     f"{other['folder']}; the folds must come from one cross-validation.")  # fmt: skip
            if fold["fold"] == other["fold"]:
                raise InputError(f"{folder}: fold {fold['fold']} is also {other['folder']}.")
            shared_cases = sorted(set(fold["val_cases"]) & set(other["val_cases"]))
            if shared_cases:
                raise InputError(f"{folder}: validation cases {shared_cases[:3]} are also validated in "
                                 f"{other['folder']}; the folds are not disjoint.")  # fmt: skip
        folds.append(fold)
    return sorted(folds, key=lambda f: f["fold"])


def table_rows(folds: list) -> list[dict]:
    """One row per fold ({"fold", regions..., "mean", "n_val"}) and the average row over the folds."""
    regions = folds[0]["regions"]
    rows = [{"fold": str(f["fold"]), **{r: f["scores"]["regions"][r] for r in regions},
             "mean": f["scores"]["score"], "n_val": len(f["val_cases"])} for f in folds]  # fmt: skip
    average = {"fold": "average", **{k: float(np.nanmean([row[k] for row in rows])) for k in (*regions, "mean")},
               "n_val": sum(row["n_val"] for row in rows)}  # fmt: skip
    return [*rows, average]


def format_table(rows: list, regions, score: str, n_folds: int, folds_declared: int) -> str:
    """Tables 4 / 8 layout: folds as rows, the regions and their mean as columns, then the average."""
    lines = [f"cross-validation Dice ({score} step), {n_folds} of {folds_declared} folds",
             f"{'fold':>8} " + " ".join(f"{r:>8}" for r in (*regions, "mean")) + f" {'cases':>6}"]  # fmt: skip
    for row in rows:
        if row["fold"] == "average":
            lines.append("-" * len(lines[1]))
        lines.append(f"{row['fold']:>8} " + " ".join(f"{row[k]:>8.4f}" for k in (*regions, "mean"))
                     + f" {row['n_val']:>6d}")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = cli.make_parser(__doc__, prog="python -m brainsegfounder.crossval")
    parser.add_argument("folds", nargs="+", help="finetune --out folders, one per fold")
    parser.add_argument("--score", choices=("final", "best"), default="final",
                        help="validation Dice at the last step, or at the best validation (optimistic)")  # fmt: skip
    add_empty_reference_arg(parser)
    parser.add_argument("--out", help="CSV of the table (one row per fold, then the average)")
    args = parser.parse_args(argv)
    if args.out:
        cli.check_output_file(args.out, "--out", suffixes=(".csv",))
    folds = collect_folds(args.folds, args.score, args.empty_reference)
    rows = table_rows(folds)
    print(format_table(rows, folds[0]["regions"], args.score, len(folds), folds[0]["folds"]))
    if args.empty_reference == "skip":
        for fold in folds:
            print(f"fold {fold['fold']}: {describe_skipped(fold['scores']['skipped'], fold['scores']['n_cases'])}")
    if args.out:
        write_csv_atomic(Path(args.out), rows)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    run_cli(main)
