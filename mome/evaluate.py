"""Evaluate MoME predictions as the paper's tables.

    python -m mome.evaluate --data DATASET_DIR [...] --pred PRED_ROOT --split runs/mome/split.json \
        --unseen Dataset906_PhantomStrokeChronic --model runs/mome/checkpoint.pt --out runs/mome/eval

PRED_ROOT/<dataset folder name>/<CASE_XXXX>.nii.gz is the prediction for channel XXXX of a case. Writes:
- per_image.csv: Dice, HD95, PPV, sensitivity, lesion-wise numbers of every image;
- table1.csv: image-, task- (dataset x modality) and dataset-level mean Dice (Table 1), seen and unseen data
  apart (Table 2);
- per_task.csv: mean Dice per dataset (lesion type) and modality (Supplementary Table I);
- expert_usage.csv (with --model): the expert degeneration analysis of Supplementary Fig. I: for inputs of
  each modality (rows), the share of each expert (columns) in the mean gate-weighted output magnitude
  mean|e_i^1 * g_i^1| at the finest level.
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from mome.predict import load_mome
from shared.cli import run_cli
from shared.dataset import list_cases, load_case
from shared.errors import InputError
from shared.evaluate import format_table, write_csv_atomic
from shared.geometry import crop_or_pad
from shared.metrics import aggregate_levels, case_metrics
from shared.nifti import read_nifti
from shared.transforms import zscore


def collect_images(data_dirs, split: dict | None, subset: str) -> list[dict]:
    """(dataset, case, modality, channel, image path, label path) of every image to evaluate."""
    images = []
    for root in data_dirs:
        root = Path(root)
        wanted = None
        if split is not None and root.name in split:
            wanted = set(split[root.name][subset])
        for case in list_cases(root):
            if case.label is None or (wanted is not None and case.case_id not in wanted):
                continue
            for channel, (modality, path) in enumerate(case.images.items()):
                if path is not None:
                    images.append(dict(dataset=root.name, case=case.case_id, modality=modality, channel=channel,
                                       image=path, label=case.label, case_obj=case))  # fmt: skip
    return images


def score_images(images, pred_root, connectivity: int = 26) -> list[dict]:
    """Per-image metrics of the binarised prediction (label > 0) against the binarised reference."""
    pred_root = Path(pred_root)
    missing = [f"{im['dataset']}/{im['case']}_{im['channel']:04d}" for im in images
               if not _pred_path(pred_root, im).exists()]  # fmt: skip
    if missing:
        raise InputError(f"--pred {pred_root} lacks {len(missing)} predictions: {', '.join(missing[:10])}.")
    rows = []
    for im in images:
        gt = read_nifti(im["label"], dtype=np.int64)
        pred = read_nifti(_pred_path(pred_root, im), dtype=np.int64)
        if pred.data.shape != gt.data.shape:
            raise InputError(f"{pred.path}: shape {pred.data.shape} differs from its reference {gt.data.shape}.")
        metrics = case_metrics(pred.data > 0, gt.data > 0, spacing=gt.spacing, connectivity=connectivity)
        rows.append({k: im[k] for k in ("dataset", "modality", "case", "channel")} | metrics)
    return rows


def _pred_path(pred_root: Path, im: dict) -> Path:
    return pred_root / im["dataset"] / f"{im['case']}_{im['channel']:04d}.nii.gz"


def level_table(rows, unseen) -> list[dict]:
    """Table 1 rows (seen data) and Table 2 rows (unseen data): Dice at the three averaging levels."""
    table = []
    for group, keep in (("seen", lambda r: r["dataset"] not in unseen), ("unseen", lambda r: r["dataset"] in unseen)):
        subset = [r for r in rows if keep(r)]
        if subset:
            levels = aggregate_levels(subset, value="dice")
            table.append({"data": group} | levels)
    return table


def task_table(rows) -> list[dict]:
    """Mean Dice (and image count) per dataset and modality, as Supplementary Table I."""
    groups = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["modality"])].append(r["dice"])
    return [{"dataset": d, "modality": m, "images": len(v), "dice": float(np.mean(v))}
            for (d, m), v in sorted(groups.items())]  # fmt: skip


@torch.no_grad()
def expert_usage(model, images, patch_size, device, expert_names, per_modality: int = 4) -> list[dict]:
    """Share of each expert in mean|e_i^1 * g_i^1| for inputs of each modality (Suppl. Fig. I as a table).

    Each image contributes a patch of `patch_size` around the centre of its lesion mask's bounding box (the
    volume centre when it has no lesion); at most `per_modality` images per modality.
    """
    sums, counts = defaultdict(lambda: torch.zeros(len(model.experts))), defaultdict(int)
    for im in images:
        if counts[im["modality"]] >= per_modality:
            continue
        image, label, _, _ = load_case(im["case_obj"], modalities=[im["modality"]])
        x = zscore(image)
        centre = np.array(x.shape[1:]) // 2
        if label is not None and (label > 0).any():
            idx = np.argwhere(label > 0)
            centre = (idx.min(0) + idx.max(0)) // 2
        start = [int(np.clip(c - p // 2, 0, max(s - p, 0))) for c, p, s in zip(centre, patch_size, x.shape[1:])]
        x = x[(slice(None), *[slice(s, s + p) for s, p in zip(start, patch_size)])]
        x, _ = crop_or_pad(x, patch_size)
        out = model(torch.from_numpy(np.ascontiguousarray(x))[None].to(device), return_all=True)
        gate = out["gates"][0]  # (1, N, K, D, H, W)
        for i, levels in enumerate(out["experts"]):
            sums[im["modality"]][i] += (levels[0] * gate[:, i]).abs().mean().item()
        counts[im["modality"]] += 1
    table = []
    for modality, total in sums.items():
        share = total / total.sum().clamp_min(1e-12)
        row = {"input_modality": modality, "images": counts[modality]}
        row |= {f"expert_{name}": float(share[i]) for i, name in enumerate(expert_names)}
        table.append(row)
    return table


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", nargs="+", required=True, help="nnU-Net raw dataset folders with labelsTr")
    parser.add_argument("--pred", required=True, help="PRED_ROOT with one sub-folder of predictions per dataset")
    parser.add_argument("--split", help="split.json of the training run; datasets listed there use --subset cases")
    parser.add_argument("--subset", choices=("val", "train"), default="val", help="which cases of --split to score")
    parser.add_argument("--unseen", nargs="*", default=[], help="dataset folder names kept out of training (Table 2)")
    parser.add_argument("--model", help="MoME checkpoint for the expert-usage table (optional)")
    parser.add_argument("--connectivity", type=int, default=26, choices=(6, 18, 26), help="lesion connectivity")
    parser.add_argument("--device", default="cpu", help="device for the expert-usage analysis")
    parser.add_argument("--out", required=True, help="output folder for the CSV tables")
    args = parser.parse_args(argv)
    split = None
    if args.split:
        try:
            split = json.loads(Path(args.split).read_text())
        except (OSError, json.JSONDecodeError) as err:
            raise InputError(f"--split {args.split} is not a readable split.json ({err}).") from err
    names = [Path(d).name for d in args.data]
    unknown = sorted(set(args.unseen) - set(names))
    if unknown:
        raise InputError(f"--unseen {unknown} are not among the --data folders {names}.")
    images = collect_images(args.data, split, args.subset)
    if not images:
        raise InputError("no labelled image to evaluate in --data (check --split and --subset).")
    rows = score_images(images, args.pred, connectivity=args.connectivity)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out / "per_image.csv", rows)
    levels, tasks = level_table(rows, set(args.unseen)), task_table(rows)
    write_csv_atomic(out / "table1.csv", levels)
    write_csv_atomic(out / "per_task.csv", tasks)
    print("Dice per dataset and modality (Suppl. Table I)\n" + format_table(tasks))
    print("\nDice at three averaging levels (Table 1: seen, Table 2: unseen)\n" + format_table(levels))
    if args.model:
        device = torch.device(args.device)
        model, ckpt = load_mome(args.model, device)
        usage = expert_usage(model, images, tuple(ckpt["args"]["patch"]), device, ckpt["config"]["modalities"])
        write_csv_atomic(out / "expert_usage.csv", usage)
        print("\nShare of each expert in the gate-weighted output, by input modality (Suppl. Fig. I)\n"
              + format_table(usage, floats="{:.3f}"))  # fmt: skip
    print(f"\ntables written to {out}")


if __name__ == "__main__":
    run_cli(main)
