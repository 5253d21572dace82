"""Evaluate models over every modality configuration, as Tables 1-3 of Novosad et al., and their gates.

    python -m moe_missing.evaluate --data DatasetXXX_MS --models runs/ours/checkpoint.pt runs/md/checkpoint.pt \
        --names ours MD --split runs/ours/split.json --out runs/eval

For each model, each of the 2^K - 1 configurations m and each held-out case, the case is predicted from the
channels of m only (the others zero, code bits 0) and scored against its label. Writes to --out:
- per_case.csv: DSC, PPV, LTPR, LFPR, lesion volumes and CScore of every (model, configuration, case);
- table.csv: per model and configuration, mean +- standard error over cases of DSC and CScore, with mean PPV,
  LTPR, LFPR and the volume correlation Corr (Tables 2, 3); the row "all" pools every configuration (Table 1);
- wilcoxon.csv: two-sided Wilcoxon signed-rank test between the first two models, paired over all
  (configuration, case) pairs, for DSC and CScore (paper 3.3);
- gates_<name>.csv: phi(m) of every MoE layer for every code (the supplementary expert-weight figure).
CScore = DSC/8 + PPV/8 + LTPR/4 + (1 - LFPR)/4 + Corr/4 (DESIGN.md), Corr computed per configuration
across the cases.
"""

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from scipy import stats
from tqdm import tqdm

from moe_missing.data import read_case
from moe_missing.losses import all_codes
from moe_missing.model import MoEConv3d
from moe_missing.predict import collect_cases, load_model, predict_image
from shared.cli import run_cli
from shared.errors import InputError
from shared.evaluate import format_table, write_csv_atomic
from shared.harness import pick_device
from shared.metrics import case_metrics, cscore, volume_correlation
from shared.nifti import write_nifti

METRICS = ("dice", "ppv", "ltpr", "lfpr")


def config_name(code, modalities) -> str:
    """ "T1+FLAIR" for the code 101 of (T1, T2, FLAIR)."""
    return "+".join(m for m, c in zip(modalities, code) if c)


def add_cscore(rows: list[dict]) -> list[dict]:
    """Set "corr" (volume correlation across the cases of the same model and configuration) and "cscore"."""
    groups = defaultdict(list)
    for row in rows:
        groups[(row["model"], row["config"])].append(row)
    for group in groups.values():
        corr = volume_correlation([r["volume_pred"] for r in group], [r["volume_gt"] for r in group])
        for row in group:
            row["corr"] = corr
            row["cscore"] = float(cscore(row["dice"], row["ppv"], row["ltpr"], row["lfpr"], corr))
    return rows


def mean_se(values) -> tuple[float, float]:
    """Mean and standard error (sample std / sqrt(n), 0 for a single value)."""
    values = np.asarray(values, dtype=np.float64)
    se = values.std(ddof=1) / np.sqrt(values.size) if values.size > 1 else 0.0
    return float(values.mean()), float(se)


def summary_table(rows: list[dict], configs) -> list[dict]:
    """Per model, one row per configuration (in `configs` order) and one pooled row "all"."""
    table = []
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        for config in [*configs, "all"]:
            subset = mine if config == "all" else [r for r in mine if r["config"] == config]
            if not subset:
                continue
            row = {"model": model, "config": config, "n": len(subset)}
            for key in ("dice", "cscore"):
                row[key], row[f"{key}_se"] = mean_se([r[key] for r in subset])
            row |= {key: float(np.mean([r[key] for r in subset])) for key in ("ppv", "ltpr", "lfpr", "corr")}
            table.append(row)
    return table


def wilcoxon_rows(rows: list[dict], model_a: str, model_b: str) -> list[dict]:
    """Wilcoxon signed-rank tests of model_a vs model_b, paired by (configuration, case), for DSC and CScore."""
    a = {(r["config"], r["case"]): r for r in rows if r["model"] == model_a}
    b = {(r["config"], r["case"]): r for r in rows if r["model"] == model_b}
    keys = sorted(set(a) & set(b))
    out = []
    for metric in ("dice", "cscore"):
        x = np.array([a[k][metric] for k in keys])
        y = np.array([b[k][metric] for k in keys])
        if len(keys) == 0 or np.all(x == y):
            p, statistic = 1.0, 0.0  # identical results: no evidence of a difference
        else:
            res = stats.wilcoxon(x, y)
            p, statistic = float(res.pvalue), float(res.statistic)
        out.append({"metric": metric, "model_a": model_a, "model_b": model_b, "pairs": len(keys),
                    "mean_diff": float(np.mean(x - y)) if keys else 0.0, "statistic": statistic, "p": p})  # fmt: skip
    return out


@torch.no_grad()
def gate_table(model, modalities) -> list[dict]:
    """phi(m) of every MoE layer for every code (noise-free): one row per (layer, code), one column per expert."""
    codes = all_codes(len(modalities))
    table = []
    for name, layer in model.named_modules():
        if not isinstance(layer, MoEConv3d):
            continue
        phi = layer.gate_weights(codes.to(layer.gate.weight.device), noise=False).cpu()
        for code, weights in zip(codes.tolist(), phi.tolist()):
            row = {"layer": name, "config": config_name(code, modalities)}
            row |= {f"expert_{n}": w for n, w in enumerate(weights)}
            table.append(row)
    return table


def paper_table(table: list[dict]) -> str:
    """Tables 2/3 layout: DSC and CScore (x100) as mean +- SE per configuration, one column pair per model."""
    models = list(dict.fromkeys(r["model"] for r in table))
    by_key = {(r["model"], r["config"]): r for r in table}
    configs = list(dict.fromkeys(r["config"] for r in table))
    rows = []
    for config in configs:
        row = {"configuration": config}
        for metric in ("dice", "cscore"):
            for model in models:
                r = by_key.get((model, config))
                label = f"{'DSC' if metric == 'dice' else 'CScore'} {model}"
                row[label] = f"{100 * r[metric]:.2f}+-{100 * r[metric + '_se']:.2f}" if r else "-"
        rows.append(row)
    return format_table(rows)


def evaluate_models(data, model_paths, names, case_ids, *, patch=None, overlap=0.5, device="cpu",
                    connectivity=26, pred_dir=None) -> list[dict]:  # fmt: skip
    """Per (model, configuration, case) metrics rows with CScore (see the module docstring)."""
    device = torch.device(device)
    rows = []
    for path, name in zip(model_paths, names):
        model, ckpt = load_model(path, device)
        modalities = list(model.cfg.modalities)
        cases = collect_cases(data, modalities, cases=case_ids)
        loaded = [(c.case_id, *read_case(c, modalities)) for c in cases if c.label is not None]
        tile = tuple(patch or ckpt["args"]["patch"])
        for code in tqdm(all_codes(len(modalities)).numpy(), desc=f"evaluate {name}", disable=None):
            for case_id, image, label, ref, available in loaded:
                used = code * np.asarray(available, dtype=np.float32)
                if not used.any():
                    continue  # the case has none of this configuration's channels
                config = config_name(code, modalities)
                pred = predict_image(model, image * used[:, None, None, None], used, ref.spacing, patch_size=tile,
                                     overlap=overlap, device=device)  # fmt: skip
                if pred_dir is not None:
                    write_nifti(Path(pred_dir) / name / config / f"{case_id}.nii.gz", pred, like=ref, dtype=np.uint8)
                m = case_metrics(pred > 0, label > 0, spacing=ref.spacing, connectivity=connectivity)
                rows.append({"model": name, "config": config, "case": case_id, **{k: m[k] for k in METRICS},
                             "volume_pred": m["volume_pred_mm3"], "volume_gt": m["volume_gt_mm3"]})  # fmt: skip
    return add_cscore(rows)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="nnU-Net dataset folder with labelsTr")
    parser.add_argument("--models", nargs="+", required=True, help="checkpoints of moe_missing.train")
    parser.add_argument("--names", nargs="+", help="a short name per model (default: run folder names)")
    parser.add_argument("--split", help="split.json of the training run; its --subset cases are scored")
    parser.add_argument("--subset", choices=("val", "train"), default="val", help="which cases of --split")
    parser.add_argument("--patch", type=int, nargs=3, help="sliding-window tile (default: each model's crop)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")
    parser.add_argument("--connectivity", type=int, choices=(6, 18, 26), default=26, help="lesion connectivity")
    parser.add_argument("--save-predictions", action="store_true", help="also write OUT/pred/NAME/CONFIG/*.nii.gz")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", required=True, help="folder for the CSV tables")
    args = parser.parse_args(argv)
    names = args.names or [Path(p).parent.name for p in args.models]
    if len(names) != len(args.models) or len(set(names)) != len(names):
        raise InputError(f"--names {names} must give one distinct name per --models entry ({len(args.models)}).")
    case_ids = None
    if args.split:
        try:
            split = json.loads(Path(args.split).read_text())[Path(args.data).name]
        except (OSError, json.JSONDecodeError, KeyError) as err:
            raise InputError(f"--split {args.split} is not a split.json of {Path(args.data).name} ({err}).") from err
        case_ids = split[args.subset]
        if not case_ids:
            raise InputError(f"--split {args.split} lists no {args.subset} case.")
    out = Path(args.out)
    device = pick_device(args.device)
    rows = evaluate_models(args.data, args.models, names, case_ids, patch=args.patch, overlap=args.overlap,
                           device=device, connectivity=args.connectivity,
                           pred_dir=out / "pred" if args.save_predictions else None)  # fmt: skip
    if not rows:
        raise InputError(f"--data {args.data}: no labelled case to evaluate.")
    out.mkdir(parents=True, exist_ok=True)
    configs = list(dict.fromkeys(r["config"] for r in rows))
    table = summary_table(rows, configs)
    write_csv_atomic(out / "per_case.csv", rows)
    write_csv_atomic(out / "table.csv", table)
    print(f"DSC and CScore (x100, mean +- SE over {len({r['case'] for r in rows})} cases) per configuration")
    print(paper_table(table))
    if len(names) >= 2:
        tests = wilcoxon_rows(rows, names[0], names[1])
        write_csv_atomic(out / "wilcoxon.csv", tests)
        print("\nWilcoxon signed-rank test over all (configuration, case) pairs\n" + format_table(tests, "{:.4g}"))
    for path, name in zip(args.models, names):
        model, _ = load_model(path, device)
        gates = gate_table(model, list(model.cfg.modalities))
        if gates:
            write_csv_atomic(out / f"gates_{name}.csv", gates)
            stem = [g for g in gates if g["layer"] == gates[0]["layer"]]
            print(f"\n{name}: gate weights phi(m) of the first MoE layer ({gates[0]['layer']})\n"
                  + format_table(stem, "{:.3f}"))  # fmt: skip
    print(f"\ntables written to {out}")


if __name__ == "__main__":
    run_cli(main)
