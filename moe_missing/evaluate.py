"""Score models on the modality configurations they serve, in the layout of Novosad et al.'s Tables 1-3.

    python -m moe_missing.evaluate --data DatasetXXX_MS --held-out --out runs/eval \
        --models runs/ours_f0 runs/ours_f1 runs/ours_f2 runs/md_f0 runs/md_f1 runs/md_f2 runs/dm111_f0 runs/dm100_f0 \
        --names  ours        ours        ours        MD         MD         MD         DM          DM

--models are run folders of `moe_missing.train` (or checkpoint files). Runs given the same --names entry are
pooled into one model: the folds of a cross-validation, and for dedicated models (`train --dedicated CODE`) the
runs of the different codes. Each run scores only what it serves: a dedicated model its own configuration, any
other model all 2^K - 1. A case is predicted from the configuration's channels only (the others zero, their code
bits 0). A case lacking a channel on disk is scored under the configuration it really had (T2+FLAIR when T1 is
absent), once; a dedicated model skips the cases that lack one of its channels.

Which cases: --held-out scores each run on the held-out fold of its own split.json (pooling the folds scores
every case once); --split FILE scores the --subset cases of one split file for every run (a run's split.json,
or nnU-Net's splits_final.json with --fold); --cases names them; with none of these, every labelled case is
scored, training cases included.

Writes to --out:
- per_case.csv: per (model, configuration, case): DSC, PPV, LTPR, LFPR, lesion F1, HD95, lesion counts, volumes,
  Corr and CScore, and the run that scored it;
- table.csv: per model and configuration (in the paper's row order), n, DSC and CScore mean +- SE, the means of
  PPV, LTPR, LFPR, lesion F1, HD95 and Corr; then pooled rows, their configurations named in the column "over":
  "all" pools every configuration (Table 1), only for a model that serves all of them; "shared" pools the
  configurations every compared model serves, when a dedicated model serves fewer (no row sets means over
  different configuration sets side by side);
- tests.csv: Wilcoxon signed-rank tests of --ours against every other model over the paired (configuration, case)
  rows both scored, for DSC and CScore, with Holm-adjusted p-values;
- gates.csv and gate_stats.csv: phi(m) of every MoE layer for every code, and per layer the gate specialisation
  (mean cv(phi(m)) over the codes), the balance cv(E_m phi(m)) and the argmax expert per code.
Per-case rows of all runs of a model are pooled before Corr, CScore, the standard errors and the tests.

Reading the CScore (Carass et al. 2017; the caveats are also printed under the table):
- Corr is ONE Pearson correlation per (model, configuration), of the predicted vs reference lesion volumes over
  all its cases (folds pooled), and every case's CScore carries that same value. So the CScore's standard error
  ignores Corr's own uncertainty, and with few cases Corr (in [-1, 1], weight 1/4) alone can move a mean CScore
  by up to +-25 points (+-12.5 with --corr-weight 8); a CScore can be negative.
- An all-background prediction scores exactly 25 (DSC 0, PPV 0, LTPR 0, but LFPR 0 by convention and 1 - LFPR
  weighs 1/4; Corr 0 for constant volumes), so a collapsed model can outrank a real one whose false positives and
  volume errors push it below 25; the note "predicted no lesion" names such a model. Compare DSC beside it.
- The Holm correction of tests.csv runs over every test of --ours against every other model and both metrics,
  a larger family than the paper's single comparison per table; the raw p is printed beside p_holm.
"""

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moe_missing.data import case_codes, read_case
from moe_missing.predict import predict_image
from moe_missing.runs import HINT, KIND, RUN_KEYS, load_model
from moe_missing.tables import (
    add_cscore,
    code_string,
    config_name,
    config_order,
    gate_specialisation,
    gate_table,
    paired_tests,
    paper_table,
    summary_table,
)
from shared.checkpoint import load_run_checkpoint
from shared.cli import check_output_dir, make_parser, non_negative_float, overlap_fraction, positive_int, run_cli
from shared.dataset import list_cases
from shared.errors import InputError
from shared.evaluate import format_table, write_csv_atomic
from shared.harness import pick_device
from shared.inputs import add_subset_args, selected_cases
from shared.metrics import case_metrics
from shared.nifti import write_nifti
from shared.splits import read_split

CASE_COLUMNS = ("dice", "ppv", "ltpr", "lfpr", "lesion_f1", "hd95", "n_gt_lesions", "n_pred_lesions", "lesion_tp",
                "lesion_fp", "lesion_fn")  # fmt: skip


@dataclass
class Run:
    """One trained model to score: its checkpoint, the name it is pooled under, what it serves."""

    name: str
    checkpoint: Path
    folder: Path  # where its split.json lies
    modalities: tuple
    dedicated: str | None  # the code a dedicated model serves ("101"), None for a model of every configuration
    patch: tuple


def resolve_run(entry: str, name: str, which: str) -> Run:
    """The checkpoint of a --models entry (run folder or file) and what it records, read once to plan the work."""
    path = Path(entry)
    if path.is_dir():
        path = path / ("best.pt" if which == "best" else "checkpoint.pt")
    ckpt = load_run_checkpoint(path, kind=KIND, keys=RUN_KEYS, hint=HINT)
    if ckpt["args"].get("fixed_code"):
        raise InputError(f"--models {entry} was trained with the removed --fixed-code (MoE layers on one code); "
                         "retrain it with --dedicated CODE.")  # fmt: skip
    return Run(name=name, checkpoint=path, folder=path.parent, modalities=tuple(ckpt["config"]["modalities"]),
               dedicated=ckpt.get("dedicated"), patch=tuple(ckpt["args"]["patch"]))  # fmt: skip


def held_out_cases(run: Run, dataset: str) -> list[str]:
    """The held-out fold of `dataset` in the run's own split.json (written by `moe_missing.train`)."""
    parts = read_split(run.folder / "split.json", flag=f"--held-out: {run.name}'s")
    if dataset not in parts:
        raise InputError(f"--held-out: {run.folder / 'split.json'} holds no split of {dataset}.")
    if not parts[dataset].get("val"):
        raise InputError(f"--held-out: {run.folder} holds out no case of {dataset} (trained with --fold -1?).")
    return parts[dataset]["val"]


def plan_jobs(runs, datasets, *, case_ids=None, held_out=False) -> list[tuple]:
    """Every (run, dataset, case, code) to predict, checked before any prediction.

    Args:
        runs: the `Run`s to score.
        datasets: dataset folders.
        case_ids: {dataset name: ids or None (every labelled case)}; None scores every labelled case.
        held_out: score each run on its own held-out fold instead (`held_out_cases`).

    The code is the configuration the case really has under the run's served code (missing files removed,
    `data.case_codes`); one case under one configuration is refused twice across the runs of one name
    (pooled runs must score different cases, e.g. the held-out folds of one cross-validation).
    """
    jobs, owner = [], {}
    for run in runs:
        for data in datasets:
            name = Path(data).name
            cases = [c for c in list_cases(data) if c.label is not None]
            wanted = held_out_cases(run, name) if held_out else (case_ids or {}).get(name)
            if wanted is not None:
                cases = [c for c in cases if c.case_id in set(wanted)]
            for case in cases:
                unknown = [m for m in run.modalities if m not in case.images]
                if unknown:
                    raise InputError(f"--data {data} has no channel {unknown} of the model {run.checkpoint}.")
                available = tuple(int(case.images[m] is not None) for m in run.modalities)
                for code in case_codes(available, run.dedicated):
                    key = (run.name, name, case.case_id, code)
                    if key in owner:
                        raise InputError(
                            f"--models: {run.name} would score case {case.case_id} under "
                            f"{config_name(code, run.modalities)} twice ({owner[key]} and {run.checkpoint}); runs "
                            "pooled under one name must score different cases (use --held-out for CV folds)."
                        )
                    owner[key] = run.checkpoint
                    jobs.append((run, data, case, code))
    return jobs


def score_jobs(jobs, *, device, overlap=0.5, connectivity=26, min_lesion_volume=0.0, pred_dir=None) -> list[dict]:
    """Predict and score every job; one model and one case in memory at a time. Returns per-case rows."""
    rows, model, loaded, image_of = [], None, None, None
    for run, data, case, code in tqdm(jobs, desc="evaluate", disable=None):
        if loaded != run.checkpoint:
            model, _ = load_model(run.checkpoint, device)
            loaded, image_of = run.checkpoint, None
        if image_of != (data, case.case_id):
            image, label, ref, _ = read_case(case, list(run.modalities))
            image_of = (data, case.case_id)
        used = np.asarray(code, dtype=np.float32)
        pred = predict_image(model, image * used[:, None, None, None], used, ref.spacing, patch_size=run.patch,
                             overlap=overlap, device=device)  # fmt: skip
        config = config_name(code, run.modalities)
        if pred_dir is not None:
            write_nifti(Path(pred_dir) / run.name / config / f"{case.case_id}.nii.gz", pred, like=ref, dtype=np.uint8)
        m = case_metrics(pred > 0, label > 0, spacing=ref.spacing, connectivity=connectivity,
                         min_lesion_volume_mm3=min_lesion_volume)  # fmt: skip
        rows.append({"model": run.name, "config": config, "case": case.case_id, "dataset": Path(data).name,
                     "code": code_string(code), **{k: m[k] for k in CASE_COLUMNS},
                     "volume_pred": m["volume_pred_mm3"], "volume_gt": m["volume_gt_mm3"],
                     "run": str(run.checkpoint)})  # fmt: skip
    return rows


def column_order(runs, ours: str) -> list[str]:
    """The column order of the paper's Tables 2-3 (MD | Ours | DM): the other baselines (as given) | ours |
    dedicated models."""
    names = list(dict.fromkeys(r.name for r in runs))
    dedicated = [n for n in names if all(r.dedicated for r in runs if r.name == n)]
    rest = [n for n in names if n not in dedicated and n != ours]
    return rest + [ours] + [n for n in dedicated if n != ours]


def check_runs(runs) -> None:
    """Runs compared in one table take the same channels in the same order; one name pools one kind of run."""
    for run in runs:
        if run.modalities != runs[0].modalities:
            raise InputError(
                f"--models: {run.checkpoint} takes {list(run.modalities)}, {runs[0].checkpoint} "
                f"{list(runs[0].modalities)}; every model must take the same channels in the same order."
            )
    for name in dict.fromkeys(r.name for r in runs):
        if len({bool(r.dedicated) for r in runs if r.name == name}) > 1:
            raise InputError(f"--names {name} pools dedicated and multi-configuration runs; give them two names.")


def score_runs(runs, datasets, *, case_ids=None, held_out=False, device, overlap=0.5, connectivity=26,
               min_lesion_volume=0.0, corr_weight=1 / 4, pred_dir=None) -> list[dict]:  # fmt: skip
    """Plan (refusing bad selections before any work), predict and score: per-case rows with Corr and CScore."""
    check_runs(runs)
    jobs = plan_jobs(runs, datasets, case_ids=case_ids, held_out=held_out)
    if case_ids and not held_out:
        wanted = {c for ids in case_ids.values() if ids for c in ids}
        unknown = wanted - {case.case_id for _, _, case, _ in jobs}
        if unknown:
            shown = " ".join(sorted(unknown)[:10])
            raise InputError(f"case id(s) {shown} of the selection are not labelled cases of --data that these models "
                             "can score.")  # fmt: skip
    if not jobs:
        raise InputError(f"--data {' '.join(map(str, datasets))}: no labelled case to score with these models.")
    rows = score_jobs(jobs, device=device, overlap=overlap, connectivity=connectivity,
                      min_lesion_volume=min_lesion_volume, pred_dir=pred_dir)  # fmt: skip
    return add_cscore(rows, corr_weight=corr_weight)


def evaluate_models(data, model_paths, names, case_ids=None, *, patch=None, overlap: float = 0.5, device="cpu",
                    connectivity: int = 26, min_lesion_volume: float = 0.0, corr_weight: float = 1 / 4,
                    held_out: bool = False, which: str = "last", pred_dir=None) -> list[dict]:  # fmt: skip
    """Per (model, configuration, case) rows with Corr and CScore, runs of one name pooled (the library entry).

    Args:
        data: a dataset folder or a list of them.
        model_paths: run folders or checkpoint files; names: one per path (repeated names pool runs).
        case_ids: the ids to score, in every dataset (None: every labelled case); not with `held_out`.
        patch: sliding-window tile (default: each run's training crop).
    """
    datasets = [data] if isinstance(data, str | Path) else list(data)
    runs = [resolve_run(str(path), name, which) for path, name in zip(model_paths, names)]
    if patch is not None:
        runs = [dataclasses.replace(run, patch=tuple(patch)) for run in runs]
    selection = None if case_ids is None else {Path(d).name: list(case_ids) for d in datasets}
    return score_runs(runs, datasets, case_ids=selection, held_out=held_out, device=torch.device(device),
                      overlap=overlap, connectivity=connectivity, min_lesion_volume=min_lesion_volume,
                      corr_weight=corr_weight, pred_dir=pred_dir)  # fmt: skip


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--data", nargs="+", required=True, help="nnU-Net dataset folder(s) with labelsTr")
    parser.add_argument("--models", nargs="+", required=True, help="run folders (or checkpoints) of moe_missing.train")
    parser.add_argument("--names", nargs="+", help="a name per --models entry; repeated names pool runs "
                        "(default: the run folder names)")  # fmt: skip
    parser.add_argument("--ours", help="the model tested against every other one (default: the first name)")
    parser.add_argument("--checkpoint", choices=("last", "best"), default="last", help="which checkpoint of a run "
                        "folder: last (checkpoint.pt) or best (best.pt, chosen on the held-out fold, so optimistic "
                        "when scored on that fold)")  # fmt: skip
    parser.add_argument("--held-out", action="store_true", help="score each run on the held-out fold of its own "
                        "split.json (not with --cases or --split)")  # fmt: skip
    add_subset_args(parser)
    parser.add_argument("--patch", type=positive_int, nargs=3, help="sliding-window tile (default: each model's crop)")
    parser.add_argument("--overlap", type=overlap_fraction, default=0.5, help="sliding-window overlap")
    parser.add_argument("--connectivity", type=int, choices=(6, 18, 26), default=26, help="lesion connectivity")
    parser.add_argument("--min-lesion-volume", type=non_negative_float, default=0.0, help="lesions of at most this "
                        "many mm^3 are left out of LTPR, LFPR, lesion F1 and the lesion counts (MSSEG: 3; 0 counts "
                        "every lesion)")  # fmt: skip
    parser.add_argument("--corr-weight", choices=("4", "8"), default="4", help="CScore weight of Corr: 1/4 "
                        "(Carass et al., weights sum to 1) or 1/8 (as printed in the paper)")  # fmt: skip
    parser.add_argument("--save-predictions", action="store_true", help="also write OUT/pred/NAME/CONFIG/*.nii.gz")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--out", required=True, help="folder for the CSV tables")
    args = parser.parse_args(argv)
    args.names = args.names or [Path(p).name if Path(p).is_dir() else Path(p).parent.name for p in args.models]
    if len(args.names) != len(args.models):
        raise InputError(f"--names gives {len(args.names)} names for {len(args.models)} --models entries.")
    args.ours = args.ours or args.names[0]
    if args.ours not in args.names:
        raise InputError(f"--ours {args.ours} is not one of --names {sorted(set(args.names))}.")
    if args.held_out and (args.cases or args.split):
        raise InputError("--held-out scores each run's own held-out fold; give it without --cases and --split.")
    check_output_dir(args.out, "--out")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    runs = [resolve_run(entry, name, args.checkpoint) for entry, name in zip(args.models, args.names)]
    if args.patch:
        runs = [dataclasses.replace(run, patch=tuple(args.patch)) for run in runs]
    selection = None
    if not args.held_out:
        selection = {}
        for data in args.data:
            name = Path(data).name
            selection[name] = selected_cases(args.cases, args.split, fold=args.fold, subset=args.subset, dataset=name)
        if args.cases is None and args.split is None:
            print("no --held-out, --split or --cases: every labelled case is scored, training cases included")
    out = Path(args.out)
    rows = score_runs(runs, args.data, case_ids=selection, held_out=args.held_out, device=pick_device(args.device),
                      overlap=args.overlap, connectivity=args.connectivity, min_lesion_volume=args.min_lesion_volume,
                      corr_weight=1 / int(args.corr_weight),
                      pred_dir=out / "pred" if args.save_predictions else None)  # fmt: skip
    report(rows, runs, args, runs[0].modalities, out)


def report(rows, runs, args, modalities, out: Path) -> None:
    """Write the CSV tables and print the paper's layout, the tests and the gate statistics."""
    configs = [c for c in config_order(modalities) if any(r["config"] == c for r in rows)]
    models = column_order(runs, args.ours)
    table = summary_table(rows, configs)
    tests = paired_tests(rows, args.ours, [m for m in models if m != args.ours])
    gates, gate_stats = [], []
    for run in runs:
        model, _ = load_model(run.checkpoint, torch.device("cpu"))
        layer_gates = gate_table(model, list(modalities))
        gates += [{"model": run.name, "run": str(run.checkpoint), **g} for g in layer_gates]
        gate_stats += [{"model": run.name, "run": str(run.checkpoint), **g} for g in gate_specialisation(layer_gates)]

    out.mkdir(parents=True, exist_ok=True)
    write_csv_atomic(out / "per_case.csv", rows)
    write_csv_atomic(out / "table.csv", table)
    if tests:
        write_csv_atomic(out / "tests.csv", tests)
    if gates:
        write_csv_atomic(out / "gates.csv", gates)
        write_csv_atomic(out / "gate_stats.csv", gate_stats)
    n_cases = len({(r["dataset"], r["case"]) for r in rows})
    print(f"\nDSC and CScore (x100, mean +- SE over cases; {n_cases} cases, runs of one name pooled; "
          f"CScore with Corr/{args.corr_weight}) per configuration")  # fmt: skip
    print(paper_table(table, models, configs))
    points = 100 / int(args.corr_weight)
    print(f"CScore: Corr is one volume correlation per (model, configuration) over its cases, given to each "
          f"case,\nso the SE ignores its uncertainty, and with few cases Corr alone moves CScore by up to "
          f"+-{points:g} points;\nan all-background prediction scores 25 (LFPR 0 and PPV 0 by convention) and "
          "can outrank a real model")  # fmt: skip
    for name in models:
        mine = [r for r in rows if r["model"] == name]
        if all(r["n_pred_lesions"] == 0 for r in mine):  # a collapsed run, worth a word beside its numbers
            print(f"note: {name} predicted no lesion in any of its {len(mine)} (configuration, case) pairs")
    if tests:
        print(f"\nWilcoxon signed-rank tests of {args.ours} vs each model over the paired (configuration, case) "
              "rows;\np is the raw p-value, p_holm Holm-adjusted over all rows below (a larger family than the "
              "paper's one comparison per table)")  # fmt: skip
        print(format_table(tests, "{:.4g}"))
    if gate_stats:
        print("\ngate specialisation per MoE layer: mean cv(phi(m)) over the codes (0 uniform .. max one-hot), "
              "balance cv(E_m phi(m)), argmax expert per code")  # fmt: skip
        print(format_table([{k: v for k, v in g.items() if k != "run"} for g in gate_stats], "{:.3f}"))
    print(f"\ntables written to {out}")


if __name__ == "__main__":
    run_cli(main)
