"""Evaluate a general model, a task expert or the MoE on held-out targets with N clicks and with a box.

    python -m sam_med3d_moe.evaluate --model runs/moe/checkpoint.pt --data DIR [DIR ...] \
        --split runs/moe/split.json --clicks 10 --out runs/eval --name moe

Per target (case x channel x label, cropped around its bounding box as the official validation): Dice after
each of `--clicks` clicks (old official protocol: one new click per step + previous mask), the maximum over
the clicks (what the official validation reported per case, labelled "max"), and Dice with the ground-truth
box. Writes <name>_targets.csv and <name>_summary.csv (mean per dataset) and prints the summary.
"""

import argparse
import csv
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sam_med3d_moe.config import SELECTOR_MODES
from sam_med3d_moe.data import crop_sample, load_samples
from sam_med3d_moe.interaction import evaluate_box, evaluate_points
from sam_med3d_moe.predict import Predictor
from sam_med3d_moe.train_common import split_cases
from shared.cli import run_cli
from shared.errors import InputError
from shared.harness import pick_device


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="run checkpoint of this package or converted state_dict")
    parser.add_argument(
        "--config", default="vit_b_ori", help="architecture of a plain state_dict: vit_b_ori, small or tiny"
    )
    parser.add_argument("--data", nargs="+", required=True, help="nnU-Net raw dataset folders")
    parser.add_argument("--split", help="split.json of a run (its 'val' cases are evaluated)")
    parser.add_argument("--fold", type=int, default=0, help="without --split: held-out fold (-1: every case)")
    parser.add_argument("--folds", type=int, default=5, help="without --split: number of folds")
    parser.add_argument("--modalities", nargs="+", help="channels to use (default: every channel)")
    parser.add_argument(
        "--union", nargs="*", metavar="DATASET", help="whole-foreground targets (all or named datasets)"
    )
    parser.add_argument("--spacing", type=float, default=1.5, help="isotropic resampling in mm")
    parser.add_argument("--min-voxels", type=int, default=10, help="skip targets smaller than this")
    parser.add_argument("--clicks", type=int, default=10, help="number of clicks (the paper's Table 1: 6)")
    parser.add_argument("--jitter", type=int, default=0, help="box jitter in voxels at evaluation")
    parser.add_argument("--selector", choices=SELECTOR_MODES, help="MoE mask selector override (Table 2)")
    parser.add_argument("--tau", type=float, help="MoE selector threshold override (Table 2)")
    parser.add_argument("--seed", type=int, default=2023, help="seed of the simulated clicks (official: 2023)")
    parser.add_argument("--out", required=True, help="folder for the CSV files")
    parser.add_argument("--name", default="model", help="file prefix and row label")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if args.clicks < 1:
        raise InputError(f"--clicks must be at least 1, got {args.clicks}.")
    return args


def _write_csv(path: Path, rows: list) -> None:
    tmp = path.with_name(f".tmp_{path.name}")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)


def evaluate(args) -> list[dict]:
    """Evaluate and write the CSVs; returns the summary rows (one per dataset)."""
    if args.split:
        if not Path(args.split).is_file():
            raise InputError(f"--split {args.split}: file not found.")
        split = json.loads(Path(args.split).read_text())
    else:
        split = split_cases(args.data, args.fold, args.folds)
    ids = {}
    for root in args.data:
        name = Path(root).name
        if name not in split:
            raise InputError(f"--split {args.split} has no entry for dataset {name}.")
        ids[name] = split[name]["val"] or split[name]["train"]  # fold -1 runs evaluate on the training cases
    samples = load_samples(
        args.data, ids, modalities=args.modalities, spacing=args.spacing, union=args.union, min_voxels=args.min_voxels
    )
    device = pick_device(args.device)
    predictor = Predictor(args.model, device, config=args.config, selector=args.selector, tau=args.tau)
    rng = np.random.default_rng(args.seed)
    rows = []
    for sample in tqdm(samples, desc=f"evaluate {args.name}", disable=None, leave=False):
        image, mask = crop_sample(sample, predictor.cfg.image_size)
        image, gt = torch.from_numpy(image)[None], torch.from_numpy(mask)[None].to(device)
        emb = predictor.embed(image)
        dice, _ = evaluate_points(predictor.stepper(emb), gt, rng, predictor.cfg, num_clicks=args.clicks)
        row = {"model": args.name, "dataset": sample.task, "target": sample.name}
        row.update({f"dice_click{t + 1}": round(float(d), 5) for t, d in enumerate(dice[0])})
        row["dice_max_over_clicks"] = round(float(dice[0].max()), 5)
        if predictor.cfg.box_prompts:
            box_dice, _ = evaluate_box(predictor.stepper(emb), gt, rng, predictor.cfg, jitter=args.jitter)
            row["dice_box"] = round(float(box_dice[0]), 5)
        rows.append(row)
    summary = []
    for task in sorted({r["dataset"] for r in rows}):
        own = [r for r in rows if r["dataset"] == task]
        means = {k: round(float(np.mean([r[k] for r in own])), 4) for k in own[0] if k.startswith("dice")}
        summary.append({"model": args.name, "dataset": task, "targets": len(own), **means})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    _write_csv(out / f"{args.name}_targets.csv", rows)
    _write_csv(out / f"{args.name}_summary.csv", summary)
    return summary


def main(argv=None) -> None:
    args = parse_args(argv)
    summary = evaluate(args)
    last = f"dice_click{args.clicks}"
    for row in summary:
        box = f", box {row['dice_box']:.3f}" if "dice_box" in row else ""
        print(
            f"{row['model']} on {row['dataset']} ({row['targets']} targets): click 1 {row['dice_click1']:.3f}, "
            f"click {args.clicks} {row[last]:.3f}, max over clicks {row['dice_max_over_clicks']:.3f}{box}"
        )


if __name__ == "__main__":
    run_cli(main)
