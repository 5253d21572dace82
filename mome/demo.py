"""The MoME demo (the project's main job): phase 1, phase 2, prediction and evaluation on phantom data.

    python -m mome.demo --data data/demo --runs runs/mome_demo

Seen datasets: tumour (T1, T1ce, T2, FLAIR; labels binarised) and acute stroke (DWI), so each of the five
experts has images of its modality; fold 0 of 4 is held out for testing. Chronic stroke (T1) and MS (T1, T2,
FLAIR) are never trained on and are reported apart, as the unseen data of the paper's Table 2 (their fold-0
cases only, to keep the demo short). The phantom WMH and MS lesions (100-600 voxels at 64^3) are not learned
within this CPU budget (Dice below 0.1 after 600 expert steps), and the chronic infarct is as dark as CSF on T1
(the T1 expert reached Dice 0.14 on it), so they are not among the seen datasets.

Sizes picked for a 2-core CPU (each step of every phase is the paper's recipe at a smaller scale): 32^3
phantoms (written into DATA/shape32, the other demos use the 64^3 phantoms in DATA), 4-stage UNets with widths
8-16-32-64 (the paper: 6 stages, 32-320), the whole 32^3 volume as the training patch, batch 2, 300 steps per
expert and 300 phase-2 steps. Whole-volume patches let every step see a whole brain, make prediction one tile
per image and remove the train/test difference of the InstanceNorm statistics; on the same budget they gave a
fused image-level Dice of 0.48 against 0.33 with 32^3 patches of 64^3 phantoms (`--shape 64`).
Phase 2 deviates from the paper's 800 x 250 steps in three flags, because with about 300 steps a freshly
initialised gate has no time to learn: the phase-1 seg heads are kept (--transfer-heads), the gate starts from
equal weights 1/N (--gate-init uniform) and learns at nnU-Net's from-scratch lr 1e-2 while the pretrained
experts keep the paper's 1e-3 (--gate-lr 1e-2). Even so the gate learns no modality routing within this
budget (the expert-usage table is the same for every input modality), which caps the fused Dice.
Re-running the demo continues from the checkpoints it finds (every phase runs with --resume).
"""

import argparse
import json
import time
from pathlib import Path

from mome import evaluate, predict, train, train_expert
from mome.data import save_split, split_cases
from shared.errors import InputError, run_cli
from shared.phantom import write_phantom_datasets

SEEN = ("tumour", "stroke_acute")
UNSEEN = ("stroke_chronic", "ms")
MODALITIES = ("T1", "T1ce", "T2", "FLAIR", "DWI")
SMALL = ["--features", "8", "16", "32", "64", "--batch-size", "2",
         "--fold", "0", "--folds", "4", "--modalities", *MODALITIES]  # fmt: skip


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/demo", help="folder of the phantom datasets (written if absent)")
    parser.add_argument("--runs", default="runs/mome_demo", help="folder for the runs, predictions and tables")
    parser.add_argument("--expert-epochs", type=int, default=12, help="phase-1 epochs per expert")
    parser.add_argument("--epochs", type=int, default=12, help="phase-2 epochs")
    parser.add_argument("--steps-per-epoch", type=int, default=25, help="steps per epoch in both phases")
    parser.add_argument("--shape", type=int, default=32, help="phantom cube side in voxels (a multiple of 8, >= 16); "
                        "the training patch is min(shape, 32)")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if args.shape < 16 or args.shape % 8:
        raise InputError(f"--shape must be a multiple of 8 and at least 16, got {args.shape}.")
    start = time.time()
    shape = (args.shape,) * 3
    data = Path(args.data) if args.shape == 64 else Path(args.data) / f"shape{args.shape}"
    seen = [str(d) for d in write_phantom_datasets(data, datasets=SEEN, seed=0, shape=shape)]
    unseen = [str(d) for d in write_phantom_datasets(data, datasets=UNSEEN, seed=0, shape=shape)]
    runs = Path(args.runs)
    patch = [str(min(args.shape, 32))] * 3
    common = [*SMALL, "--patch", *patch, "--steps-per-epoch", str(args.steps_per_epoch), "--device", args.device,
              "--resume"]  # fmt: skip

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
    train.main(["--data", *seen, "--experts", *experts, "--transfer-heads", "--gate-init", "uniform", "--gate-lr",
                "1e-2", "--epochs", str(args.epochs), "--out", str(mome_run), *common])  # fmt: skip

    print(f"\n== prediction of held-out cases ({time.time() - start:.0f} s)")
    model, split = str(mome_run / "checkpoint.pt"), mome_run / "split.json"
    pred = runs / "predictions"
    held_out = json.loads(split.read_text()) | split_cases(unseen, fold=0, folds=4)
    save_split(runs / "held_out.json", held_out)  # the cases predicted and scored below
    for root in seen + unseen:
        name = Path(root).name
        predict.main(["--model", model, "--input", f"{root}/imagesTr", "--output", str(pred / name),
                      "--device", args.device, "--cases", *held_out[name]["val"]])  # fmt: skip

    print(f"\n== evaluation ({time.time() - start:.0f} s)")
    unseen_names = [Path(u).name for u in unseen]
    evaluate.main(["--data", *seen, *unseen, "--pred", str(pred), "--split", str(runs / "held_out.json"),
                   "--unseen", *unseen_names, "--model", model, "--out", str(runs / "eval")])  # fmt: skip
    print(f"\nMoME demo finished in {time.time() - start:.0f} s")


if __name__ == "__main__":
    run_cli(main)
