"""BrainSegFounder demo on phantom data with a small Swin, on CPU in minutes: the few-shot study of Fig. 5.

    python -m brainsegfounder.demo --data data/demo --runs runs/brainsegfounder

1. Stage 1: SSL pretraining on T1 + FLAIR phantoms, labels unused (the WMH and MS datasets stand in for UKB;
   they are lesion phantoms, not healthy brains: the lesion-free anatomy phantom has no FLAIR channel).
2. Stage 2: SSL on the training folds of the tumour phantoms (T1, T1ce, T2, FLAIR), encoder from Stage 1,
   channels adapted by name; the validation fold is held out (it scores the fine-tuned models).
3. Fine-tuning on 20 % and 50 % of the 9 tumour training cases (2 and 5 cases), two random subsets each, the
   same in every arm (as the decoder initialisation and the batches): scratch (the SwinUNETR baseline),
   two-stage (from Stage 2) and one-stage (Stage 1 only; `--no-one-stage` leaves it out). Scored on the 3
   held-out cases (BSF's code's Dice: a case whose reference region is empty is left out of that region's mean).
4. The study table (Suppl. Table 9 layout, mean +- std) and paired Wilcoxon tests (`brainsegfounder.fewshot`).

The budgets are tiny, so the pretrained encoders are weak and the arms are expected to be close: the paper's
own gains at 5-40 % of the BraTS training data (about 50-500 cases) are 0.1-0.9 Dice points. The numbers are
what the runs give, whatever they say.
"""

import argparse
import time
from pathlib import Path

from brainsegfounder import fewshot, finetune, pretrain
from shared import cli
from shared.cli import run_cli
from shared.phantom import write_phantom_datasets

# 12/24/48/96 channels, heads 3/6/12/24 (head width 4); 4^3 windows tile the 64^3/32^3 crops without padding
SMALL = ["--feature-size", "12", "--size", "tiny", "--window-size", "4"]
RUN = ["--device", "cpu", "--log-every", "25", "--resume"]  # --resume: a rerun continues the finished parts


def main(argv=None) -> None:
    parser = cli.make_parser(__doc__, prog="python -m brainsegfounder.demo")
    parser.add_argument("--data", default="data/demo", help="folder of the phantom datasets (written if absent)")
    parser.add_argument("--runs", default="runs/brainsegfounder", help="folder for the run folders")
    parser.add_argument("--ssl-steps", type=cli.positive_int, default=100, help="steps of each SSL stage")
    parser.add_argument("--finetune-steps", type=cli.positive_int, default=100, help="fine-tuning steps of each run")
    parser.add_argument(
        "--lr",
        type=cli.positive_float,
        default=4e-3,
        help="fine-tuning learning rate (short schedule; the paper: 1e-4 over 50,000 steps)",
    )
    parser.add_argument("--train-fraction", type=cli.fraction, nargs="+", default=[0.2, 0.5],
                        help="fractions of the tumour training cases")  # fmt: skip
    parser.add_argument("--repeats", type=cli.positive_int, default=2, help="random training subsets per fraction")
    parser.add_argument(
        "--one-stage",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="the Stage-1-only arm (four fine-tuning runs, about 3.5 of the demo's 11 minutes on 2 cores)",
    )
    args = parser.parse_args(argv)
    t0 = time.time()
    wmh, ms, tumour = (str(p) for p in write_phantom_datasets(args.data, datasets=["wmh", "ms", "tumour"]))
    runs = Path(args.runs)
    stage1, stage2 = runs / "stage1", runs / "stage2"
    ssl = ["--patch", "64", "32", "32", "--batch-size", "1", "--crops", "2", "--steps", str(args.ssl_steps),
           "--warmup", str(min(10, args.ssl_steps - 1)), "--lr", "5e-4"]  # fmt: skip
    pretrain.main(["--data", wmh, ms, "--channels", "T1", "FLAIR", "--out", str(stage1), *ssl, *SMALL, *RUN])
    pretrain.main(["--data", tumour, "--channels", "T1", "T1ce", "T2", "FLAIR", "--init",
                   str(stage1 / "checkpoint.pt"), "--out", str(stage2), *ssl, *SMALL, *RUN])  # fmt: skip
    t_ssl = time.time() - t0
    tune = ["--data", tumour, "--channels", "T1", "T1ce", "T2", "FLAIR", "--target", "brats", "--patch", "64", "32",
            "32", "--batch-size", "2", "--steps", str(args.finetune_steps), "--lr", str(args.lr),
            "--warmup", str(min(10, args.finetune_steps - 1)),
            "--train-fraction", *map(str, args.train_fraction), "--repeats", str(args.repeats)]  # fmt: skip
    arms = {"scratch": [], "two-stage": ["--init", str(stage2 / "checkpoint.pt")]}
    if args.one_stage:
        arms["one-stage"] = ["--init", str(stage1 / "checkpoint.pt")]
    for name, init in arms.items():
        finetune.main([*tune, *init, "--arm", name, "--out", str(runs / "fewshot" / name), *SMALL, *RUN])
    print(f"\nBrainSegFounder demo: SSL stages {t_ssl:.0f} s, all {time.time() - t0:.0f} s (validation fold of the "
          f"tumour phantoms, {args.finetune_steps} fine-tuning steps per run)")  # fmt: skip
    fewshot.main([str(runs / "fewshot" / name) for name in arms] + ["--out", str(runs / "fewshot" / "table.csv")])


if __name__ == "__main__":
    run_cli(main)
