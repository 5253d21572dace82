"""Evaluate a general model, a task expert or the MoE on held-out targets with N clicks and with a box.

    python -m sam_med3d_moe.evaluate --model runs/moe/checkpoint.pt --data DIR [DIR ...] \\
        --split runs/moe/split.json --clicks 6 --box --out runs/eval --name moe

Per target (case x channel x class, cropped around its bounding box as the official validation, read from the
preprocessed cache one case at a time): Dice after each of --clicks clicks (old official protocol: one new click
per step + the previous mask; the per-case score the official validation reported is the max over clicks) and,
with --box, Dice with the ground-truth box, all on the 1.5 mm crop. For the last click and the box also Dice and
NSD (--tolerance mm, MedIM's 1 mm) in the case's original grid, where the part of a target outside the crop
counts as missed: a target larger than the crop is never scored as if it were whole (their number is printed;
`in_crop` is the share of each target inside its crop). Files in --out:
    <name>_targets.csv   one row per target
    <name>_summary.csv   mean per dataset and class
    <name>_table1.csv    the paper's Table 1 split: fine-tuned classes (with a new-task expert: the new task)
                         vs other classes (the original tasks); the classes of the experts of --finetuned-from,
                         or of the model itself when it is an expert or the MoE; means over targets and over
                         classes (class_mean_*)
    <name>_routing.csv   the MoE only: per class and prompt type (click, box) the share of prompts the selector
                         sent to each decoder (with --selector general: all to the general one), the mean top
                         expert score s_top and the accuracy against the expected expert
"""

import csv
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sam_med3d_moe.config import CONFIG_NAMES, SELECTOR_MODES
from sam_med3d_moe.data import build_targets, load_cases, read_target
from sam_med3d_moe.interaction import dice_score, evaluate_box, evaluate_points
from sam_med3d_moe.predictor import Predictor
from sam_med3d_moe.preprocess import paste_at
from sam_med3d_moe.reports import routing_rows, table1_rows, task_label
from sam_med3d_moe.train_common import threshold
from shared.atomic import atomic_path
from shared.cli import (
    check_output_dir,
    make_parser,
    non_negative_float,
    non_negative_int,
    positive_float,
    positive_int,
    run_cli,
)
from shared.dataset import list_cases
from shared.errors import InputError
from shared.geometry import OrientationInfo, from_canonical, resample_to_shape
from shared.harness import pick_device
from shared.inputs import add_subset_args, selected_cases
from shared.metrics import normalized_surface_dice
from shared.nifti import read_nifti


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--model", required=True, help="run checkpoint of this package or converted state_dict")
    parser.add_argument(
        "--config", choices=CONFIG_NAMES, default="vit_b_ori", help="architecture of a plain state_dict"
    )
    parser.add_argument("--data", nargs="+", required=True, help="nnU-Net raw dataset folders")
    add_subset_args(parser)
    parser.add_argument("--modalities", nargs="+", help="channels to use (default: every channel)")
    parser.add_argument(
        "--union", nargs="*", metavar="DATASET", help="whole-foreground targets (all or named datasets)"
    )
    parser.add_argument("--spacing", type=positive_float, default=1.5, help="isotropic resampling in mm")
    parser.add_argument("--ct-clamp", action="store_true", help="clamp intensities to [-1000, 1000] (official CT)")
    parser.add_argument("--min-voxels", type=positive_int, default=10, help="skip targets smaller than this")
    parser.add_argument("--clicks", type=positive_int, default=10, help="number of clicks (the paper's Table 1: 6)")
    parser.add_argument("--box", action="store_true", help="also score one step with the ground-truth box")
    parser.add_argument("--allow-untrained-box", action="store_true", help="score --box even on box embeddings "
                        "that were never trained (random, seeded): a test only")  # fmt: skip
    parser.add_argument("--jitter", type=non_negative_int, default=0, help="box jitter in voxels at evaluation")
    parser.add_argument("--tolerance", type=non_negative_float, default=1.0, help="NSD tolerance in mm (MedIM: 1)")
    parser.add_argument("--finetuned-from", metavar="CKPT", help="expert or MoE run whose experts' classes are the "
                        "'fine-tuned classes' of the Table 1 split (default: the model's own)")  # fmt: skip
    parser.add_argument("--selector", choices=SELECTOR_MODES, help="MoE mask selector override (Table 2)")
    parser.add_argument("--tau", type=threshold, help="MoE selector threshold override (Table 2)")
    parser.add_argument("--seed", type=non_negative_int, default=2023, help="seed of the simulated clicks (official)")
    parser.add_argument("--cache", help="root of the preprocessed caches (default: $BRAINSEG_CACHE, else data/cache)")
    parser.add_argument("--out", required=True, help="folder for the CSV files")
    parser.add_argument("--name", default="model", help="file prefix and row label")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    return parser.parse_args(argv)


def _write_csv(path: Path, rows: list) -> None:
    if not rows:
        return
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def case_ids(args) -> dict:
    """Dataset name -> the labelled case ids to score (--cases, the --subset of --split, or every case)."""
    ids, seen = {}, set()
    for root in args.data:
        name = Path(root).name
        labelled = [c.case_id for c in list_cases(root) if c.label is not None]
        chosen = selected_cases(args.cases, args.split, fold=args.fold, subset=args.subset, dataset=name)
        if chosen is None:
            ids[name] = labelled
            continue
        ids[name] = [c for c in chosen if c in set(labelled)]
        seen.update(ids[name])
        if args.split and set(chosen) - set(labelled):
            raise InputError(f"--split {args.split} lists case(s) {sorted(set(chosen) - set(labelled))[:5]} "
                             f"that {root} does not hold with a label.")  # fmt: skip
    if args.cases and set(args.cases) - seen:
        raise InputError(f"--cases {sorted(set(args.cases) - seen)[:5]}: no labelled case of that id in --data.")
    return ids


class NativeGrid:
    """Scores a crop's prediction in the original grid of its case (one case's label in memory at a time)."""

    def __init__(self, label_files: dict) -> None:
        self.label_files, self.key, self.label = label_files, None, None

    def scores(self, entry, target, mask: np.ndarray, start, tolerance: float) -> tuple[float, float]:
        """(Dice, NSD at `tolerance` mm) of a (S, S, S) crop mask in the case's native grid."""
        props = entry.properties()
        if self.key != (entry.dataset, entry.case_id):
            self.key = (entry.dataset, entry.case_id)
            self.label = read_nifti(self.label_files[self.key], dtype=np.int32).data
        full = paste_at(mask.astype(np.uint8), start, tuple(props["shape"]))
        oriented = resample_to_shape(full, tuple(props["oriented_shape"]), order=0)
        info = OrientationInfo(np.asarray(props["orientation"]), tuple(props["native_shape"]),
                               np.asarray(props["native_affine"]))  # fmt: skip
        pred = from_canonical(oriented, info) > 0
        gt = self.label > 0 if target.label is None else self.label == target.label
        return dice_score(pred, gt), normalized_surface_dice(pred, gt, props["native_spacing"], tolerance)


def evaluate(args) -> dict:
    """Evaluate and write the CSVs; returns {"summary", "table1", "routing"} (lists of rows)."""
    out = check_output_dir(args.out, "--out")
    ids = case_ids(args)
    device = pick_device(args.device)
    predictor = Predictor(args.model, device, config=args.config, selector=args.selector, tau=args.tau, seed=args.seed)
    if args.box:
        predictor.check_box(args.allow_untrained_box, "--allow-untrained-box")
    tasks = predictor.expert_tasks
    if args.finetuned_from:
        tasks = Predictor(args.finetuned_from, torch.device("cpu"), config=args.config).expert_tasks
        if not tasks:
            raise InputError(f"--finetuned-from {args.finetuned_from} is not an expert or MoE run (no expert tasks).")
    entries = load_cases(args.data, ids, args.modalities, args.spacing, args.ct_clamp, cache_root=args.cache)
    targets = build_targets(entries, union=args.union, min_voxels=args.min_voxels)
    label_files = {(Path(r).name, c.case_id): c.label for r in args.data for c in list_cases(r) if c.label}
    native = NativeGrid(label_files)
    rng = np.random.default_rng(args.seed)
    size, rows, records, too_large = predictor.cfg.image_size, [], [], []
    for target in tqdm(targets, desc=f"evaluate {args.name}", disable=None, leave=False):
        entry = entries[target.entry]
        image, mask, start = read_target(entry, target, size)
        gt = torch.from_numpy(mask.astype(np.float32))[None, None].to(device)
        emb = predictor.embed(torch.from_numpy(image)[None, None])
        routing = {"click": [], "box": []}
        dice, logits = evaluate_points(
            predictor.stepper(emb, routing["click"]), gt, rng, predictor.cfg, num_clicks=args.clicks
        )
        row = {"model": args.name, "dataset": target.dataset, "case": target.case_id, "modality": target.modality,
               "label": task_label(target.label), "target": target.name, "voxels": target.voxels,
               "in_crop": round(int(mask.sum()) / target.voxels, 4)}  # fmt: skip
        if row["in_crop"] < 1:
            too_large.append(target.name)
        row.update({f"dice_click{t + 1}": round(float(d), 5) for t, d in enumerate(dice[0])})
        row["dice_max_over_clicks"] = round(float(dice[0].max()), 5)
        last = (logits[0, 0] > 0).cpu().numpy()
        row["dice_native"], row["nsd_native"] = (round(v, 5) for v in native.scores(entry, target, last, start,
                                                                                    args.tolerance))  # fmt: skip
        if args.box:
            box_dice, box_logits = evaluate_box(predictor.stepper(emb, routing["box"]), gt, rng, predictor.cfg,
                                                 args.jitter)  # fmt: skip
            row["dice_box"] = round(float(box_dice[0]), 5)
            box_mask = (box_logits[0, 0] > 0).cpu().numpy()
            row["dice_box_native"], row["nsd_box_native"] = (
                round(v, 5) for v in native.scores(entry, target, box_mask, start, args.tolerance)
            )
        rows.append(row)
        for prompt, scores in routing.items():
            if scores:
                records.append({"dataset": target.dataset, "label": target.label, "prompt": prompt,
                                "scores": np.concatenate(scores)})  # fmt: skip
    if too_large:
        print(f"{len(too_large)} of {len(rows)} targets are larger than the {size}^3 crop (e.g. {too_large[0]}); "
              "their crop Dice ignores the part outside, the native Dice and NSD count it as missed.")  # fmt: skip
    metrics = [k for k in rows[0] if k.startswith(("dice", "nsd"))]
    groups = defaultdict(list)
    for r in rows:
        groups[(r["dataset"], r["label"])].append(r)
    summary = [{"model": args.name, "dataset": d, "label": lab, "targets": len(g),
                **{m: round(float(np.mean([r[m] for r in g])), 4) for m in metrics}}
               for (d, lab), g in sorted(groups.items())]  # fmt: skip
    table1 = [{"model": args.name, **r} for r in table1_rows(rows, tasks, metrics)] if tasks else []
    routing = []
    if predictor.moe is not None:
        gate_cfg = predictor.moe.gate_cfg  # with the --selector/--tau overrides
        names = list(gate_cfg.tasks)
        routing = [
            {"model": args.name, **r} for r in routing_rows(records, tasks, names, gate_cfg.tau, gate_cfg.selector)
        ]
    out.mkdir(parents=True, exist_ok=True)
    for suffix, table in (("targets", rows), ("summary", summary), ("table1", table1), ("routing", routing)):
        _write_csv(out / f"{args.name}_{suffix}.csv", table)
    return {"summary": summary, "table1": table1, "routing": routing}


def main(argv=None) -> None:
    args = parse_args(argv)
    result = evaluate(args)
    last = f"dice_click{args.clicks}"
    for row in result["summary"]:
        box = f", box {row['dice_box']:.3f}" if "dice_box" in row else ""
        print(
            f"{row['model']} on {row['dataset']} class {row['label']} ({row['targets']} targets): click 1 "
            f"{row['dice_click1']:.3f}, click {args.clicks} {row[last]:.3f} (native grid {row['dice_native']:.3f}, "
            f"NSD {row['nsd_native']:.3f}), max over clicks {row['dice_max_over_clicks']:.3f}{box}"
        )
    for row in result["table1"]:
        print(f"{row['classes']} classes ({row['targets']} targets): click {args.clicks} Dice {row[last]:.3f}")
    for row in result["routing"]:
        print(
            f"routing {row['dataset']} class {row['label']} {row['prompt']} prompts: expected {row['expected']}, "
            f"accuracy {row['accuracy']:.2f}, mean s_top {row['mean_s_top']:.2f}"
        )


if __name__ == "__main__":
    run_cli(main)
