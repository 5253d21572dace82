"""The MoME demo (the project's main job): MoME against its baselines on phantom data, as the paper's tables.

    python -m mome.demo --data data/demo --runs runs/mome

Seen datasets (a quarter of each held out for testing, fold 0 of 4): tumour (T1, T1ce, T2, FLAIR; the whole
tumour is the lesion), white-matter hyperintensities (WMH: T1, FLAIR) and acute stroke (DWI). T1 and FLAIR
occur in two datasets with different lesion types, as in the paper (T1 there is in five datasets), so the T1
and FLAIR experts are modality experts, not task-specific networks; T1ce, T2 and DWI occur in one dataset each.
Three models are compared:
- MoME: five phase-1 experts, then phase 2 (experts + hierarchical gate, curriculum loss, Eq. 1-4);
- the universal nnU-Net (`mome.train_expert --modality all`): one network on every image, the paper's
  baseline foundation model. It gets as many optimiser steps as each MoME expert gets in phases 1 and 2
  together (expert epochs + phase-2 epochs), NOT the same compute: MoME trains five experts (5x the phase-1
  steps) and every phase-2 step runs six UNets; matching MoME's compute would need about 3200 nnU-Net steps
  (5 x 400 expert steps + 200 phase-2 steps of about six expert steps each), five times the demo's 600;
- "experts, oracle modality routing": each image sent to the phase-1 expert of its modality (a modality label
  that MoME and the nnU-Net never see). Where a modality occurs in one dataset only (T1ce, T2, DWI here) this is,
  on the seen data, the paper's task-specific nnU-Net of that task (not on the unseen data: the paper's were
  trained on its unseen datasets, ours never see scanner-B data); for T1 and FLAIR it is the modality expert.
  The paper's task-specific nnU-Nets proper (one per dataset and modality) are not trained by the demo (time);
  train one with `python -m mome.train_expert --modality M --data ONE_DATASET`.
Unseen data follow the paper (Table 2: new datasets of seen lesion types from other sites): the same tumour,
WMH and stroke phantoms from another scanner (`shared.phantom --scanner B`: other patients and contrast,
stronger bias field, twice the noise, thick slices); the headline unseen number is the mean over these unseen
datasets, as the paper's summary (the image level is printed as an extra). One extra row scores lesion types
absent from the demo's training data (MS on T1/T2/FLAIR, chronic stroke on T1); they are seen types in the
paper (MSSEG, ATLAS), and a Dice near zero is expected here.

Sizes picked for a 2-core CPU (each step is the paper's recipe at a smaller scale): 32^3 phantoms, 24 cases
per seen dataset and 4 per unseen one, 4-stage UNets with widths 8-16-32-64 (the paper: 6 stages, 32-320),
the whole volume as the training patch, batch 2, nnU-Net's augmentation, 400 steps per expert, 200 phase-2
steps and 600 nnU-Net steps (20, 10 and 30 epochs of 20 steps; the paper: 800 epochs of 250 steps), so that
`bash run.sh` fits into about 12.5 minutes on 2 cores. Whole-volume patches make prediction one tile per
image, run without the 8 mirrorings (--no-mirror) for time. The T1ce expert underfits at this budget (its loss
only starts to fall after about 300 steps).
Phase 2 deviates from the paper in four flags (not in the paper or the official code), because with 200 steps
a freshly initialised gate has little time to learn: the phase-1 seg heads are kept (--transfer-heads), the
gate starts from equal weights 1/N (--gate-init uniform) and is trained by its own Adam at lr 1e-3
(--gate-optimizer adam --gate-lr 1e-3) while the experts keep the paper's SGD at 1e-3.

Every number the demo prints comes from one run with one seed and a few test images per task: differences of a
few Dice points between models are within the run-to-run spread, and the ranking may differ per task and per
averaging level. Not run by the demo: the Table 3 ablations (flags --random-experts, --no-curriculum, --gate
basic of mome.train), the usage comparison with and without curriculum (Suppl. Fig. I), Fig. 2a and the t-SNE,
and the other baselines (SAM-Med3D, Multi-Talent, Hermes).
Earlier configurations (tumour + stroke only, no WMH; one run each, seen image-level Dice MoME / nnU-Net /
oracle experts): 480/240/720 steps: 0.50 / 0.46 / 0.69 (840 s); 600/300/900 steps: 0.53 / 0.49 / 0.78 (21
minutes); the same with the paper's tumour-core targets for T1ce (`--label-rule T1ce=necrosis,enhancing`): 0.60 /
0.57 / 0.81, but MoME and the nnU-Net scored 0.00 on T1 (edema is lesion on T1 and background on T1ce, and on
these phantoms only the enhancing rim tells the two apart), so the demo scores the whole tumour on every
modality.
Re-running the demo continues from the checkpoints it finds (every run is called with --resume); a --runs
folder of another configuration (e.g. of the earlier tumour + stroke demo) is refused: remove it first.
"""

import json
import os
import time
from pathlib import Path

from mome import evaluate, predict, train, train_expert
from shared.cli import make_parser, non_negative_int, positive_int, run_cli
from shared.errors import InputError
from shared.phantom import write_phantom_datasets

SEEN = ("tumour", "wmh", "stroke_acute")  # T1 and FLAIR in two datasets (tumour, WMH)
NEW_LESION = ("ms", "stroke_chronic")
MODALITIES = ("T1", "T1ce", "T2", "FLAIR", "DWI")
SMALL = ["--features", "8", "16", "32", "64", "--batch-size", "2", "--fold", "0", "--folds", "4",
         "--modalities", *MODALITIES]  # fmt: skip
NAMES = ["MoME", "nnU-Net (universal)", "experts, oracle modality routing"]
NOTES = """Notes on these numbers (see mome/demo.py):
- one run, one seed, a few test images per task: differences of a few Dice points are within the run-to-run
  spread; read the image, task and dataset levels and the per-task table before ranking two models;
- the universal nnU-Net gets {nnunet} steps, as many as each MoME expert in phases 1 and 2 ({expert} + {phase2}),
  not MoME's compute (5 x {expert} expert steps + {phase2} phase-2 steps of six UNets each);
- phase 2 uses four flags that are not the paper's (--transfer-heads, --gate-init uniform, --gate-optimizer
  adam, --gate-lr 1e-3) and {phase2} steps instead of 800 x 250;
- "experts, oracle modality routing" sends each image to its modality's expert using the modality label; for
  T1ce, T2 and DWI (one dataset each) that expert is the paper's task-specific nnU-Net on the seen data (not on
  the unseen: the paper's were trained on them);
- unseen headline = mean over the unseen datasets (the paper's summary level); the new-lesion row holds lesion
  types absent from the demo's training data (seen types in the paper: MSSEG, ATLAS);
- the lesion-usage table is signed (> 0 pushes towards lesion, < 0 towards background); the paper's comparison
  with and without curriculum and the Table 3 ablations are not run here."""


class Stages:
    """Prints each stage's header and keeps its wall-clock and CPU seconds (this process and finished children)."""

    def __init__(self):
        self.start, self.rows, self.current = time.time(), [], None

    @staticmethod
    def _cpu() -> float:
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system

    def __call__(self, name: str) -> None:
        self._close()
        print(f"\n== {name} ({time.time() - self.start:.0f} s)")
        self.current = (name, time.time(), self._cpu())

    def _close(self) -> None:
        if self.current is not None:
            name, wall, cpu = self.current
            self.rows.append((name, time.time() - wall, self._cpu() - cpu))
            self.current = None

    def summary(self) -> str:
        self._close()
        lines = [f"{wall:7.0f} s wall {cpu:7.0f} s CPU  {name}" for name, wall, cpu in self.rows]
        return "stage times:\n" + "\n".join(lines)


def main(argv=None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--data", default="data/demo", help="folder of the phantom datasets (written if absent)")
    parser.add_argument("--runs", default="runs/mome", help="folder for the runs, predictions and tables")
    parser.add_argument("--expert-epochs", type=positive_int, default=20, help="phase-1 epochs per expert")
    parser.add_argument("--epochs", type=positive_int, default=10, help="phase-2 epochs")
    parser.add_argument("--nnunet-epochs", type=positive_int, default=None, help="epochs of the universal nnU-Net "
                        "(default: --expert-epochs + --epochs, the steps each MoME expert gets)")  # fmt: skip
    parser.add_argument("--steps-per-epoch", type=positive_int, default=20, help="steps per epoch of every run")
    parser.add_argument("--shape", type=int, default=32, help="phantom cube side in voxels (a multiple of 8, >= 16); "
                        "the training patch is min(shape, 32)")  # fmt: skip
    parser.add_argument("--cases", type=positive_int, default=24, help="cases per seen dataset (a quarter held out)")
    parser.add_argument("--unseen-cases", type=positive_int, default=4, help="cases per unseen dataset")
    parser.add_argument("--workers", type=non_negative_int, default=None, help="loader processes of the training runs")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    if args.nnunet_epochs is None:
        args.nnunet_epochs = args.expert_epochs + args.epochs
    if args.shape < 16 or args.shape % 8:
        raise InputError(f"--shape must be a multiple of 8 and at least 16, got {args.shape}.")
    if args.cases < 4:
        raise InputError(f"--cases must be at least 4 (four folds, one held out), got {args.cases}.")
    stage = Stages()
    stage("phantom data")
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
        stage(f"phase 1: {modality} expert")
        experts[modality] = runs / f"expert_{modality}"
        train_expert.main(["--modality", modality, "--data", *seen, "--epochs", str(args.expert_epochs),
                           "--out", str(experts[modality]), *common])  # fmt: skip

    stage("the universal nnU-Net: one network on every image")
    nnunet = runs / "nnunet"
    train_expert.main(["--modality", "all", "--data", *seen, "--epochs", str(args.nnunet_epochs), "--out",
                       str(nnunet), *common])  # fmt: skip

    stage("phase 2: MoME, experts + gate with the curriculum loss")
    mome = runs / "mome"
    train.main(["--data", *seen, "--experts", *[str(experts[m] / "checkpoint.pt") for m in MODALITIES],
                "--transfer-heads", "--gate-init", "uniform", "--gate-optimizer", "adam", "--gate-lr", "1e-3",
                "--epochs", str(args.epochs), "--out", str(mome), *common])  # fmt: skip

    stage("prediction: held-out seen cases, every unseen case")
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

    stage("evaluation")
    evaluate.main(["--data", *seen, *scanner_b, *new_lesion, "--pred", *[str(pred / f) for f in ("mome", "nnunet",
                   "oracle")], "--names", *NAMES, "--split-file", str(mome / "split.json"), "--unseen",
                   *[Path(d).name for d in scanner_b], "--new-lesion", *[Path(d).name for d in new_lesion],
                   "--model", str(mome / "checkpoint.pt"), "--out", str(runs / "eval")])  # fmt: skip
    steps = args.steps_per_epoch
    print("\n" + NOTES.format(nnunet=args.nnunet_epochs * steps, expert=args.expert_epochs * steps,
                              phase2=args.epochs * steps))  # fmt: skip
    print("\n" + stage.summary())
    print(f"\nMoME demo finished in {time.time() - stage.start:.0f} s")


if __name__ == "__main__":
    run_cli(main)
