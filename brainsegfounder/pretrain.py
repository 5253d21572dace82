"""BrainSegFounder self-supervised pretraining, Stage 1 (unlabelled healthy brains) and Stage 2 (target data).

    python -m brainsegfounder.pretrain --data UKB_DIR --channels T1 FLAIR --out runs/stage1
    python -m brainsegfounder.pretrain --data BRATS_DIR --channels FLAIR T1ce T1 T2 \
        --init runs/stage1/checkpoint.pt --out runs/stage2

Each step draws `--batch-size` volumes x `--crops` random crops, makes two rotated + cut-out views of each
crop and trains the SSL head on rotation CE + NT-Xent (t = 0.5) + L1 inpainting (Tang et al. Eq. 4, weights 1).
Stage 2 (`--init`) starts from the Stage-1 encoder with channel adaptation by modality name; the SSL heads
start fresh. Modality restriction (paper Table 5): `--channels T1 T1` in both stages.
"""

import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

from brainsegfounder.augment import two_views
from brainsegfounder.common import (
    SSL_KIND,
    add_model_args,
    add_run_args,
    check_fresh_out,
    check_run_args,
    init_encoder,
    resolve_architecture,
    save_run,
)
from brainsegfounder.data import load_channels, parse_channels, ssl_batch, unlabeled_cases
from brainsegfounder.losses import ssl_loss
from brainsegfounder.ssl_head import SSLConfig, build_ssl_head
from shared.checkpoint import restore_run
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


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("data")
    g.add_argument("--data", nargs="+", required=True, help="nnU-Net raw dataset folders (labels are not used)")
    g.add_argument("--channels", nargs="+", required=True,
                   help="input modalities in channel order; repeat one to feed it to several channels")  # fmt: skip
    g.add_argument("--intensity", choices=("percentile", "ct", "zscore"), default="percentile",
                   help="intensity scaling (official code: ct, a CT window applied to MRI)")  # fmt: skip
    g.add_argument("--patch", type=int, nargs=3, default=(96, 96, 96), help="crop size (paper: 96^3)")
    g.add_argument("--batch-size", type=int, default=1, help="volumes per step and process")
    g.add_argument("--crops", type=int, default=2, help="random crops per volume (official sw_batch_size: 2)")
    g.add_argument("--temperature", type=float, default=0.5, help="NT-Xent temperature")
    add_model_args(parser)
    add_run_args(parser, lr=4e-4, steps=100_000, warmup=500, weight_decay=0.1)
    args = parser.parse_args(argv)
    check_run_args(args)
    args.channels = parse_channels(args.channels)
    if args.crops < 1 or args.batch_size * args.crops < 2:
        raise InputError(f"--batch-size x --crops must be at least 2 (contrastive negatives), got "
                         f"{args.batch_size} x {args.crops}.")  # fmt: skip
    if len(set(args.patch[1:])) != 1 or max(args.patch) < 64:
        raise InputError(f"--patch {args.patch}: the last two sides must be equal (90-degree rotations) and one "
                         f"side at least 64 (two bottleneck tokens).")  # fmt: skip
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    dist_info = init_distributed(args.device)
    device = dist_info.device
    rng = seed_everything(args.seed, rank=dist_info.rank)
    out = Path(args.out)
    ckpt_path = check_fresh_out(out, args.resume)

    cases = unlabeled_cases(args.data, args.channels)
    volumes = [load_channels(c, args.channels, args.intensity)[0] for c in tqdm(cases, desc="load", disable=None)]
    arch, init = resolve_architecture(args)
    cfg = SSLConfig(in_channels=len(args.channels), use_checkpoint=args.checkpointing, **arch)
    model = build_ssl_head(cfg).to(device)
    resuming = args.resume and ckpt_path.exists()
    if init is not None and not resuming:
        init_encoder(model.swinViT, init, args, args.channels, dist_info.is_main)
    if dist_info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"SSL pretraining: {n_params:,} parameters, {len(volumes)} volumes, channels {args.channels}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    amp_dtype = pick_amp_dtype(device, enabled=args.amp)
    scaler = make_grad_scaler(device, amp_dtype)
    start = 0
    if resuming:
        start = int(restore_run(ckpt_path, kind=SSL_KIND, model=model, optimizer=optimizer, scaler=scaler,
                                generator=rng, device=device)["step"])  # fmt: skip
        if dist_info.is_main:
            print(f"resumed {ckpt_path} at step {start}")
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    forward_model, raw_model = maybe_compile(wrap_ddp(model, dist_info), use_compile)
    logger = MetricsLogger(out / "log.csv", is_main=dist_info.is_main, start_step=start)
    stop = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    sums, t0 = {"loss": 0.0, "inpaint": 0.0, "contrast": 0.0, "rotation": 0.0}, time.time()

    forward_model.train()
    bar = tqdm(range(start, stop), desc="pretrain", disable=not dist_info.is_main)
    for step in bar:
        lr = warmup_cosine_lr(step, args.steps, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        crops = ssl_batch(volumes, args.batch_size, args.crops, args.patch, rng)  # (N, C, *patch)
        views = {k: v.to(device, non_blocking=True) for k, v in two_views(crops, rng).items()}
        n = crops.shape[0]
        with autocast_context(device, enabled=args.amp):
            rot_logits, z, reconstruction = forward_model(views["inputs"])  # both views in one (2N, ...) batch
            losses = ssl_loss(rot_logits.float(), views["labels"], z[:n].float(), z[n:].float(),
                              reconstruction.float(), views["targets"], temperature=args.temperature)  # fmt: skip
        loss = losses["loss"]
        check_finite_loss(loss, step, checkpoint_path=ckpt_path)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        for key in sums:
            sums[key] += float(losses[key].detach())
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        if done % args.log_every == 0 or done == stop:
            count = done - max(start, (done - 1) // args.log_every * args.log_every)
            means = {k: all_reduce_mean(v / count) for k, v in sums.items()}
            logger.log(step=done, lr=lr, seconds=time.time() - t0, **means)
            sums, t0 = dict.fromkeys(sums, 0.0), time.time()
            rng_states = gather_rng_state(rng)
            if dist_info.is_main:
                save_run(ckpt_path, kind=SSL_KIND, model=raw_model, cfg=cfg, channels=args.channels,
                         optimizer=optimizer, scaler=scaler, step=done, args=args, rng=rng_states)  # fmt: skip
    if dist_info.is_main:
        print(f"saved {ckpt_path} at step {stop}")


if __name__ == "__main__":
    run_cli(main)
