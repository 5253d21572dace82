"""The moe_missing demo: MoE + L_reg + L_sd vs modality dropout on the MS phantom (T1, T2, FLAIR), 7 configurations.

    python -m moe_missing.demo --data data/demo --runs runs/moe_missing

Trains the paper's full model (MoE stem and encoder, L_reg, L_sd) and the modality-dropout baseline
(`--no-moe --no-sd`, Table 1 first row) on folds 1-2 of a 3-fold split of the 12 MS phantoms, then predicts
the 4 held-out cases from each of the 2^3 - 1 = 7 modality subsets and prints DSC and CScore as the paper's
Tables 2/3, a Wilcoxon test between the two models and the stem's gate weights.

Sizes for a 2-core CPU (the paper's recipe at a smaller scale): 64^3 phantoms at 1 mm, a 4-level UNet of
widths 8-16-32-64 (paper: larger, Fig. 1), 32^3 crops, batch 2 (each step runs 2 full + 2 dropped views),
a few hundred steps with Adam at lr 3e-3 instead of 50k steps at 1e-4. Re-running continues from the
checkpoints it finds.
"""

import argparse
import time
from pathlib import Path

import torch

from moe_missing import evaluate, train
from shared.cli import run_cli
from shared.phantom import write_phantom_datasets

SMALL = ["--features", "8", "16", "32", "64", "--patch", "32", "32", "32", "--batch-size", "2", "--fold", "0",
         "--folds", "3", "--lr", "3e-3", "--log-every", "25", "--save-every", "50"]  # fmt: skip
MODELS = {"MoE+SD": [], "MD": ["--no-moe", "--no-sd"]}  # run name -> extra flags


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/demo", help="folder of the phantom datasets (written if absent)")
    parser.add_argument("--runs", default="runs/moe_missing", help="folder for the runs and tables")
    parser.add_argument("--steps", type=int, default=300, help="training steps per model")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (1: tiny convs gain little from more, "
                        "and OpenMP threads spin badly on a shared CPU)")  # fmt: skip
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    (data,) = write_phantom_datasets(args.data, datasets=["ms"], seed=0)
    runs = Path(args.runs)
    checkpoints = []
    for name, flags in MODELS.items():
        print(f"\n== training {name} ({time.time() - start:.0f} s)")
        out = runs / name.replace("+", "_")
        train.main(["--data", str(data), "--out", str(out), "--steps", str(args.steps), "--device", args.device,
                    "--resume", *SMALL, *flags])  # fmt: skip
        checkpoints.append(str(out / "checkpoint.pt"))

    print(f"\n== evaluation of the held-out cases in all 7 configurations ({time.time() - start:.0f} s)")
    split = runs / "MoE_SD" / "split.json"
    evaluate.main(["--data", str(data), "--models", *checkpoints, "--names", *MODELS, "--split", str(split),
                   "--device", args.device, "--out", str(runs / "eval")])  # fmt: skip
    print(f"\nmoe_missing demo finished in {time.time() - start:.0f} s")


if __name__ == "__main__":
    run_cli(main)
