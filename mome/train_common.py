"""What the two MoME training phases share: flags, the model config from flags, data set-up, checkpoints.

The training loops themselves stay inline in `train_expert.py` (phase 1) and `train.py` (phase 2).
"""

import argparse
import dataclasses
from pathlib import Path

import torch

from mome.config import MoMEConfig
from mome.data import prepare_samples, save_split
from mome.splits import training_split
from shared.checkpoint import save_checkpoint
from shared.cli import add_run_args
from shared.dataset import MODALITIES, canonical_modality, declared_label_values, load_dataset_json
from shared.errors import InputError
from shared.harness import DistInfo


def add_common_args(parser: argparse.ArgumentParser, *, lr: float, epochs: int) -> None:
    """Flags of both phases: data, split, patches, model size, schedule, run harness."""
    g = parser.add_argument_group("data")
    g.add_argument("--data", nargs="+", required=True, help="nnU-Net raw dataset folders (DatasetXXX_Name)")
    g.add_argument("--fold", type=int, default=0, help="validation fold held out of training; -1 trains on all cases")
    g.add_argument("--folds", type=int, default=5, help="number of deterministic k-fold splits per dataset")
    g.add_argument("--split-file", nargs="+", help="fixed splits instead of k-folds: {dataset: {train, test}} "
                   "files or nnU-Net splits_final.json (its --fold); only the train cases are used")  # fmt: skip
    g.add_argument("--patch", type=int, nargs=3, default=(128, 128, 128), help="training patch size (voxels)")
    g.add_argument("--batch-size", type=int, default=2, help="patches per step and process (nnU-Net plans: 2)")
    g.add_argument("--oversample", type=float, default=0.33, help="fraction of each batch centred on lesion voxels")
    g.add_argument("--no-augment", action="store_true", help="turn off flips/rotations/intensity augmentation")
    g.add_argument("--keep-labels", action="store_true", help="keep label values instead of lesion = label > 0; "
                   "the seg heads get one class per declared label value (0..max)")  # fmt: skip
    g.add_argument("--modalities", nargs="+", default=list(MODALITIES), help="expert order (modality names)")
    g = parser.add_argument_group("model")
    g.add_argument("--features", type=int, nargs="+", default=[32, 64, 128, 256, 320, 320], help="UNet stage widths")
    g.add_argument("--checkpointing", action="store_true", help="activation checkpointing in the UNets (less memory)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, default=epochs, help="epochs (nnU-Net: 250 steps each)")
    g.add_argument("--steps-per-epoch", type=int, default=250, help="training steps per epoch")
    g.add_argument("--lr", type=float, default=lr, help="initial SGD learning rate (poly decay, exponent 0.9)")
    g.add_argument("--weight-decay", type=float, default=3e-5, help="SGD weight decay (nnU-Net: 3e-5)")
    g = parser.add_argument_group("run")
    add_run_args(g, out_holds="checkpoint.pt, log.csv, split.json, cache/", unit="epochs", compiled="the model")


def check_common_args(args) -> None:
    """Refuse bad flag values with one sentence each."""
    for path in args.data:
        if not Path(path, "dataset.json").is_file():
            raise InputError(f"--data {path}: no dataset.json found; expected an nnU-Net raw dataset folder.")
    if min(args.patch) < 8:
        raise InputError(f"--patch {args.patch}: every side must be at least 8 voxels.")
    for name, value in (("--batch-size", args.batch_size), ("--epochs", args.epochs),
                        ("--steps-per-epoch", args.steps_per_epoch)):  # fmt: skip
        if value < 1:
            raise InputError(f"{name} must be at least 1, got {value}.")
    if args.stop_after is not None and args.stop_after < 1:
        raise InputError(f"--stop-after must be at least 1, got {args.stop_after}.")
    if not 0.0 <= args.oversample <= 1.0:
        raise InputError(f"--oversample must lie in [0, 1], got {args.oversample}.")
    if args.lr <= 0:
        raise InputError(f"--lr must be positive, got {args.lr}.")
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
        raise InputError(f"--keep-labels: negative label values {sorted(set(v for v in values if v < 0))} cannot be "
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


def prepare_data(args, dist_info: DistInfo, only_modality: str | None = None) -> list:
    """Split the datasets, cache the training samples (rank 0 first), and keep those with an expert.

    Args:
        only_modality: phase 1 keeps the samples of this modality only; "all" keeps every sample (the
            universal nnU-Net), whether or not an expert has its modality.
    """
    out = Path(args.out)
    split = training_split(args.data, args.split_file, fold=args.fold, folds=args.folds)
    train_ids = {name: s["train"] for name, s in split.items()}
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        save_split(out / "split.json", split)
        samples = prepare_samples(args.data, train_ids, args.modalities, out / "cache", binarise=not args.keep_labels)
    if dist_info.world_size > 1:
        torch.distributed.barrier()  # the cache is complete before the other ranks read it
    if not dist_info.is_main:
        samples = prepare_samples(args.data, train_ids, args.modalities, out / "cache", binarise=not args.keep_labels)
    if only_modality == "all":
        return samples
    unknown = sorted({s.modality for s in samples if s.expert < 0})
    if unknown and dist_info.is_main:
        print(f"skipping samples of modalities without an expert: {unknown} (experts: {args.modalities})")
    samples = [s for s in samples if s.expert >= 0]
    if only_modality is not None:
        samples = [s for s in samples if s.modality == only_modality]
    if not samples:
        wanted = only_modality or args.modalities
        raise InputError(f"--data holds no training image of modality {wanted} in the chosen split.")
    return samples


def save_run(path, *, kind: str, model: torch.nn.Module, cfg: MoMEConfig, optimizer, scaler, epoch: int, args,
             rng: dict | list, **extra) -> None:  # fmt: skip
    """Atomically write everything needed to predict with, or resume, a run (un-compiled, un-wrapped model)."""
    save_checkpoint(
        path,
        kind=kind,
        config=dataclasses.asdict(cfg),
        model=model.state_dict(),
        optimizer=optimizer.state_dict(),
        scaler=scaler.state_dict(),
        epoch=epoch,
        args={k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
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
