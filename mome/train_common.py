"""The flags and run files that the two MoME training phases share.

The training loops themselves stay inline in `train_expert.py` (phase 1) and `train.py` (phase 2); the data
path (cache, split, batches) is in `data.py`.
"""

import dataclasses
from pathlib import Path

import torch

from mome.config import MoMEConfig
from mome.expert import per_stage
from mome.labels import add_label_rule_arg
from shared.checkpoint import plain_args, save_checkpoint
from shared.cli import (
    add_run_args,
    fold_count,
    fold_index,
    non_negative_float,
    positive_float,
    positive_int,
    probability,
)
from shared.dataset import MODALITIES, canonical_modality, declared_label_values, load_dataset_json
from shared.errors import InputError
from shared.loader import add_loader_args

RUN_FILES = "checkpoint.pt, log.csv, split.json"


def add_common_args(parser, *, lr: float, epochs: int) -> None:
    """Flags of both phases: data, split, patches, model size, schedule, run harness, loader."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", nargs="+", required=True, help="nnU-Net raw dataset folders (DatasetXXX_Name)")
    g.add_argument("--fold", type=fold_index, default=0, help="k-fold split held out of training (-1: train on all)")
    g.add_argument("--folds", type=fold_count, default=5, help="number of deterministic k-fold splits per dataset")
    g.add_argument("--split-file", nargs="+", help="fixed splits instead of k-folds: {dataset: {train, test}} "
                   "files or nnU-Net splits_final.json (its --fold); only the train cases are used")  # fmt: skip
    g.add_argument("--patch", type=positive_int, nargs=3, default=[128, 128, 128], help="training patch (voxels)")
    g.add_argument("--batch-size", type=positive_int, default=2, help="patches per step and process (plans: 2)")
    g.add_argument("--oversample", type=probability, default=0.33, help="fraction of each batch centred on lesion "
                   "voxels (nnU-Net's last round(B * (1 - p)) samples)")  # fmt: skip
    g.add_argument("--no-augment", action="store_true", help="turn off nnU-Net's default augmentation")
    g.add_argument("--keep-labels", action="store_true", help="keep label values instead of lesion = label > 0; "
                   "the seg heads get one class per declared label value (0..max)")  # fmt: skip
    add_label_rule_arg(g)
    g.add_argument("--modalities", nargs="+", default=list(MODALITIES), help="expert order (modality names)")
    g = parser.add_argument_group("model")
    g.add_argument("--features", type=positive_int, nargs="+", default=[32, 64, 128, 256, 320, 320],
                   help="UNet stage widths")  # fmt: skip
    g.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the UNets (less memory)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=positive_int, default=epochs, help="epochs (nnU-Net: 250 steps each)")
    g.add_argument("--steps-per-epoch", type=positive_int, default=250, help="training steps per epoch")
    g.add_argument("--lr", type=positive_float, default=lr, help="initial SGD learning rate (poly decay, 0.9)")
    g.add_argument("--weight-decay", type=non_negative_float, default=3e-5, help="SGD weight decay (nnU-Net)")
    g = parser.add_argument_group("run")
    add_run_args(g, out_holds=RUN_FILES, unit="epochs", compiled="the model")
    add_loader_args(g)


def check_common_args(args) -> None:
    """Refuse bad combinations of flags with one sentence each; canonicalise the modality names."""
    for path in args.data:
        if not Path(path, "dataset.json").is_file():
            raise InputError(f"--data {path}: no dataset.json found; expected an nnU-Net raw dataset folder.")
    names = [Path(d).name for d in args.data]
    if len(set(names)) != len(names):
        raise InputError(f"--data names a dataset folder twice ({names}); each dataset is one cache and split.")
    if min(args.patch) < 8:
        raise InputError(f"--patch {args.patch}: every side must be at least 8 voxels.")
    if len(args.features) < 2:
        raise InputError(f"--features {args.features}: a UNet needs at least 2 stages.")
    if args.fold >= args.folds:
        raise InputError(f"--fold {args.fold} must be below --folds {args.folds} (or -1).")
    if args.keep_labels and args.label_rule:
        raise InputError("--keep-labels keeps every label value, so a --label-rule (binary lesion) cannot apply.")
    args.modalities = [canonical_modality(m) for m in args.modalities]
    if len(set(args.modalities)) != len(args.modalities):
        raise InputError(f"--modalities {args.modalities} names a modality twice.")
    depth = len(args.features) - 1
    if any(p % 2**depth for p in args.patch):
        raise InputError(f"--patch {args.patch} must be divisible by 2^{depth} for {len(args.features)} UNet stages.")


def num_classes(args) -> int:
    """Seg-head classes: 2 (background, lesion) as MoME, or with --keep-labels 0..max declared label value."""
    if not args.keep_labels:
        return 2
    values = [v for d in args.data for v in declared_label_values(load_dataset_json(d)["labels"])]
    if min(values) < 0:
        raise InputError(f"--keep-labels: negative label values {sorted({v for v in values if v < 0})} cannot be "
                         "seg-head classes.")  # fmt: skip
    return max(max(values) + 1, 2)


def config_from_args(args, **overrides) -> MoMEConfig:
    """The model config these flags describe (experts and gate share the topology)."""
    try:
        return MoMEConfig(modalities=tuple(args.modalities), features=tuple(args.features),
                          strides=(1,) + (2,) * (len(args.features) - 1), checkpointing=args.checkpointing,
                          num_classes=num_classes(args), **overrides)  # fmt: skip
    except ValueError as err:
        raise InputError(f"invalid model flags: {err}") from err


def save_run(path, *, kind: str, model: torch.nn.Module, cfg: MoMEConfig, optimizer, scaler, epoch: int, args,
             rng: dict | list, grid, **extra) -> None:  # fmt: skip
    """Atomically write everything needed to predict with, or resume, a run (un-compiled, un-wrapped model).

    Besides the state: the flags (`--resume` refuses other values), the training patch (the sliding window of
    mome.predict) and `grid`, the shape of every training image (None when they differ), which mome.predict
    requires of its inputs.
    """
    save_checkpoint(
        path,
        kind=kind,
        config=dataclasses.asdict(cfg),
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict(),
        epoch=epoch,
        args=plain_args(args),
        patch=list(args.patch),
        grid=None if grid is None else list(grid),
        rng=rng,
        **extra,
    )


def last_epoch(args, start_epoch: int) -> int:
    """The epoch this call stops before: the end of the schedule, or earlier with --stop-after."""
    return args.epochs if args.stop_after is None else min(args.epochs, start_epoch + args.stop_after)


def config_from_checkpoint(ckpt: dict) -> MoMEConfig:
    """Rebuild the MoMEConfig stored in a checkpoint (lists back to tuples)."""
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()}
    return MoMEConfig(**fields)


def stride_divisor(cfg: MoMEConfig) -> list[int]:
    """Per axis, the product of the strides: every patch side must be a multiple of it."""
    divisor = [1, 1, 1]
    for stride in per_stage(cfg.strides, n_stages=len(cfg.features), name="strides"):
        divisor = [d * s for d, s in zip(divisor, stride)]
    return divisor
