"""The MoME demo (the project's main job): phase 1, phase 2, prediction and evaluation on phantom data.

    python -m mome.demo --data data/demo --runs runs/mome_demo

Seen datasets: tumour (T1, T1ce, T2, FLAIR; labels binarised) and acute stroke (DWI), so each of the five
experts has images of its modality; fold 0 of 4 is held out for testing. Chronic stroke (T1) and MS (T1, T2,
FLAIR) are never trained on and are reported apart, as the unseen data of the paper's Table 2 (their fold-0
cases only, to keep the demo short). The phantom WMH and MS lesions (100-600 voxels at 64^3) are not learned
within this CPU budget (Dice below 0.1 after 600 expert steps), and the chronic infarct is as dark as CSF on T1
(the T1 expert reached Dice 0.14 on it), so they are not among the seen datasets.

Sizes picked for a 2-core CPU (each step of every phase is the paper's recipe at a smaller scale): 32^3
phantoms with 24 cases per dataset (written into DATA/mome_shape32_cases24; the other demos use the 64^3 sets
of 12 cases in DATA), 4-stage UNets with widths 8-16-32-64 (the paper: 6 stages, 32-320), the whole 32^3
volume as the training patch, batch 2, 600 steps per expert and 300 phase-2 steps. Whole-volume patches let
every step see a whole brain, make prediction one tile per image and remove the train/test difference of the
InstanceNorm statistics. 600 expert steps, not fewer: the T1, T1ce and DWI experts' losses only start to fall
after 200-400 steps (with 300 steps they scored Dice 0, 0.27 and 0 on their own modality).
Phase 2 deviates from the paper's 800 x 250 steps in four flags, because with 300 steps a freshly initialised
gate has little time to learn: the phase-1 seg heads are kept (--transfer-heads), the gate starts from equal
weights 1/N (--gate-init uniform) and is trained by its own Adam at lr 1e-3 (--gate-optimizer adam --gate-lr
1e-3) while the pretrained experts keep the paper's SGD at 1e-3. Measured from the same phase-1 experts, fused
image-level Dice on the held-out seen images: 24-case sets, one SGD (gate lr 1e-2) 0.61, Adam gate 0.68 (DWI
0.29 vs 0.61); 12-case sets, 0.44 vs 0.60. Each expert alone on its own modality averages about 0.8, and the
mean of the five experts' logits about 0.35, so what the gate learns is the routing.
Re-running the demo continues from the checkpoints it finds (every phase runs with --resume).
"""

import json
import time
from pathlib import Path

from mome import evaluate, predict, train, train_expert
from mome.data import save_split, split_cases
from shared.cli import make_parser, run_cli
from shared.errors import InputError
from shared.phantom import write_phantom_datasets

SEEN = ("tumour", "stroke_acute")
UNSEEN = ("stroke_chronic", "ms")
MODALITIES = ("T1", "T1ce", "T2", "FLAIR", "DWI")
SMALL = ["--features", "8", "16", "32", "64", "--batch-size", "2",
         "--fold", "0", "--folds", "4", "--modalities", *MODALITIES]  # fmt: skip


def main(argv=None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--data", default="data/demo", help="folder of the phantom datasets (written if absent)")
    parser.add_argument("--runs", default="runs/mome_demo", help="folder for the runs, predictions and tables")
    parser.add_argument("--expert-epochs", type=int, default=24, help="phase-1 epochs per expert")
    parser.add_argument("--epochs", type=int, default=12, help="phase-2 epochs")
    parser.add_argument("--steps-per-epoch", type=int, default=25, help="steps per epoch in both phases")
    parser.add_argument("--shape", type=int, default=32, help="phantom cube side in voxels (a multiple of 8, >= 16); "
                        "the training patch is min(shape, 32)")  # fmt: skip
    parser.add_argument("--cases", type=int, default=24, help="phantom cases per dataset (a quarter held out)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if args.shape < 16 or args.shape % 8:
        raise InputError(f"--shape must be a multiple of 8 and at least 16, got {args.shape}.")
    if args.cases < 4:
        raise InputError(f"--cases must be at least 4 (four folds, one held out), got {args.cases}.")
    start = time.time()
    shape = (args.shape,) * 3
    # the 64^3 sets of 12 cases are those of `bash run.sh data`, shared with the other demos
    data = Path(args.data)
    if (args.shape, args.cases) != (64, 12):
        data = data / f"mome_shape{args.shape}_cases{args.cases}"
    seen = [str(d) for d in write_phantom_datasets(data, datasets=SEEN, cases=args.cases, seed=0, shape=shape)]
    unseen = [str(d) for d in write_phantom_datasets(data, datasets=UNSEEN, cases=args.cases, seed=0, shape=shape)]
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
    train.main(["--data", *seen, "--experts", *experts, "--transfer-heads", "--gate-init", "uniform",
                "--gate-optimizer", "adam", "--gate-lr", "1e-3", "--epochs", str(args.epochs), "--out", str(mome_run),
                *common])  # fmt: skip

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
