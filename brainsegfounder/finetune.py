"""BrainSegFounder Stage 3: supervised fine-tuning of SwinUNETR from a pretrained encoder (or from scratch).

    python -m brainsegfounder.finetune --data BRATS_DIR --channels FLAIR T1ce T1 T2 --target brats \
        --init runs/stage2/checkpoint.pt --out runs/finetune
    python -m brainsegfounder.finetune ... --train-fraction 0.05 --repeats 5      # few-shot (paper Fig. 5)

The encoder comes from `--init` (a pretraining or fine-tuning checkpoint, or foreign SwinUNETR/BrainSegFounder
weights), the decoder is fresh; without `--init` the whole model is trained from scratch (the SwinUNETR
baseline). Each repeat r trains on its own random `--train-fraction` of the training split (seed + r), is
validated on the held-out fold with sliding windows (Dice of sigmoid > 0.5 per channel), and writes
OUT/repeat_r/checkpoint.pt; OUT/summary.json holds the mean and std over repeats.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from brainsegfounder.common import (
    SEG_KIND,
    add_model_args,
    add_run_args,
    check_fresh_out,
    check_run_args,
    init_encoder,
    resolve_architecture,
    save_run,
)
from brainsegfounder.data import (
    few_shot_subset,
    load_channels,
    parse_channels,
    segmentation_batch,
    segmentation_target,
    split_labeled,
)
from brainsegfounder.losses import dice_bce_loss, dice_loss
from brainsegfounder.model import SwinUNETRConfig, build_swinunetr
from brainsegfounder.predict import predict_probabilities
from shared.checkpoint import load_checkpoint, restore_run
from shared.cli import run_cli
from shared.errors import InputError
from shared.harness import (
    MetricsLogger,
    all_reduce_mean,
    autocast_context,
    check_finite_loss,
    gather_rng_state,
    init_distributed,
    make_grad_scaler,
    maybe_compile,
    pick_amp_dtype,
    seed_everything,
    warmup_cosine_lr,
    wrap_ddp,
)
from shared.metrics import dice

LOSSES = {"dice": dice_loss, "dicece": dice_bce_loss}
REGIONS = {"brats": ("TC", "WT", "ET"), "binary": ("lesion",)}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("data")
    g.add_argument("--data", required=True, help="labelled nnU-Net raw dataset folder")
    g.add_argument("--channels", nargs="+", required=True, help="input modalities in channel order")
    g.add_argument("--target", choices=sorted(REGIONS), default="brats",
                   help="brats: TC/WT/ET sigmoid channels; binary: one lesion channel (label > 0)")  # fmt: skip
    g.add_argument("--brats-labels", type=int, nargs=3, default=(1, 2, 3), metavar=("NECROSIS", "EDEMA", "ENH"),
                   help="label values of the BraTS classes (BraTS 2021 files: 1 2 4)")  # fmt: skip
    g.add_argument("--fold", type=int, default=0, help="validation fold held out; -1 trains on all (no validation)")
    g.add_argument("--folds", type=int, default=5, help="number of deterministic k-fold splits")
    g.add_argument("--train-fraction", type=float, default=1.0, help="few-shot: fraction of the training split")
    g.add_argument("--repeats", type=int, default=1, help="few-shot: random training subsets (seeds seed..seed+R-1)")
    g.add_argument("--patch", type=int, nargs=3, default=(128, 128, 128), help="training crop (BSF: 128^3)")
    g.add_argument("--batch-size", type=int, default=2, help="crops per step and process")
    g.add_argument("--loss", choices=sorted(LOSSES), default="dice", help="sigmoid Dice (BSF) or Dice + BCE")
    g.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap of the validation")
    add_model_args(parser)
    g = parser.add_argument_group("regularisation")
    g.add_argument("--dropout", type=float, default=0.0, help="dropout in the Swin blocks (paper ATLAS: 0.1)")
    add_run_args(parser, lr=1e-4, steps=30_000, warmup=500, weight_decay=1e-5)
    args = parser.parse_args(argv)
    check_run_args(args)
    args.channels = parse_channels(args.channels)
    if args.repeats < 1:
        raise InputError(f"--repeats must be at least 1, got {args.repeats}.")
    return args


@torch.no_grad()
def validate(model, samples, *, patch, target: str, brats_labels, overlap: float, device, amp: bool) -> dict:
    """Mean Dice of sigmoid > 0.5 per region over the validation cases (empty prediction and reference: 1)."""
    model.eval()
    scores = {name: [] for name in REGIONS[target]}
    for image, label in samples:
        probs = predict_probabilities(model, image, patch_size=patch, overlap=overlap, device=device, amp=amp)
        truth = segmentation_target(label, target, brats_labels) > 0.5
        for k, name in enumerate(REGIONS[target]):
            scores[name].append(dice(probs[k] > 0.5, truth[k]))
    model.train()
    means = {name: float(np.mean(v)) for name, v in scores.items()}
    return {**means, "mean": float(np.mean(list(means.values())))}


def train_repeat(args, repeat: int, train_cases, val_samples, arch: dict, init, dist_info) -> dict | None:
    """Train one repeat to the end (or to --stop-after); its validation Dice, or None if stopped early."""
    device = dist_info.device
    out = Path(args.out) / f"repeat_{repeat}"
    ckpt_path = check_fresh_out(out, args.resume)
    if args.resume and ckpt_path.exists():
        previous = load_checkpoint(ckpt_path, expect_kind=SEG_KIND)
        if previous["step"] == args.steps and "validation" in previous:
            return previous["validation"]  # this repeat already finished
    rng = seed_everything(args.seed + 1000 * repeat, rank=dist_info.rank)
    subset = few_shot_subset(train_cases, args.train_fraction, seed=args.seed + repeat)
    samples = [load_channels(c, args.channels, "zscore")[:2] for c in subset]
    cfg = SwinUNETRConfig(in_channels=len(args.channels), out_channels=len(REGIONS[args.target]),
                          drop_rate=args.dropout, use_checkpoint=args.checkpointing, **arch)  # fmt: skip
    model = build_swinunetr(cfg).to(device)
    resuming = args.resume and ckpt_path.exists()
    if init is not None and not resuming:
        init_encoder(model.swinViT, init, args, args.channels, dist_info.is_main)
    if dist_info.is_main:
        print(f"repeat {repeat}: {len(subset)} of {len(train_cases)} training cases "
              f"({', '.join(c.case_id for c in subset[:6])}{' ...' * (len(subset) > 6)})")  # fmt: skip
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    scaler = make_grad_scaler(device, pick_amp_dtype(device, enabled=args.amp))
    start = 0
    if resuming:
        start = int(restore_run(ckpt_path, kind=SEG_KIND, model=model, optimizer=optimizer, scaler=scaler,
                                generator=rng, device=device)["step"])  # fmt: skip
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    forward_model, raw_model = maybe_compile(wrap_ddp(model, dist_info), use_compile)
    logger = MetricsLogger(out / "log.csv", is_main=dist_info.is_main, start_step=start)
    loss_fn = LOSSES[args.loss]
    stop = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    total, t0, extra = 0.0, time.time(), {}

    forward_model.train()
    bar = tqdm(range(start, stop), desc=f"finetune r{repeat}", disable=not dist_info.is_main)
    for step in bar:
        lr = warmup_cosine_lr(step, args.steps, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y = segmentation_batch(samples, args.batch_size, args.patch, rng, args.target,
                                  brats_labels=tuple(args.brats_labels))  # fmt: skip
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast_context(device, enabled=args.amp):
            loss = loss_fn(forward_model(x).float(), y)
        check_finite_loss(loss, step, checkpoint_path=ckpt_path)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        total += float(loss.detach())
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % args.log_every == 0 or done == stop:
            count = done - max(start, (done - 1) // args.log_every * args.log_every)
            extra = {}
            if done == args.steps and val_samples and dist_info.is_main:
                extra["validation"] = validate(raw_model, val_samples, patch=args.patch, target=args.target,
                                               brats_labels=tuple(args.brats_labels), overlap=args.overlap,
                                               device=device, amp=args.amp)  # fmt: skip
            logger.log(step=done, lr=lr, loss=all_reduce_mean(total / count), seconds=time.time() - t0,
                       **{f"val_{k}": v for k, v in extra.get("validation", {}).items()})  # fmt: skip
            total, t0 = 0.0, time.time()
            rng_states = gather_rng_state(rng)
            if dist_info.is_main:
                save_run(ckpt_path, kind=SEG_KIND, model=raw_model, cfg=cfg, channels=args.channels,
                         optimizer=optimizer, scaler=scaler, step=done, args=args, rng=rng_states,
                         repeat=repeat, train_cases=[c.case_id for c in subset], **extra)  # fmt: skip
    if stop < args.steps:
        return None
    return extra.get("validation", {})


def main(argv=None) -> None:
    args = parse_args(argv)
    dist_info = init_distributed(args.device)
    train_cases, val_cases = split_labeled(args.data, args.fold, args.folds)
    val_samples = [load_channels(c, args.channels, "zscore")[:2] for c in val_cases] if dist_info.is_main else []
    arch, init = resolve_architecture(args)
    results = []
    for repeat in range(args.repeats):
        result = train_repeat(args, repeat, train_cases, val_samples, arch, init, dist_info)
        if result is None:
            if dist_info.is_main:
                print(f"stopped in repeat {repeat}; continue with --resume")
            break
        results.append(result)
        if dist_info.is_main and result:
            print(f"repeat {repeat}: validation Dice " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    if dist_info.is_main and len(results) == args.repeats and all(results):
        summary = {k: {"mean": float(np.mean([r[k] for r in results])), "std": float(np.std([r[k] for r in results])),
                       "repeats": [r[k] for r in results]} for k in results[0]}  # fmt: skip
        summary["train_fraction"] = args.train_fraction
        summary["init"] = args.init or "scratch"
        Path(args.out, "summary.json").write_text(json.dumps(summary, indent=2))
        print(f"validation Dice over {args.repeats} repeat(s): mean {summary['mean']['mean']:.4f} "
              f"+- {summary['mean']['std']:.4f} (written to {Path(args.out, 'summary.json')})")  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
