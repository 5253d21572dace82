"""The few-shot study table (BrainSegFounder Fig. 5 and Suppl. Table 9) from the runs of its arms.

    python -m brainsegfounder.fewshot runs/fewshot/scratch runs/fewshot/one_stage runs/fewshot/two_stage \
        --out runs/fewshot/table.csv

Each argument is the `--out` folder of one `brainsegfounder.finetune` call (one arm: scratch, one-stage,
two-stage, ...) with the same `--train-fraction` values, `--repeats` and `--seed`, so that repeat r of fraction f
trained on the same cases in every arm (checked). Prints Table 9's layout: one row per repeat, one column per
fraction and arm, and the mean +- std (ddof 1) over the repeats (Fig. 5's points and error bars). Then paired
two-sided Wilcoxon signed-rank tests of each arm against the baseline arm (`--baseline`, default scratch): per
fraction over the repeats, and over all (fraction, repeat) pairs, Holm-adjusted within each family.

The score of a run is the mean over regions of its validation Dice at the last step (`--score final`), or at
its best validation (`--score best`; the best step is chosen on the same cases it is scored on, so this is
optimistic). `--empty-reference skip` (default, BSF / MONAI) leaves a case whose reference region is empty out of
that region's mean, `score` counts it as 1 / 0 (`brainsegfounder.scoring`); runs validated with the other
convention are rescored from their per-case Dice. Writes `--out` (one row per arm, fraction and repeat),
`<stem>_summary.csv` (mean, std per arm and fraction) and `<stem>_tests.csv`.
"""

import json
from pathlib import Path

from brainsegfounder.regions import REGIONS
from brainsegfounder.scoring import add_empty_reference_arg, describe_skipped, region_means
from shared import cli
from shared.cli import run_cli
from shared.errors import InputError
from shared.evaluate import summary_path, write_csv_atomic
from shared.stats import holm, mean_std, wilcoxon_signed_rank


def read_arm(folder) -> dict:
    """The summary.json of one finetune --out folder (refused in one sentence when absent or unfinished)."""
    path = Path(folder) / "summary.json"
    if not path.is_file():
        raise InputError(f"{folder}: no summary.json (not a finished brainsegfounder.finetune --out folder).")
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise InputError(f"{path}: not readable JSON ({err}).") from err
    if not isinstance(summary, dict) or not {"arm", "runs", "data"} <= set(summary):
        raise InputError(f"{path}: not a brainsegfounder.finetune summary.")
    return summary


def run_scores(summary: dict, score: str, where: str, empty_reference: str = "skip") -> dict:
    """{(fraction, repeat): {"score", "regions": {...}, "skipped": {...}, "n_cases", "train_cases"}} of one arm.

    A run validated with the other `empty_reference` convention is rescored from its per-case Dice.
    """
    names = summary.get("regions") or list(REGIONS)
    out = {}
    for run in summary["runs"]:
        result = run.get(score) or {}
        where_run = f"{where}: run fraction {run['fraction']:g} repeat {run['repeat']}"
        if "mean" not in result:
            raise InputError(f"{where_run} has no {score} validation Dice (was it trained with validation "
                             "cases?).")  # fmt: skip
        if result.get("empty_reference") != empty_reference:
            if "per_case" not in result:
                raise InputError(f"{where_run} was validated with empty references "
                                 f"{result.get('empty_reference', 'scored')!r} and holds no per-case Dice to "
                                 f"rescore with --empty-reference {empty_reference}.")  # fmt: skip
            result = region_means(result["per_case"], names, empty_reference)
        out[(float(run["fraction"]), int(run["repeat"]))] = {
            "score": float(result["mean"]), "regions": {k: result[k] for k in names},
            "skipped": result.get("skipped", {}), "n_cases": result.get("n_cases"),
            "train_cases": list(run["train_cases"])}  # fmt: skip
    return out


def collect(folders, score: str, empty_reference: str = "skip") -> tuple[list, dict, list]:
    """(arm names, {arm: run scores}, sorted (fraction, repeat) keys), after checking that the arms pair up."""
    arms, scores, first = [], {}, None
    for folder in folders:
        summary = read_arm(folder)
        name = summary["arm"]
        if name in scores:
            raise InputError(f"{folder}: arm name {name!r} is used twice; rename one with finetune --arm.")
        runs = run_scores(summary, score, str(folder), empty_reference)
        if first is None:
            first = (folder, summary, runs)
        else:
            ref_folder, ref, ref_runs = first
            for key in ("data", "target", "seed"):
                if summary.get(key) != ref.get(key):
                    raise InputError(f"{folder}: {key} {summary.get(key)!r} differs from {ref.get(key)!r} of "
                                     f"{ref_folder}; the arms must share data, target and seed.")  # fmt: skip
            if set(runs) != set(ref_runs):
                raise InputError(f"{folder}: its (fraction, repeat) runs differ from those of {ref_folder}.")
            for key, run in runs.items():
                if run["train_cases"] != ref_runs[key]["train_cases"]:
                    raise InputError(f"{folder}: fraction {key[0]:g} repeat {key[1]} trained on other cases than "
                                     f"{ref_folder}, so the arms are not paired.")  # fmt: skip
        arms.append(name)
        scores[name] = runs
    return arms, scores, sorted(scores[arms[0]])


def paired_tests(arms, scores, keys, baseline: str) -> list[dict]:
    """Wilcoxon signed-rank tests of every arm against `baseline`: per fraction and over all pairs, with Holm."""
    fractions = sorted({f for f, _ in keys})
    tests = []
    for arm in arms:
        if arm == baseline:
            continue
        for fraction in [*fractions, None]:
            pairs = [k for k in keys if fraction is None or k[0] == fraction]
            a = [scores[arm][k]["score"] for k in pairs]
            b = [scores[baseline][k]["score"] for k in pairs]
            result = wilcoxon_signed_rank(a, b)
            tests.append({"arm": arm, "baseline": baseline, "fraction": "all" if fraction is None else f"{fraction:g}",
                          "n": result["n"], "median_difference": result["median_difference"],
                          "statistic": result["statistic"], "p": result["p"]})  # fmt: skip
    for family in ("per fraction", "all"):
        members = [t for t in tests if (t["fraction"] == "all") == (family == "all")]
        for test, adjusted in zip(members, holm([t["p"] for t in members])):
            test["p_holm"] = adjusted
    return tests


def format_table(arms, scores, keys, score: str) -> str:
    """Suppl. Table 9's layout: repeats as rows, (fraction, arm) as columns, then mean +- std."""
    fractions = sorted({f for f, _ in keys})
    repeats = sorted({r for _, r in keys})
    width = max(17, *(len(a) for a in arms)) + 1  # a cell holds '0.1234 +- 0.0123'
    head1 = f"{'':>12} |" + "|".join(f"{f'{f:.0%}' if f * 100 == round(f * 100) else f'{f:g}':^{width * len(arms)}}"
                                     for f in fractions)  # fmt: skip
    head2 = f"{'repeat':>12} |" + "|".join("".join(f"{a:>{width}}" for a in arms) for _ in fractions)
    lines = [f"few-shot validation Dice (mean over regions, {score} step)", head1, head2, "-" * len(head2)]
    for r in repeats:
        cells = ["".join(f"{scores[a][(f, r)]['score']:>{width}.4f}" if (f, r) in scores[a] else f"{'':>{width}}"
                         for a in arms) for f in fractions]  # fmt: skip
        lines.append(f"{r + 1:>12} |" + "|".join(cells))
    cells = []
    for f in fractions:
        row = ""
        for a in arms:
            mean, std = mean_std([scores[a][k]["score"] for k in keys if k[0] == f])
            row += f"{f'{mean:.4f} +- {std:.4f}':>{width}}"
        cells.append(row)
    lines.append(f"{'mean +- std':>12} |" + "|".join(cells))
    return "\n".join(lines)


def format_tests(tests) -> str:
    lines = [f"paired Wilcoxon signed-rank vs {tests[0]['baseline']} (two-sided; Holm within 'per fraction' and "
             "within 'all'):"]  # fmt: skip
    for t in tests:
        lines.append(f"  {t['arm']:>14} fraction {t['fraction']:>5}: n {t['n']:>3}, median difference "
                     f"{t['median_difference']:+.4f}, p {t['p']:.4f}, Holm {t['p_holm']:.4f}")  # fmt: skip
    smallest = min(t["n"] for t in tests)
    if smallest < 6:
        lines.append(f"  note: with {smallest} pairs the exact two-sided test cannot reach p < 0.05 (its smallest "
                     f"p is {2 / 2**smallest:.4f}).")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = cli.make_parser(__doc__, prog="python -m brainsegfounder.fewshot")
    parser.add_argument("arms", nargs="+", help="finetune --out folders, one per arm (two or more)")
    parser.add_argument("--baseline", help="arm the others are tested against (default: scratch, else the first)")
    parser.add_argument("--score", choices=("final", "best"), default="final",
                        help="validation Dice at the last step, or at the best validation (optimistic)")  # fmt: skip
    add_empty_reference_arg(parser)
    parser.add_argument("--out", help="per-run CSV (with <stem>_summary.csv and <stem>_tests.csv beside it)")
    args = parser.parse_args(argv)
    if len(args.arms) < 2:
        raise InputError("give the --out folders of at least two arms to compare.")
    if args.out:
        cli.check_output_file(args.out, "--out", suffixes=(".csv",))
    arms, scores, keys = collect(args.arms, args.score, args.empty_reference)
    baseline = args.baseline or ("scratch" if "scratch" in arms else arms[0])
    if baseline not in arms:
        raise InputError(f"--baseline {baseline!r} is not one of the arms {arms}.")
    tests = paired_tests(arms, scores, keys, baseline)
    print(format_table(arms, scores, keys, args.score))
    if args.empty_reference == "skip":
        counts = {describe_skipped(run["skipped"], run["n_cases"]) for arm in scores.values() for run in arm.values()}
        print("per run, " + "; ".join(sorted(counts)))
    print(format_tests(tests))
    if args.out:
        rows = [{"arm": a, "fraction": f, "repeat": r, "dice": scores[a][(f, r)]["score"],
                 **{f"dice_{k}": v for k, v in scores[a][(f, r)]["regions"].items()}}
                for a in arms for f, r in keys]  # fmt: skip
        summary = []
        for a in arms:
            for f in sorted({f for f, _ in keys}):
                mean, std = mean_std([scores[a][k]["score"] for k in keys if k[0] == f])
                summary.append({"arm": a, "fraction": f, "n": sum(1 for k in keys if k[0] == f), "mean": mean,
                                "std": std})  # fmt: skip
        out = Path(args.out)
        write_csv_atomic(out, rows)
        write_csv_atomic(summary_path(out), summary)
        write_csv_atomic(out.with_name(f"{out.stem}_tests{out.suffix or '.csv'}"), tests)
        print(f"wrote {out}, {summary_path(out)} and {out.stem}_tests{out.suffix or '.csv'}")


if __name__ == "__main__":
    run_cli(main)
