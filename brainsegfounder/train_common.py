"""What pretraining and fine-tuning share: model, split and run flags, the --init import, run checkpoints.

The training loops themselves stay inline in `pretrain.py` and `finetune.py`.
"""

import argparse
import dataclasses

from brainsegfounder.model import SIZES, check_architecture
from brainsegfounder.transfer import describe_transfer, match_positions, transfer_encoder
from brainsegfounder.weights import describe_weights, read_weights, resolve_legacy_merging
from shared import cli
from shared.checkpoint import plain_args, save_checkpoint
from shared.dataset import canonical_modality
from shared.errors import InputError
from shared.loader import add_loader_args

SSL_KIND = "brainsegfounder_ssl"
SEG_KIND = "brainsegfounder_seg"


def patch_size(text: str) -> int:
    """argparse type of a --patch side: a positive multiple of 32 (the encoder halves the grid five times)."""
    value = cli.positive_int(text)
    if value % 32:
        raise argparse.ArgumentTypeError(f"every side must be a multiple of 32 (five 2x downsamplings), got {text}")
    return value


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Encoder layout flags (read off the --init weights when given)."""
    g = parser.add_argument_group("model")
    g.add_argument("--size", choices=sorted(SIZES), default="tiny",
                   help="paper Table 2: tiny 62M (2,2,2,2), small 64M (2,2,6,2), big 69M (2,2,18,2)")  # fmt: skip
    g.add_argument("--feature-size", type=cli.positive_int, default=48,
                   help="width of the first Swin stage (paper: 48; divisible by the heads of each stage)")  # fmt: skip
    g.add_argument("--num-heads", type=cli.positive_int, nargs=4, default=(3, 6, 12, 24),
                   help="attention heads per stage")  # fmt: skip
    g.add_argument("--window-size", type=cli.positive_int, default=7,
                   help="attention window side (paper: 7; smaller only for quick CPU runs)")  # fmt: skip
    g.add_argument("--legacy-merging", action=argparse.BooleanOptionalAction, default=None,
                   help="patch-merging order of MONAI < 1.5 (the released Tang and BrainSegFounder weights); default: "
                   "as recorded in --init, assumed legacy for foreign --init weights, the MONAI >= 1.5 order from "
                   "scratch")  # fmt: skip
    g.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the Swin blocks")
    g.add_argument("--init", help="weights whose Swin encoder starts this stage: a run of this package, Swin-UNETR's "
                   "model_swinvit.pt (Tang et al.), a BrainSegFounder or MONAI SSLHead / SwinUNETR state dict, or "
                   "a file from brainsegfounder.convert_checkpoint (format detected and reported)")  # fmt: skip
    g.add_argument("--init-channels", nargs="+",
                   help="modalities of the --init encoder's inputs (needed for foreign checkpoints)")  # fmt: skip
    g.add_argument("--patch-embed-init", choices=("kaiming", "default"), default="kaiming",
                   help="new channels Kaiming-init, others copied (paper), or all default-init (code)")  # fmt: skip
    g.add_argument("--channel-transfer", choices=("name", "position"), default="name",
                   help="which --init filter each input channel copies: the one of the same modality, or the one "
                   "at the same input position (same channel count; the modality-restriction recipe, --channels "
                   "T1 T1 from a T1 + FLAIR encoder)")  # fmt: skip


def add_run_args(parser: argparse.ArgumentParser, *, lr: float, steps: int, warmup: int, weight_decay: float,
                 out_holds: str) -> None:  # fmt: skip
    """Optimiser, schedule, loader and run-harness flags."""
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=cli.positive_int, default=steps, help="optimiser steps")
    g.add_argument("--warmup", type=cli.non_negative_int, default=warmup,
                   help="linear warm-up steps of the warm-up cosine schedule (fewer than --steps)")  # fmt: skip
    g.add_argument("--lr", type=cli.positive_float, default=lr, help="peak AdamW learning rate")
    g.add_argument("--weight-decay", type=cli.non_negative_float, default=weight_decay, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=cli.non_negative_float, default=1.0, help="max gradient norm (0: no clipping)")
    g = parser.add_argument_group("run")
    cli.add_run_args(g, out_holds=out_holds, unit="steps", compiled="the model")
    g.add_argument("--log-every", type=cli.positive_int, default=50, help="steps between log rows and checkpoints")
    add_loader_args(g)


def add_split_args(group) -> None:
    """Which labelled cases are held out: the same flags in pretrain (its SSL validation set) and finetune."""
    group.add_argument("--fold", type=cli.fold_index, default=0,
                       help="validation fold held out; -1 holds out none (no validation)")  # fmt: skip
    group.add_argument("--folds", type=cli.fold_count, default=5, help="number of deterministic k-fold splits")
    group.add_argument(
        "--split-file",
        help="folds from a file: nnU-Net's splits_final.json, a BrainSegFounder fold "
        "list (brats21_folds.json) or a plain {'train': [...], 'val': [...]}; --fold picks the fold",
    )
    group.add_argument("--holdout", type=cli.non_negative_int, default=0,
                       help="a fixed held-out set of N random cases instead of a fold (paper ATLAS: 100)")  # fmt: skip


def check_run_args(args) -> None:
    """Checks across flags, and the model layout, before any work (one sentence each)."""
    if args.warmup >= args.steps:
        raise InputError(f"--warmup {args.warmup} must be smaller than --steps {args.steps}.")
    if max(args.patch) < 64:
        raise InputError(f"--patch {' '.join(map(str, args.patch))}: one side must be at least 64 (the 1/32 "
                         "bottleneck needs two voxels).")  # fmt: skip
    if args.fold >= args.folds and not args.split_file:
        raise InputError(f"--fold {args.fold} must be smaller than --folds {args.folds}.")
    if args.split_file and args.holdout:
        raise InputError("--split-file and --holdout both say which cases are held out; give one.")
    if not args.init:  # with --init the layout comes from its weights
        try:
            check_architecture(args.feature_size, SIZES[args.size], args.num_heads, args.window_size)
        except ValueError as err:
            raise InputError(f"--feature-size / --num-heads / --window-size: {err}") from None


def resolve_architecture(args) -> tuple[dict, dict | None]:
    """Encoder layout and the --init weights.

    Returns:
        arch: {feature_size, depths, num_heads, window_size, legacy_merging}: read off the --init weights when
            given (overriding the flags, and said so), else from the flags.
        init: None without --init, else {"state": state dict with our key names, "channels": its input
            modalities (recorded, or --init-channels)}.
    """
    legacy = bool(args.legacy_merging)
    arch = {"feature_size": args.feature_size, "depths": list(SIZES[args.size]), "num_heads": list(args.num_heads),
            "window_size": args.window_size, "legacy_merging": legacy}  # fmt: skip
    if not args.init:
        return arch, None
    weights = read_weights(args.init, flag="--init")
    legacy, merging_note = resolve_legacy_merging(weights, args.legacy_merging, flag="--init")
    print(describe_weights(weights, merging_note))
    init_arch = {**weights.arch, "legacy_merging": legacy}
    if init_arch != arch:
        print(f"using the encoder layout of --init {args.init}: {init_arch}")
    channels = args.init_channels or weights.channels
    if not channels:
        raise InputError(f"--init {args.init} does not record its input channels; name its "
                         f"{weights.in_channels} channel(s) with --init-channels.")  # fmt: skip
    if len(channels) != weights.in_channels:
        raise InputError(f"--init-channels names {len(channels)} channel(s) but --init {args.init} has "
                         f"{weights.in_channels}.")  # fmt: skip
    channels = [canonical_modality(c) for c in channels]
    if args.channel_transfer == "position":
        match_positions(args.channels, channels, source=f"--init {args.init}")  # refused before any work
    return init_arch, {"state": weights.state, "channels": channels}


def init_encoder(encoder, init: dict, args, channels, is_main: bool) -> dict:
    """Transfer the --init encoder into `encoder`, adapting the patch embedding; print and return the report."""
    report = transfer_encoder(encoder, init["state"], init["channels"], channels, init=args.patch_embed_init,
                              source=f"--init {args.init}", by=args.channel_transfer)  # fmt: skip
    if is_main:
        print(describe_transfer(report))
    return report


def save_run(path, *, kind: str, model, cfg, channels, optimizer, scaler, step: int, args, rng, **extra) -> None:
    """Atomically write everything needed to resume, transfer or predict (un-compiled, un-wrapped model); the
    flags go in too, so that --resume can check it continues the same run."""
    save_checkpoint(path, kind=kind, config=dataclasses.asdict(cfg), channels=list(channels),
                    model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                    step=step, args=plain_args(args), rng=rng, **extra)  # fmt: skip
