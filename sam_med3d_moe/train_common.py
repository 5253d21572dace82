"""What the three training entry points share: their flags, the case split, the data and batches, and the run
checkpoint (with the flags `--resume` compares). `threshold` also validates the --tau of predict and evaluate.

The loops themselves stay inline in `train.py` (general model), `finetune_expert.py` and `train_gate.py`.
"""

import argparse
import dataclasses
from pathlib import Path

import torch

from sam_med3d_moe.config import SamConfig
from sam_med3d_moe.data import AUGMENTATION, DrawBatch, build_targets, load_cases
from shared.augment import BatchAugmentation
from shared.checkpoint import (
    load_run_checkpoint,
    plain_args,
    restore_run,
    save_checkpoint,
)
from shared.cli import (
    add_run_args,
    fold_count,
    fold_index,
    non_negative_float,
    non_negative_int,
    number_in,
    positive_float,
    positive_int,
    probability,
)
from shared.errors import InputError
from shared.loader import add_loader_args, default_workers, training_batches
from shared.splits import split_datasets, write_split

threshold = number_in(float, "a threshold in [0, 1)", low=0.0, high=1.0, high_open=True)  # the selector's tau


def add_common_args(parser: argparse.ArgumentParser, *, lr: float | None, steps: int) -> None:
    """Flags of every training entry point: data, split, prompts, optimisation, run harness (`lr` None: no
    --lr flag, for an entry point with its own learning-rate flags). Every value is checked at parse time."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", nargs="+", required=True, help="nnU-Net raw dataset folders (DatasetXXX_Name)")
    g.add_argument("--modalities", nargs="+", help="channels to use (default: every channel of each dataset)")
    g.add_argument(
        "--union",
        nargs="*",
        metavar="DATASET",
        help="one target per case = all labels > 0 (e.g. whole "
        "lesion) instead of one per label value; for every dataset, or only the named folders",
    )
    g.add_argument("--fold", type=fold_index, default=0, help="held-out fold of each dataset; -1 trains on all cases")
    g.add_argument("--folds", type=fold_count, default=5, help="number of deterministic k-fold splits per dataset")
    g.add_argument("--spacing", type=positive_float, default=1.5, help="isotropic resampling in mm (official: 1.5)")
    g.add_argument("--min-voxels", type=positive_int, default=10, help="skip smaller targets (voxels after resampling)")
    g.add_argument("--ct-clamp", action="store_true", help="clamp intensities to [-1000, 1000] (official for CT)")
    add_loader_args(g)
    g = parser.add_argument_group("prompts")
    g.add_argument("--num-clicks", type=positive_int, default=11, help="interaction steps per batch (official: 11)")
    g.add_argument("--box-prob", type=probability, default=0.5, help="probability that a batch starts from a box")
    g.add_argument("--jitter", type=non_negative_int, default=2, help="largest shift (voxels) of each box coordinate")
    g.add_argument(
        "--dice-only", action="store_true", help="Dice loss only (the official CE term was 0 before MONAI 1.3)"
    )
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive_int, default=steps, help="optimizer steps")
    g.add_argument("--batch-size", type=positive_int, default=2, help="crops per step and process")
    if lr is not None:
        g.add_argument("--lr", type=positive_float, default=lr, help="AdamW learning rate")
    g.add_argument("--weight-decay", type=non_negative_float, default=0.1, help="AdamW weight decay (official: 0.1)")
    g.add_argument("--clip", type=non_negative_float, default=1.0, help="gradient-norm clipping (0: off)")
    g = parser.add_argument_group("run")
    add_run_args(g, out_holds="checkpoint.pt, log.csv, split.json", unit="steps", compiled="the image encoder")
    g.add_argument("--save-every", type=positive_int, default=100, help="write the checkpoint every this many steps")


def check_common_args(args) -> None:
    """The checks argparse cannot make: every --data folder is an nnU-Net dataset."""
    for path in args.data:
        if not Path(path, "dataset.json").is_file():
            raise InputError(f"--data {path}: no dataset.json found; expected an nnU-Net raw dataset folder.")


def prepare_data(args, out: Path, is_main: bool = True, part: str = "train") -> tuple[list, list]:
    """Build or reuse the caches, list the targets of `part`, then write OUT/split.json (rank 0): a dataset that
    is refused leaves nothing in OUT.

    Returns:
        the cached cases (`shared.cache.CachedCase`) and the targets (`data.Target`) of every dataset.
    """
    split = split_datasets(args.data, fold=args.fold, folds=args.folds)  # fold -1: every case trains
    ids = {name: s[part] for name, s in split.items()}
    entries = load_cases(args.data, ids, args.modalities, args.spacing, args.ct_clamp, cache_root=args.cache,
                         processes=max(1, args.workers or 1))  # fmt: skip
    targets = build_targets(entries, union=args.union, labels=getattr(args, "labels", None),
                            min_voxels=args.min_voxels)  # fmt: skip
    if is_main:
        write_split(out / "split.json", split)
    return entries, targets


def batches(args, entries, targets, size: int, rank: int, start: int, stop: int, device):
    """The training batches of steps [start, stop) on `device`, flipped (`shared.loader.training_batches`)."""
    workers = default_workers(device) if args.workers is None else args.workers
    draw = DrawBatch(entries, targets, args.batch_size, size)
    return training_batches(draw, seed=args.seed, rank=rank, start=start, stop=stop, workers=workers, device=device,
                            augment=BatchAugmentation(AUGMENTATION, (size,) * 3))  # fmt: skip


def read_run(path, kind: str, hint: str) -> dict:
    """A run checkpoint of this package of `kind` (read with weights_only=True); a plain state_dict or another
    program's file is refused with one sentence ending in `hint` (what to pass instead)."""
    return load_run_checkpoint(path, kind=kind, hint=hint, keys=("model", "config"))


def save_run(
    path, *, kind: str, model: torch.nn.Module, config: dict, optimizer, scaler, step: int, args, rng, **extra
) -> None:
    """Atomically write what is needed to use or resume a run (the un-compiled, un-wrapped model) and the flags
    that `--resume` compares (`shared.checkpoint.check_same_run`)."""
    save_checkpoint(
        path,
        kind=kind,
        config=config,
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict(),
        step=step,
        rng=rng,
        args=plain_args(args),
        **extra,
    )


def resume_step(ckpt: dict | None, *, kind: str, model, optimizer, scaler, generator, device) -> int:
    """Load the checkpoint `prepare_run_dir` returned into model/optimizer/scaler/RNG; the step to continue from
    (0 for a fresh run)."""
    if ckpt is None:
        return 0
    return int(restore_run(ckpt, kind=kind, model=model, optimizer=optimizer, scaler=scaler, generator=generator,
                           device=device)["step"])  # fmt: skip


def sam_config_dict(cfg: SamConfig) -> dict:
    return dataclasses.asdict(cfg)
