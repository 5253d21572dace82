"""BrainSegFounder demo on phantom data with a small Swin, on CPU in minutes.

    python -m brainsegfounder.demo --data data/demo --runs runs/brainsegfounder

1. Stage 1: SSL pretraining on unlabelled T1 + FLAIR phantoms (the WMH and MS datasets stand in for UKB).
2. Stage 2: SSL on the tumour phantoms (T1, T1ce, T2, FLAIR), encoder from Stage 1, channels adapted by name.
3. Fine-tuning on a fraction of the tumour training split (TC/WT/ET), from Stage 2 and from scratch.
Prints the validation Dice of both. The budgets are tiny: the point is the pipeline, not the numbers.
"""

import argparse
import json
import time
from pathlib import Path

from brainsegfounder import finetune, pretrain
from shared.cli import run_cli
from shared.phantom import write_phantom_datasets

# 12/24/48/96 channels, heads 3/6/12/24 (head width 4); 4^3 windows tile the 64^3/32^3 crops without padding
SMALL = ["--feature-size", "12", "--size", "tiny", "--window-size", "4"]
RUN = ["--device", "cpu", "--log-every", "10"]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/demo", help="folder of the phantom datasets (written if absent)")
    parser.add_argument("--runs", default="runs/brainsegfounder", help="folder for the run folders")
    parser.add_argument("--ssl-steps", type=int, default=20, help="steps of each SSL stage")
    parser.add_argument("--finetune-steps", type=int, default=40, help="fine-tuning steps of each model")
    parser.add_argument("--train-fraction", type=float, default=0.5, help="fraction of the tumour training split")
    args = parser.parse_args(argv)
    t0 = time.time()
    wmh, ms, tumour = (str(p) for p in write_phantom_datasets(args.data, datasets=["wmh", "ms", "tumour"]))
    runs = Path(args.runs)
    stage1, stage2 = runs / "stage1", runs / "stage2"
    ssl = ["--patch", "64", "32", "32", "--batch-size", "1", "--crops", "2", "--steps", str(args.ssl_steps),
           "--warmup", "5", "--lr", "5e-4"]  # fmt: skip
    if not (stage1 / "checkpoint.pt").exists():
        pretrain.main(["--data", wmh, ms, "--channels", "T1", "FLAIR", "--out", str(stage1), *ssl, *SMALL, *RUN])
    if not (stage2 / "checkpoint.pt").exists():
        pretrain.main(["--data", tumour, "--channels", "T1", "T1ce", "T2", "FLAIR", "--init",
                       str(stage1 / "checkpoint.pt"), "--out", str(stage2), *ssl, *SMALL, *RUN])  # fmt: skip
    tune = ["--data", tumour, "--channels", "T1", "T1ce", "T2", "FLAIR", "--target", "brats", "--patch", "64", "32",
            "32", "--batch-size", "2", "--steps", str(args.finetune_steps), "--warmup", "5", "--lr", "1e-3",
            "--train-fraction", str(args.train_fraction), "--repeats", "1"]  # fmt: skip
    results = {}
    for name, init in (("pretrained", ["--init", str(stage2 / "checkpoint.pt")]), ("scratch", [])):
        out = runs / f"finetune_{name}"
        if not (out / "summary.json").exists():
            finetune.main([*tune, *init, "--out", str(out), *SMALL, *RUN])
        results[name] = json.loads((out / "summary.json").read_text())
    print(f"\nBrainSegFounder demo ({time.time() - t0:.0f} s): validation Dice on the tumour phantoms, "
          f"{args.train_fraction:.0%} of the training split, {args.finetune_steps} steps")  # fmt: skip
    print(f"{'model':>12} {'TC':>8} {'WT':>8} {'ET':>8} {'mean':>8}")
    for name, summary in results.items():
        print(f"{name:>12} " + " ".join(f"{summary[k]['mean']:>8.4f}" for k in ("TC", "WT", "ET", "mean")))


if __name__ == "__main__":
    run_cli(main)
