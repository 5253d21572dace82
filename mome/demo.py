"""The MoME demo (the project's main job): MoME against its baselines on phantom data, as the paper's tables.

    python -m mome.demo --data data/demo --runs runs/mome

Trained on the seen datasets, tumour (T1, T1ce, T2, FLAIR; the whole tumour is the lesion) and acute stroke
(DWI), so each of the five experts has images of its modality; fold 0 of 4 is held out for testing. Three
models are compared:
- MoME: five phase-1 experts, then phase 2 (experts + hierarchical gate, curriculum loss, Eq. 1-4);
- the universal nnU-Net (`mome.train_expert --modality all`): one network on every image, the paper's
  baseline foundation model, trained as long as an expert and MoME's phase 2 together;
- the phase-1 experts with oracle routing: each image sent to the expert of its modality (a modality label
  that MoME and the nnU-Net never see; not in the paper).
Unseen data follow the paper (Table 2: new datasets of seen lesion types from other sites): the same tumour
and stroke phantoms from another scanner (`shared.phantom --scanner B`: other patients and contrast,
stronger bias field, twice the noise, thick slices). Lesion types never trained on (MS on T1/T2/FLAIR,
chronic stroke on T1) are one extra row, not in the paper; near-zero Dice is expected there.

Sizes picked for a 2-core CPU (each step is the paper's recipe at a smaller scale): 32^3 phantoms, 24 cases
per seen dataset and 4 per unseen one, 4-stage UNets with widths 8-16-32-64 (the paper: 6 stages, 32-320),
the whole volume as the training patch, batch 2, nnU-Net's augmentation, 480 steps per expert, 240 phase-2
steps and 720 nnU-Net steps (24, 12 and 36 epochs of 20 steps), so that `bash run.sh` fits into 15 minutes on
2 cores. Whole-volume patches make prediction one tile per image, run without the 8 mirrorings (--no-mirror)
for time. Not fewer expert steps: the T1ce expert's loss only starts to fall after about 300 steps and it still
underfits at 480 (training loss -0.15; -0.48 after 600).
Phase 2 deviates from the paper's 800 x 250 steps in four flags, because with 240 steps a freshly initialised
gate has little time to learn: the phase-1 seg heads are kept (--transfer-heads), the gate starts from equal
weights 1/N (--gate-init uniform) and is trained by its own Adam at lr 1e-3 (--gate-optimizer adam --gate-lr
1e-3) while the experts keep the paper's SGD at 1e-3.

Measured with these defaults (`bash run.sh`, 840 s with one thread on the 2-core machine shared with other
jobs), image-level Dice of MoME / the universal nnU-Net / the oracle-routed experts: held-out seen images 0.50 /
0.46 / 0.69, unseen scanner-B images 0.34 / 0.31 / 0.54, new lesion types 0.07 / 0.12 / 0.10. MoME beats the
nnU-Net on seen and unseen data, as in the paper, but both fused models stay far below sending each image to
its own expert, mostly on T1 (0.05 and 0.00; the T1 expert alone 0.73).
Measured before these defaults (one run each, seen image-level Dice of MoME / nnU-Net / oracle experts):
600/300/900 steps: 0.53 / 0.49 / 0.78 (21 minutes on the loaded 2-core machine, too slow); the same with the
paper's tumour-core targets for T1ce (`--label-rule T1ce=necrosis,enhancing`): 0.60 / 0.57 / 0.81, but MoME
and the nnU-Net scored 0.00 on T1 (the T1 expert alone 0.76): edema is lesion on T1 and background on T1ce,
and on these phantoms only the enhancing rim tells the two apart, so the demo scores the whole tumour on every
modality. A shared gate map per expert with a softmax over experts (`--gate-maps shared --gate-norm softmax`)
gave 0.49 instead of 0.53 from the same experts.
Re-running the demo continues from the checkpoints it finds (every run is called with --resume).
"""

import json
import time
from pathlib import Path

from mome import evaluate, predict, train, train_expert
from shared.cli import make_parser, non_negative_int, positive_int, run_cli
from shared.errors import InputError
from shared.phantom import write_phantom_datasets

SEEN = ("tumour", "stroke_acute")
NEW_LESION = ("ms", "stroke_chronic")
MODALITIES = ("T1", "T1ce", "T2", "FLAIR", "DWI")
SMALL = ["--features", "8", "16", "32", "64", "--batch-size", "2", "--fold", "0", "--folds", "4",
         "--modalities", *MODALITIES]  # fmt: skip
NAMES = ["MoME", "nnU-Net (universal)", "experts, oracle routing"]


def main(argv=None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--data", default="data/demo", help="folder of the phantom datasets (written if absent)")
    parser.add_argument("--runs", default="runs/mome", help="folder for the runs, predictions and tables")
    parser.add_argument("--expert-epochs", type=positive_int, default=24, help="phase-1 epochs per expert")
    parser.add_argument("--epochs", type=positive_int, default=12, help="phase-2 epochs")
    parser.add_argument("--nnunet-epochs", type=positive_int, default=36, help="epochs of the universal nnU-Net")
    parser.add_argument("--steps-per-epoch", type=positive_int, default=20, help="steps per epoch of every run")
    parser.add_argument("--shape", type=int, default=32, help="phantom cube side in voxels (a multiple of 8, >= 16); "
                        "the training patch is min(shape, 32)")  # fmt: skip
    parser.add_argument("--cases", type=positive_int, default=24, help="cases per seen dataset (a quarter held out)")
    parser.add_argument("--unseen-cases", type=positive_int, default=4, help="cases per unseen dataset")
    parser.add_argument("--workers", type=non_negative_int, default=None, help="loader processes of the training runs")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if args.shape < 16 or args.shape % 8:
        raise InputError(f"--shape must be a multiple of 8 and at least 16, got {args.shape}.")
    if args.cases < 4:
        raise InputError(f"--cases must be at least 4 (four folds, one held out), got {args.cases}.")
    start = time.time()
    shape = (args.shape,) * 3
    data = Path(args.data) / f"mome_shape{args.shape}"
    seen = write_phantom_datasets(data / f"seen_cases{args.cases}", datasets=SEEN, cases=args.cases, shape=shape)
    other = data / f"unseen_cases{args.unseen_cases}"
    scanner_b = write_phantom_datasets(other, datasets=SEEN, cases=args.unseen_cases, shape=shape, scanner="B")
    new_lesion = write_phantom_datasets(other, datasets=NEW_LESION, cases=args.unseen_cases, shape=shape)
    seen, scanner_b, new_lesion = ([str(d) for d in ds] for ds in (seen, scanner_b, new_lesion))
    runs = Path(args.runs)
    patch = [str(min(args.shape, 32))] * 3
    workers = [] if args.workers is None else ["--workers", str(args.workers)]
    common = [*SMALL, "--patch", *patch, "--steps-per-epoch", str(args.steps_per_epoch), "--device", args.device,
              "--cache", str(Path(args.data) / "cache"), *workers, "--resume"]  # fmt: skip

    experts = {}
    for modality in MODALITIES:
        print(f"\n== phase 1: {modality} expert ({time.time() - start:.0f} s)")
        experts[modality] = runs / f"expert_{modality}"
        train_expert.main(["--modality", modality, "--data", *seen, "--epochs", str(args.expert_epochs),
                           "--out", str(experts[modality]), *common])  # fmt: skip

    print(f"\n== the universal nnU-Net: one network on every image ({time.time() - start:.0f} s)")
    nnunet = runs / "nnunet"
    train_expert.main(["--modality", "all", "--data", *seen, "--epochs", str(args.nnunet_epochs), "--out",
                       str(nnunet), *common])  # fmt: skip

    print(f"\n== phase 2: MoME, experts + gate with the curriculum loss ({time.time() - start:.0f} s)")
    mome = runs / "mome"
    train.main(["--data", *seen, "--experts", *[str(experts[m] / "checkpoint.pt") for m in MODALITIES],
                "--transfer-heads", "--gate-init", "uniform", "--gate-optimizer", "adam", "--gate-lr", "1e-3",
                "--epochs", str(args.epochs), "--out", str(mome), *common])  # fmt: skip

    print(f"\n== prediction: held-out seen cases, every unseen case ({time.time() - start:.0f} s)")
    held_out = json.loads((mome / "split.json").read_text())
    pred = runs / "predictions"
    for root in seen + scanner_b + new_lesion:
        name = Path(root).name
        cases = ["--cases", *held_out[name]["val"]] if name in held_out else []
        flags = ["--input", root, "--split", "Tr", *cases, "--device", args.device, "--no-mirror"]
        for run, folder in ((mome, "mome"), (nnunet, "nnunet")):
            predict.main(["--model", str(run / "checkpoint.pt"), "--output", str(pred / folder / name), *flags])
        for modality in evaluate.channel_indices(root):  # oracle routing: each modality to its own expert
            predict.main(["--model", str(experts[modality] / "checkpoint.pt"), "--modality", modality, "--output",
                          str(pred / "oracle" / name), *flags])  # fmt: skip

    print(f"\n== evaluation ({time.time() - start:.0f} s)")
    evaluate.main(["--data", *seen, *scanner_b, *new_lesion, "--pred", *[str(pred / f) for f in ("mome", "nnunet",
                   "oracle")], "--names", *NAMES, "--split-file", str(mome / "split.json"), "--unseen",
                   *[Path(d).name for d in scanner_b], "--new-lesion", *[Path(d).name for d in new_lesion],
                   "--model", str(mome / "checkpoint.pt"), "--out", str(runs / "eval")])  # fmt: skip
    print(f"\nMoME demo finished in {time.time() - start:.0f} s")


if __name__ == "__main__":
    run_cli(main)
