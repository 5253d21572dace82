"""The SAM-Med3D-MoE forgetting experiment on phantom data: the left half of the paper's Table 1 (a new downstream
task: "Ori tasks" vs the new task) at toy scale.

    python -m sam_med3d_moe.demo --data data/demo --runs runs/sam_med3d_moe

1. general model: a small SAM-Med3D trained from scratch on the anatomical structures (phantom anatomy, T1;
   csf, grey matter, white matter, deep grey matter: the original tasks);
2. full fine-tuning: the whole general model trained further on a new task, whole lesions of the tumour phantom
   (T1 and FLAIR), the plain fine-tuning that forgets (`train --init`);
3. task expert: only a copy of the general mask decoder fine-tuned on the lesions, encoders frozen (Table 1's
   "FT-expert");
4. SAM-Med3D-MoE: general + expert + gate, only the gate trained on both tasks (experts frozen, the default
   --expert-lr 0: the MoE row uses exactly the FT-expert's decoder weights).
Full FT and the expert get the same lr (4e-4), steps and weight decay (0.01); they differ in the lr schedule
(full FT: train's cosine decay and its parameter groups at --decoder-lr-scale 1, i.e. one lr for all; the expert:
constant, as the paper). 4e-4 instead of the paper's 1e-4 and 5 interaction steps per batch instead of the
official 11: scale for minutes of CPU.
All four are evaluated on the held-out cases (fold 0 of 4) with 6 clicks (our reading of Table 1's "6 points":
6 iterative clicks, each the newest click + the previous mask) and with the ground-truth box. Printed per group:
Dice after the last (6th) click, the max over the 6 clicks (the official validation's per-case score) and the
box Dice, each the mean over targets on the crop (the csv files add the mean over classes and Dice/NSD in the
original grid). Then the gate's routing per class and prompt type (click, box).
Scale for a 2-core CPU: 64^3 crops at 1.5 mm, `small_config`, a few hundred steps each; the gate lr is 1e-3
instead of the paper's 1e-6, which would not move a freshly initialised gate in a few hundred steps.
Not exercised here: the weak-category setting (several per-class experts, `finetune_expert --labels`, and the
paper's Table 2 selector x tau variants, which `evaluate --selector/--tau` provides).
Re-running resumes finished runs.
"""

import time
from pathlib import Path

import torch

from sam_med3d_moe import evaluate, finetune_expert, train, train_gate
from shared.cli import make_parser, non_negative_int, positive_int, run_cli
from shared.phantom import write_phantom_datasets

CLICKS = 6


def main(argv=None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--data", default="data/demo", help="folder of the phantom datasets (written if absent)")
    parser.add_argument("--runs", default="runs/sam_med3d_moe", help="folder for the runs and tables")
    parser.add_argument("--general-steps", type=positive_int, default=400, help="steps of the general model")
    parser.add_argument("--finetune-steps", type=positive_int, default=150, help="steps of the full fine-tuning")
    parser.add_argument("--expert-steps", type=positive_int, default=150, help="steps of the task expert")
    parser.add_argument("--gate-steps", type=positive_int, default=300, help="steps of the gate")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--threads", type=non_negative_int, default=0, help="CPU threads for torch (0: torch's "
                        "default); 1 avoids the slow-down of multi-threaded small ops on a shared CPU")  # fmt: skip
    args = parser.parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    start = time.time()
    anatomy, tumour = (str(d) for d in write_phantom_datasets(args.data, datasets=["anatomy", "tumour"], seed=0))
    runs = Path(args.runs)
    common = ["--fold", "0", "--folds", "4", "--num-clicks", "5", "--batch-size", "2", "--device", args.device,
              "--resume", "--save-every", "50"]  # fmt: skip
    lesion = ["--data", tumour, "--modalities", "T1", "FLAIR", "--union"]
    general = runs / "general"

    def stage(title: str) -> None:
        print(f"\n== {title} ({time.time() - start:.0f} s)")

    stage("1. general model on the anatomy (original tasks)")
    train.main(["--data", anatomy, "--modalities", "T1", "--config", "small", "--steps", str(args.general_steps),
                "--lr", "4e-4", "--weight-decay", "0.01", "--out", str(general), *common])  # fmt: skip
    stage("2. full fine-tuning of the general model on the lesions (new task)")
    full = runs / "finetune_full"
    train.main([*lesion, "--init", str(general / "checkpoint.pt"), "--steps", str(args.finetune_steps), "--lr", "4e-4",
                "--decoder-lr-scale", "1", "--weight-decay", "0.01", "--out", str(full), *common])  # fmt: skip
    stage("3. expert decoder fine-tuned on the lesions (new task)")
    expert = runs / "expert_lesion"
    finetune_expert.main(["--general", str(general / "checkpoint.pt"), *lesion, "--steps", str(args.expert_steps),
                          "--lr", "4e-4", "--weight-decay", "0.01", "--out", str(expert), *common])  # fmt: skip
    stage("4. MoE: gate trained on both tasks (experts frozen)")
    moe = runs / "moe"
    train_gate.main(["--general", str(general / "checkpoint.pt"), "--experts", str(expert / "checkpoint.pt"),
                     "--data", anatomy, tumour, "--modalities", "T1", "FLAIR", "--union", tumour, "--gate-lr", "1e-3",
                     "--steps", str(args.gate_steps), "--out", str(moe), *common])  # fmt: skip

    stage("5. evaluation on the held-out cases")
    results = {}
    models = (("general", general), ("full FT", full), ("FT-expert", expert), ("MoE", moe))
    for name, run in models:
        results[name] = evaluate.evaluate(evaluate.parse_args(
            ["--model", str(run / "checkpoint.pt"), "--data", anatomy, tumour, "--split", str(moe / "split.json"),
             "--modalities", "T1", "FLAIR", "--union", tumour, "--clicks", str(CLICKS), "--box",
             "--finetuned-from", str(moe / "checkpoint.pt"), "--out", str(runs / "eval"), "--name",
             name.replace(" ", "_"), "--device", args.device]
        ))  # fmt: skip

    last = f"dice_click{CLICKS}"
    groups = {r["classes"]: r for r in results["MoE"]["table1"]}
    print(f"\nTable 1, left half (phantom scale): Dice, mean over targets, held-out fold 0 of 4; per cell: after the "
          f"last of {CLICKS} clicks / max over the {CLICKS} clicks (official) / ground-truth box")  # fmt: skip
    print(f"{'model':<10} | {'original tasks (anatomy)':>24} | {'new task (lesion)':>24}")
    for name, result in results.items():
        rows = {r["classes"]: r for r in result["table1"]}
        cells = [f"{rows[g][last]:.3f} / {rows[g]['dice_max_over_clicks']:.3f} / {rows[g]['dice_box']:.3f}"
                 for g in ("other", "fine-tuned")]  # fmt: skip
        print(f"{name:<10} | {cells[0]:>24} | {cells[1]:>24}")
    print(f"targets: {groups['other']['targets']} anatomy ({groups['other']['class_count']} classes), "
          f"{groups['fine-tuned']['targets']} lesion")  # fmt: skip
    print("\nMoE routing: share of each class's prompts the selector (weighted, tau 0.5) sent to each decoder")
    print(f"{'class':<34} {'prompt':>6} {'n':>4} {'expected':>10} {'general':>8} {'expert':>8} {'mean s_top':>11} "
          f"{'accuracy':>9}")  # fmt: skip
    for row in results["MoE"]["routing"]:
        share = [v for k, v in row.items() if k.startswith("share_") and k != "share_general"]
        print(f"{row['dataset'] + ' ' + row['label']:<34} {row['prompt']:>6} {row['prompts']:>4} "
              f"{row['expected'][:10]:>10} {row['share_general']:>8.2f} {share[0]:>8.2f} {row['mean_s_top']:>11.2f} "
              f"{row['accuracy']:>9.2f}")  # fmt: skip
    print(f"\nper-target values (every click, Dice and NSD in the original grid): {runs / 'eval'}")
    print(f"SAM-Med3D-MoE demo finished in {time.time() - start:.0f} s")


if __name__ == "__main__":
    run_cli(main)
