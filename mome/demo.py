"""The MoME demo (the project's main job): phase 1, phase 2, prediction and evaluation on phantom data.

    python -m mome.demo --data data/demo --runs runs/mome_demo

Seen datasets: tumour (T1, T1ce, T2, FLAIR; labels binarised), chronic stroke (T1) and acute stroke (DWI), so
each of the five experts has images of its modality; fold 0 of 4 is held out for testing. The MS dataset (T1,
T2, FLAIR) is never trained on and is reported apart, as the unseen data of the paper's Table 2. The phantom
WMH and MS lesions (100-600 voxels at 64^3) are not learned within this CPU budget (Dice below 0.1 after 600
expert steps), so they are not among the seen datasets.

Sizes picked for a 2-core CPU (each step of every phase is the paper's recipe at a smaller scale): 64^3
phantoms, 4-stage UNets with widths 8-16-32-64 (the paper: 6 stages, 32-320), 32^3 training patches, batch 2;
prediction uses the training patch in the sliding window (InstanceNorm statistics depend on the extent).
Re-running the demo continues from the checkpoints it finds (every phase runs with --resume).
"""

import argparse
import json
import time
from pathlib import Path

from mome import evaluate, predict, train, train_expert
from shared.errors import run_cli
from shared.phantom import write_phantom_datasets

SEEN = ("tumour", "stroke_chronic", "stroke_acute")
UNSEEN = ("ms",)
MODALITIES = ("T1", "T1ce", "T2", "FLAIR", "DWI")
SMALL = ["--features", "8", "16", "32", "64", "--patch", "32", "32", "32", "--batch-size", "2",
         "--fold", "0", "--folds", "4", "--modalities", *MODALITIES]  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/demo", help="folder of the phantom datasets (written if absent)")
    parser.add_argument("--runs", default="runs/mome_demo", help="folder for the runs, predictions and tables")
    parser.add_argument("--expert-epochs", type=int, default=24, help="phase-1 epochs per expert")
    parser.add_argument("--epochs", type=int, default=12, help="phase-2 epochs")
    parser.add_argument("--steps-per-epoch", type=int, default=25, help="steps per epoch in both phases")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    start = time.time()
    seen = [str(d) for d in write_phantom_datasets(args.data, datasets=SEEN, seed=0)]
    unseen = [str(d) for d in write_phantom_datasets(args.data, datasets=UNSEEN, seed=0)]
    runs = Path(args.runs)
    common = [*SMALL, "--steps-per-epoch", str(args.steps_per_epoch), "--device", args.device, "--resume"]

    experts = []
    for modality in MODALITIES:
        print(f"\n== phase 1: {modality} expert ({time.time() - start:.0f} s)")
        out = runs / f"expert_{modality}"
        train_expert.main(["--modality", modality, "--data", *seen, "--epochs", str(args.expert_epochs),
                           "--out", str(out), *common])  # fmt: skip
        experts.append(str(out / "checkpoint.pt"))

    print(f"\n== phase 2: MoME, experts + gate with the curriculum loss ({time.time() - start:.0f} s)")
    mome_run = runs / "mome"
    # --transfer-heads: with a schedule this short, keep the phase-1 seg heads (the official code re-initialises them)
    train.main(["--data", *seen, "--experts", *experts, "--transfer-heads", "--epochs", str(args.epochs),
                "--out", str(mome_run), *common])  # fmt: skip

    print(f"\n== prediction of held-out cases ({time.time() - start:.0f} s)")
    model, split = str(mome_run / "checkpoint.pt"), mome_run / "split.json"
    pred = runs / "predictions"
    held_out = json.loads(split.read_text())
    for root in seen + unseen:
        name = Path(root).name
        cases = held_out[name]["val"] if name in held_out else None
        only = ["--cases", *cases] if cases else []
        predict.main(["--model", model, "--input", f"{root}/imagesTr", "--output", str(pred / name),
                      "--device", args.device, *only])  # fmt: skip

    print(f"\n== evaluation ({time.time() - start:.0f} s)")
    unseen_names = [Path(u).name for u in unseen]
    evaluate.main(["--data", *seen, *unseen, "--pred", str(pred), "--split", str(split),
                   "--unseen", *unseen_names, "--model", model, "--out", str(runs / "eval")])  # fmt: skip
    print(f"\nMoME demo finished in {time.time() - start:.0f} s")


if __name__ == "__main__":
    run_cli(main)
