"""The SAM-Med3D-MoE forgetting experiment on phantom data (the paper's Table 1 at toy scale).

    python -m sam_med3d_moe.demo --data data/demo --runs runs/sam_med3d_moe

1. general model: a small SAM-Med3D trained from scratch on the anatomical structures (phantom anatomy, T1;
   csf, grey matter, white matter, deep grey matter: the "original tasks");
2. task expert: its mask decoder fine-tuned on a new task, whole lesions of the tumour phantom (T1 and FLAIR),
   encoders frozen;
3. SAM-Med3D-MoE: general + expert + gate, the gate trained on both tasks.
All three are evaluated on held-out cases (fold 0 of 4) with 6 clicks (Table 1's "6 points"; Dice after the
last click, and the max over clicks of the old official validation in the csv files) and with a box.
Scale for a 2-core CPU: 64^3 crops at 1.5 mm, `small_config`; the gate lr is 3e-3 instead of the paper's 1e-6,
which would not move a freshly initialised gate in a few hundred steps. Re-running resumes finished runs.
"""

import argparse
import time
from pathlib import Path

import torch

from sam_med3d_moe import evaluate, finetune_expert, train, train_gate
from shared.cli import run_cli
from shared.phantom import write_phantom_datasets

CLICKS = 6


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default="data/demo", help="folder of the phantom datasets (written if absent)")
    parser.add_argument("--runs", default="runs/sam_med3d_moe", help="folder for the runs and tables")
    parser.add_argument("--general-steps", type=int, default=400, help="steps of the general model")
    parser.add_argument("--expert-steps", type=int, default=150, help="steps of the task expert")
    parser.add_argument("--gate-steps", type=int, default=200, help="steps of the gate")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument(
        "--threads",
        type=int,
        default=0,
        help="CPU threads for torch (0: torch's default); 1 avoids "
        "the large slow-down of multi-threaded small ops on a CPU shared with other jobs",
    )
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.time()
    anatomy, tumour = (str(d) for d in write_phantom_datasets(args.data, datasets=["anatomy", "tumour"], seed=0))
    runs = Path(args.runs)
    common = [
        "--fold",
        "0",
        "--folds",
        "4",
        "--num-clicks",
        "5",
        "--batch-size",
        "2",
        "--device",
        args.device,
        "--resume",
        "--save-every",
        "50",
    ]

    print(f"\n== 1. general model on the anatomy (original tasks) ({time.time() - start:.0f} s)")
    general = runs / "general"
    train.main(
        [
            "--data",
            anatomy,
            "--modalities",
            "T1",
            "--config",
            "small",
            "--steps",
            str(args.general_steps),
            "--lr",
            "4e-4",
            "--weight-decay",
            "0.01",
            "--out",
            str(general),
            *common,
        ]
    )

    print(f"\n== 2. expert fine-tuned on the lesions (new task) ({time.time() - start:.0f} s)")
    expert = runs / "expert_lesion"
    finetune_expert.main(
        [
            "--general",
            str(general / "checkpoint.pt"),
            "--data",
            tumour,
            "--modalities",
            "T1",
            "FLAIR",
            "--union",
            "--steps",
            str(args.expert_steps),
            "--lr",
            "4e-4",
            "--out",
            str(expert),
            *common,
        ]
    )

    print(f"\n== 3. MoE: gate trained on both tasks ({time.time() - start:.0f} s)")
    moe = runs / "moe"
    train_gate.main(
        [
            "--general",
            str(general / "checkpoint.pt"),
            "--experts",
            str(expert / "checkpoint.pt"),
            "--data",
            anatomy,
            tumour,
            "--modalities",
            "T1",
            "FLAIR",
            "--union",
            tumour,
            "--gate-lr",
            "1e-3",
            "--expert-lr",
            "1e-4",
            "--steps",
            str(args.gate_steps),
            "--out",
            str(moe),
            *common,
        ]
    )

    print(f"\n== 4. evaluation on held-out cases ({time.time() - start:.0f} s)")
    table = {}
    for name, ckpt in (("general", general), ("FT-expert", expert), ("MoE", moe)):
        summary = evaluate.evaluate(
            evaluate.parse_args(
                [
                    "--model",
                    str(ckpt / "checkpoint.pt"),
                    "--data",
                    anatomy,
                    tumour,
                    "--split",
                    str(moe / "split.json"),
                    "--modalities",
                    "T1",
                    "FLAIR",
                    "--union",
                    tumour,
                    "--clicks",
                    str(CLICKS),
                    "--out",
                    str(runs / "eval"),
                    "--name",
                    name,
                    "--device",
                    args.device,
                ]
            )
        )
        table[name] = {row["dataset"]: row for row in summary}

    last = f"dice_click{CLICKS}"
    ori, new = Path(anatomy).name, Path(tumour).name
    print(f"\nTable 1 (phantom scale): Dice, point = after {CLICKS} clicks / bbox; held-out fold 0 of 4")
    print(f"{'model':<10} | {'original tasks (anatomy)':>26} | {'new task (lesion)':>26}")
    for name, rows in table.items():
        cells = [f"{rows[d][last]:.3f} / {rows[d].get('dice_box', float('nan')):.3f}" for d in (ori, new)]
        print(f"{name:<10} | {cells[0]:>26} | {cells[1]:>26}")
    print(f"\nper-target values (incl. max over clicks): {runs / 'eval'}")
    print(f"SAM-Med3D-MoE demo finished in {time.time() - start:.0f} s")


if __name__ == "__main__":
    run_cli(main)
