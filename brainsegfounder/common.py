"""What pretraining and fine-tuning share: model and run flags, the source-checkpoint reader, run checkpoints.

The training loops themselves stay inline in `pretrain.py` and `finetune.py`.
"""

import argparse
import dataclasses

from brainsegfounder.model import SIZES
from brainsegfounder.transfer import describe_transfer, transfer_encoder
from brainsegfounder.weights import describe_weights, read_weights, resolve_legacy_merging
from shared import cli
from shared.checkpoint import save_checkpoint
from shared.dataset import canonical_modality
from shared.errors import InputError

SSL_KIND = "brainsegfounder_ssl"
SEG_KIND = "brainsegfounder_seg"


def add_model_args(parser: argparse.ArgumentParser) -> None:
    """Encoder layout flags (taken from the --init checkpoint when it is one of ours)."""
    g = parser.add_argument_group("model")
    g.add_argument("--size", choices=sorted(SIZES), default="tiny",
                   help="paper Table 2: tiny 62M (2,2,2,2), small 64M (2,2,6,2), big 69M (2,2,18,2)")  # fmt: skip
    g.add_argument("--feature-size", type=int, default=48, help="width of the first Swin stage (paper: 48)")
    g.add_argument("--num-heads", type=int, nargs=4, default=(3, 6, 12, 24), help="attention heads per stage")
    g.add_argument("--window-size", type=int, default=7,
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


def add_run_args(parser: argparse.ArgumentParser, *, lr: float, steps: int, warmup: int, weight_decay: float) -> None:
    """Optimiser, schedule and run-harness flags."""
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=steps, help="optimiser steps")
    g.add_argument("--warmup", type=int, default=warmup, help="linear warm-up steps of the warm-up cosine schedule")
    g.add_argument("--lr", type=float, default=lr, help="peak AdamW learning rate")
    g.add_argument("--weight-decay", type=float, default=weight_decay, help="AdamW weight decay")
    g.add_argument("--grad-clip", type=float, default=1.0, help="max gradient norm (0: no clipping)")
    g = parser.add_argument_group("run")
    cli.add_run_args(g, out_holds="checkpoint.pt, log.csv", unit="steps", compiled="the model")
    g.add_argument("--log-every", type=int, default=50, help="steps between log rows and checkpoints")


def check_run_args(args) -> None:
    """Refuse bad numeric flags with one sentence each."""
    for name in ("steps", "log_every", "batch_size"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if not 0 <= args.warmup < args.steps:
        raise InputError(f"--warmup must lie in [0, --steps), got {args.warmup} with --steps {args.steps}.")
    if args.lr <= 0:
        raise InputError(f"--lr must be positive, got {args.lr}.")
    if args.stop_after is not None and args.stop_after < 1:
        raise InputError(f"--stop-after must be at least 1, got {args.stop_after}.")
    if any(p % 32 for p in args.patch):
        raise InputError(f"--patch {args.patch}: every side must be a multiple of 32 (five 2x downsamplings).")
    if max(args.patch) < 64:
        raise InputError(f"--patch {args.patch}: one side must be at least 64 (the 1/32 bottleneck needs two voxels).")


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
    return init_arch, {"state": weights.state, "channels": [canonical_modality(c) for c in channels]}


def init_encoder(encoder, init: dict, args, channels, is_main: bool) -> dict:
    """Transfer the --init encoder into `encoder`, adapting the patch embedding; print and return the report."""
    report = transfer_encoder(encoder, init["state"], init["channels"], channels, init=args.patch_embed_init,
                              source=f"--init {args.init}")  # fmt: skip
    if is_main:
        print(describe_transfer(report))
    return report


def save_run(path, *, kind: str, model, cfg, channels, optimizer, scaler, step: int, args, rng, **extra) -> None:
    """Atomically write everything needed to resume, transfer or predict (un-compiled, un-wrapped model)."""
    plain_args = {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()}
    save_checkpoint(path, kind=kind, config=dataclasses.asdict(cfg), channels=list(channels),
                    model=model.state_dict(), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                    step=step, args=plain_args, rng=rng, **extra)  # fmt: skip
