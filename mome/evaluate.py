"""Score prediction folders of several models side by side, as the paper's tables.

    python -m mome.evaluate --data DATASET_DIR [...] --pred PRED_MOME PRED_NNUNET --names MoME nnU-Net \
        --split-file runs/mome/split.json --unseen Dataset911_PhantomTumourScannerB \
        --model runs/mome/checkpoint.pt --out runs/mome/eval

PRED/<dataset folder name>/<CASE_XXXX>.nii.gz is a model's prediction for channel XXXX (the index declared in
dataset.json) of a case, as `mome.predict` writes it. Every image is scored binarised: lesion = prediction > 0
against the reference lesion of its modality (`--label-rule`, default every label > 0). Datasets are seen
(scored on the held-out cases of --split-file), `--unseen` (new datasets of the seen lesion types: Table 2) or
`--new-lesion` (datasets of lesion types absent from the training data given here; one extra row).

Averaging levels (`shared.metrics.aggregate_levels`): image = mean over every scored image; task = mean over
(dataset, modality) tasks of each task's image mean; dataset = mean over datasets of each dataset's image mean.
The paper's summary of unseen data is the dataset level: each unseen dataset is one task, and Table 3's "Unseen
Datasets" is the mean of Table 2's per-dataset values, so the unseen headline printed here is `unseen_dataset`
(the mean of table2.csv's unseen rows); the unseen image level is an extra column. Writes:
- per_image.csv: Dice, HD95, PPV, sensitivity and lesion-wise numbers of every model and image;
- table1.csv: one row per model, Dice at the image, task (dataset x modality) and dataset levels for seen,
  unseen and new-lesion data (Table 1 for seen; unseen_dataset is the paper's Table 2 row average);
- table2.csv: mean Dice over the images of each unseen dataset (rows) for every model (columns), and one row
  for all new-lesion datasets together (image mean);
- per_task.csv: mean Dice per dataset and modality (Supplementary Table I) for every model;
- expert_usage.csv and expert_usage_lesion.csv (with --model, a MoME): each expert's share of the gate-weighted
  output overall and its signed share of the lesion-vs-background margin at lesion voxels (c_i / |sum c|:
  positive pushes towards lesion, negative towards background, whatever the sign of the total), on seen images
  (our analysis in the spirit of Suppl. Fig. I; see mome/usage.py).
"""

from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from mome.labels import add_label_rule_arg, binarise, lesion_values
from mome.predict import load_model
from mome.splits import held_out, read_split_files
from mome.usage import expert_usage
from shared.cli import check_output_dir, make_parser, non_negative_int, run_cli
from shared.dataset import canonical_modality, check_declared, list_cases, load_dataset_json
from shared.errors import InputError
from shared.evaluate import format_table, write_csv_atomic
from shared.metrics import aggregate_levels, case_metrics
from shared.nifti import read_nifti

GROUPS = ("seen", "unseen", "new_lesion")


def channel_indices(root) -> dict[str, int]:
    """{canonical modality: channel index} as declared in dataset.json (the XXXX of CASE_XXXX, not the position)."""
    channels = load_dataset_json(root)["channel_names"]
    return {canonical_modality(name): int(index) for index, name in channels.items()}


def collect_images(data_dirs, split: dict | None, subset=None, *, test_set=False, cases=None, groups=None) -> list:
    """Every image to score: {dataset, group, case, modality, channel, label, case_obj}.

    Args:
        split: {dataset: split entry}; a seen dataset must be in it (its training cases are never scored), others
            are scored on every labelled case unless listed.
        subset: which list of the split ("train", "val", "test"; default the held-out one).
        test_set: score imagesTs/labelsTs instead of imagesTr/labelsTr.
        cases: only these case ids (any dataset).
        groups: {dataset: "seen" | "unseen" | "new_lesion"} (default seen).
    """
    groups = groups or {}
    images = []
    for root in map(Path, data_dirs):
        group = groups.get(root.name, "seen")
        wanted = None
        if split is not None and root.name in split:
            wanted = set(held_out(split[root.name], subset))
        elif split is not None and group == "seen":
            raise InputError(
                f"--split-file has no split for the seen dataset {root.name}, so its training cases would be scored; "
                "declare it --unseen or --new-lesion if it was never trained on."
            )
        if test_set and not (root / "imagesTs").is_dir():
            raise InputError(f"--test-set: {root} has no imagesTs folder.")
        index = channel_indices(root)
        unlabelled = 0
        for case in list_cases(root, "Ts" if test_set else "Tr"):
            if (wanted is not None and case.case_id not in wanted) or (cases and case.case_id not in cases):
                continue
            if case.label is None:
                unlabelled += 1
                continue
            for modality, path in case.images.items():
                if path is not None:
                    images.append(dict(dataset=root.name, group=group, case=case.case_id, modality=modality,
                                       channel=index[modality], label=case.label, case_obj=case))  # fmt: skip
        if unlabelled:
            print(f"{root.name}: {unlabelled} selected case(s) without a label file are not scored")
    return images


def pred_path(pred_root, im: dict) -> Path:
    """PRED_ROOT/<dataset>/<CASE_XXXX>.nii.gz, or .nii when that is what exists (mome.predict keeps the input's)."""
    path = Path(pred_root) / im["dataset"] / f"{im['case']}_{im['channel']:04d}.nii.gz"
    return path if path.is_file() or not path.with_suffix("").is_file() else path.with_suffix("")


def score_images(images, pred_root, lesion: dict | None = None, connectivity: int = 26) -> list[dict]:
    """Per-image metrics of one model: binarised prediction against the reference lesion of the image's modality.

    Args:
        lesion: {(dataset, modality): lesion label values} (`mome.labels.lesion_values`); None: every declared
            label value > 0.
    """
    missing = [f"{im['dataset']}/{im['case']}_{im['channel']:04d}" for im in images
               if not pred_path(pred_root, im).is_file()]  # fmt: skip
    if missing:
        raise InputError(f"--pred {pred_root} lacks {len(missing)} predictions: {', '.join(missing[:10])}.")
    rows = []
    for im in images:
        gt = read_nifti(im["label"], dtype=np.int64)
        pred = read_nifti(pred_path(pred_root, im), dtype=np.int64)
        if pred.data.shape != gt.data.shape:
            raise InputError(f"{pred.path}: shape {pred.data.shape} differs from its reference {gt.data.shape}.")
        if not np.allclose(pred.affine, gt.affine, atol=1e-3):
            raise InputError(f"{pred.path}: affine differs from its reference's (not predicted in the input grid).")
        check_declared(gt.path, np.unique(gt.data), im["case_obj"].label_values)
        check_declared(pred.path, np.unique(pred.data), im["case_obj"].label_values)
        if lesion is not None:
            values = lesion[(im["dataset"], im["modality"])]
        else:
            values = [v for v in im["case_obj"].label_values if v > 0]
        reference = binarise(gt.data, values)
        metrics = case_metrics(pred.data > 0, reference, spacing=gt.spacing, connectivity=connectivity)
        rows.append({k: im[k] for k in ("dataset", "group", "modality", "case", "channel")} | metrics)
    return rows


def table1(rows_by_model: dict) -> list[dict]:
    """One row per model: Dice at the image, task and dataset levels, for each group present (Table 1).

    Keys `<group>_image`, `<group>_task`, `<group>_dataset` (levels as in the module docstring) and their counts
    `<group>_n_image`, ... ; `unseen_dataset` is the mean over unseen datasets, the paper's unseen summary.
    """
    table = []
    for name, rows in rows_by_model.items():
        row = {"model": name}
        for group in GROUPS:
            subset = [r for r in rows if r["group"] == group]
            if subset:
                levels = aggregate_levels(subset, value="dice")
                row |= {f"{group}_{k}": levels[k] for k in ("image", "task", "dataset")}
                row |= {f"{group}_n_{k}": levels[f"n_{k}s"] for k in ("image", "task", "dataset")}
        table.append(row)
    return table


def table2(rows_by_model: dict) -> list[dict]:
    """Mean Dice over the images of each unseen dataset (rows) for every model (columns), as the paper's Table 2,
    and one row for all new-lesion datasets together (mean over their images). The mean of the unseen rows is
    table1's `unseen_dataset`."""
    first = next(iter(rows_by_model.values()))
    unseen = sorted({r["dataset"] for r in first if r["group"] == "unseen"})
    new = sorted({r["dataset"] for r in first if r["group"] == "new_lesion"})
    selections = [(d, lambda r, d=d: r["dataset"] == d) for d in unseen]
    if new:
        selections.append((f"lesion types not trained on: {', '.join(new)}", lambda r: r["group"] == "new_lesion"))
    table = []
    for label, keep in selections:
        row = {"dataset": label, "images": sum(1 for r in first if keep(r))}
        row |= {name: float(np.mean([r["dice"] for r in rows if keep(r)])) for name, rows in rows_by_model.items()}
        table.append(row)
    return table


def task_table(rows_by_model: dict) -> list[dict]:
    """Mean Dice per dataset and modality (Supplementary Table I), one column per model."""
    groups = defaultdict(lambda: defaultdict(list))
    for name, rows in rows_by_model.items():
        for r in rows:
            groups[(r["group"], r["dataset"], r["modality"])][name].append(r["dice"])
    table = []
    for (group, dataset, modality), by_model in sorted(groups.items(), key=lambda kv: (GROUPS.index(kv[0][0]), kv[0])):
        row = {"data": group, "dataset": dataset, "modality": modality, "images": len(next(iter(by_model.values())))}
        table.append(row | {name: float(np.mean(v)) for name, v in by_model.items()})
    return table


def headline(table: list[dict]) -> list[dict]:
    """The summary numbers at the paper's levels: seen at the three levels of Table 1, unseen at the dataset level
    (mean over unseen datasets, Table 3's "Unseen Datasets"), the unseen image level and new-lesion image and
    dataset levels as labelled extras."""
    keys = [("seen_image", "seen image"), ("seen_task", "seen task"), ("seen_dataset", "seen dataset"),
            ("unseen_dataset", "UNSEEN (mean over datasets)"), ("unseen_image", "unseen image (extra)"),
            ("new_lesion_dataset", "lesion types not trained on (mean over datasets)")]  # fmt: skip
    return [{"model": r["model"]} | {label: r[k] for k, label in keys if k in r} for r in table]


def printed_table1(table: list[dict]) -> str:
    """Table 1 for the terminal: the three levels per group, the counts in the header line."""
    groups = [g for g in GROUPS if f"{g}_image" in table[0]]
    compact = [{"model": r["model"]} | {f"{g} {k}": r[f"{g}_{k}"] for g in groups for k in ("image", "task", "dataset")}
               for r in table]  # fmt: skip
    counts = "; ".join(
        f"{g}: {table[0][f'{g}_n_image']} images, {table[0][f'{g}_n_task']} tasks, {table[0][f'{g}_n_dataset']} "
        "datasets"
        for g in groups
    )
    return f"({counts})\n" + format_table(compact)


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--data", nargs="+", required=True, help="nnU-Net raw dataset folders with labels")
    parser.add_argument("--pred", nargs="+", required=True, help="one PRED_ROOT per model, each with one sub-folder "
                        "of predictions per dataset")  # fmt: skip
    parser.add_argument("--names", nargs="+", help="one name per --pred (default: the folder names)")
    parser.add_argument("--split-file", "--split", dest="split_file", nargs="+",
                        help="split.json of the training run, a {dataset: {train, test}} file or nnU-Net's "
                        "splits_final.json; the held-out cases of seen datasets are scored")  # fmt: skip
    parser.add_argument("--fold", type=non_negative_int, default=0, help="fold of an nnU-Net splits_final.json")
    parser.add_argument("--subset", choices=("train", "val", "test"),
                        help="which list of the split to score (default: test, else val)")  # fmt: skip
    parser.add_argument("--test-set", action="store_true", help="score imagesTs/labelsTs instead of imagesTr/labelsTr")
    parser.add_argument("--cases", nargs="+", help="only these case ids")
    parser.add_argument("--unseen", nargs="*", default=[], help="datasets never trained on, of seen lesion types "
                        "(Table 2)")  # fmt: skip
    parser.add_argument("--new-lesion", nargs="*", default=[], help="datasets of lesion types absent from training "
                        "(one extra row)")  # fmt: skip
    add_label_rule_arg(parser)
    parser.add_argument("--model", help="MoME checkpoint for the expert-usage tables (optional; a single network "
                        "of mome.train_expert has no gate and is skipped)")  # fmt: skip
    parser.add_argument("--connectivity", type=int, default=26, choices=(6, 18, 26), help="lesion connectivity")
    parser.add_argument("--device", default="cpu", help="device for the expert-usage analysis")
    parser.add_argument("--out", required=True, help="output folder for the CSV tables")
    args = parser.parse_args(argv)
    check_output_dir(args.out, "--out")
    for root in args.pred:
        if not Path(root).is_dir():
            raise InputError(f"--pred {root} is not a folder.")
    args.names = args.names or [Path(p).name for p in args.pred]
    if len(args.names) != len(args.pred):
        raise InputError(f"--names gives {len(args.names)} names for {len(args.pred)} --pred folders.")
    if len(set(args.names)) != len(args.names):
        raise InputError(f"--names {args.names} must be unique (they name the table columns).")
    names = [Path(d).name for d in args.data]
    for flag, chosen in (("--unseen", args.unseen), ("--new-lesion", args.new_lesion)):
        unknown = sorted(set(chosen) - set(names))
        if unknown:
            raise InputError(f"{flag} {unknown} are not among the --data folders {names}.")
    if set(args.unseen) & set(args.new_lesion):
        raise InputError(f"{sorted(set(args.unseen) & set(args.new_lesion))} cannot be both --unseen and --new-lesion.")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    lesion = lesion_values(args.data, args.label_rule)
    split = read_split_files(args.split_file, args.data, fold=args.fold) if args.split_file else None
    groups = {d: "unseen" for d in args.unseen} | {d: "new_lesion" for d in args.new_lesion}
    images = collect_images(args.data, split, subset=args.subset, test_set=args.test_set, cases=args.cases,
                            groups=groups)  # fmt: skip
    if not images:
        raise InputError("no labelled image to evaluate in --data (check --split-file, --subset and --cases).")
    model = info = None
    if args.model:
        model, info = load_model(args.model, torch.device(args.device))
        if info["kind"] != "mome":
            print(f"--model {args.model} is a single network (mome.train_expert): no gate, so no expert-usage table")
            model = None
    rows = {name: score_images(images, root, lesion, args.connectivity) for name, root in zip(args.names, args.pred)}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out / "per_image.csv", [{"model": name} | r for name, rs in rows.items() for r in rs])
    levels, tasks, unseen = table1(rows), task_table(rows), table2(rows)
    write_csv_atomic(out / "table1.csv", levels)
    write_csv_atomic(out / "per_task.csv", tasks)
    print("Dice per dataset and modality (Suppl. Table I)\n" + format_table(tasks))
    if unseen:
        write_csv_atomic(out / "table2.csv", unseen)
        print("\nDice per unseen dataset (Table 2)\n" + format_table(unseen))
    print("\nDice at three averaging levels (Table 1)\n" + printed_table1(levels))
    print("\nHeadline Dice (seen: Table 1 levels; unseen: mean over the unseen datasets, as the paper's summary)\n"
          + format_table(headline(levels)))  # fmt: skip
    if model is not None:
        seen = [im for im in images if im["group"] == "seen"] or images  # Suppl. Fig. I: the training modalities
        magnitude, at_lesions = expert_usage(model, seen, info["patch"], torch.device(args.device),
                                             info["modalities"], lesion)  # fmt: skip
        write_csv_atomic(out / "expert_usage.csv", magnitude)
        print("\nShare of each expert in mean|e_i * g_i| over the patch, by dataset and input modality "
              "(cf. Suppl. Fig. I)\n"
              + format_table(magnitude, floats="{:.3f}"))  # fmt: skip
        if at_lesions:
            write_csv_atomic(out / "expert_usage_lesion.csv", at_lesions)
            print("\nSigned share of each expert in the fused lesion-vs-background margin at reference lesion voxels"
                  " (c_i / |sum c|: > 0 pushes towards lesion, < 0 towards background; rows sum to the sign of"
                  " mean_margin)\n"
                  + format_table(at_lesions, floats="{:.3f}"))  # fmt: skip
    print(f"\ntables written to {out}")


if __name__ == "__main__":
    run_cli(main)
