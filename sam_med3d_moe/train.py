"""Train the general SAM-Med3D (the general expert) with the official interactive recipe.

    python -m sam_med3d_moe.train --data DATASET_DIR [...] --config small --out runs/general
    python -m sam_med3d_moe.train --data ... --init turbo_state_dict.pt --config vit_b_ori --out runs/general

Each step draws crops balanced over the datasets, runs `--num-clicks` interaction steps (newest click + previous
low-res logits; one random and the last step mask-only) and sums the DiceCE losses. AdamW with the official
parameter groups: image encoder at --lr, prompt encoder and mask decoder at --lr / 10; cosine decay (the
official MultiStepLR [120, 180] is epoch-based). On the phantom demo this is the model trained on the
anatomical structures, i.e. the "original tasks".
"""

import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sam_med3d_moe.data import draw_batch
from sam_med3d_moe.interaction import InteractiveSam
from sam_med3d_moe.model import build_model
from sam_med3d_moe.train_common import (
    add_common_args,
    check_common_args,
    config_by_name,
    load_general,
    prepare_data,
    resume_run,
    sam_config_dict,
    save_run,
)
from shared.cli import run_cli
from shared.errors import InputError
from shared.harness import (
    MetricsLogger,
    all_reduce_mean,
    autocast_context,
    check_finite_loss,
    cosine_lr,
    gather_rng_state,
    init_distributed,
    make_grad_scaler,
    maybe_compile,
    pick_amp_dtype,
    seed_everything,
    wrap_ddp,
)

KIND = "sam_med3d"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("model")
    g.add_argument(
        "--config", default="small", help="architecture: vit_b_ori (official), small (CPU demos) or tiny (tests)"
    )
    g.add_argument("--init", help="start from these weights (a run of this package or a converted state_dict)")
    add_common_args(parser, lr=8e-4, steps=2000)
    args = parser.parse_args(argv)
    check_common_args(args)
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    dist_info = init_distributed(args.device)
    device = dist_info.device
    rng = seed_everything(args.seed, rank=dist_info.rank)
    out = Path(args.out)
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not args.resume:
        raise InputError(f"--out {out} already holds a checkpoint; pass --resume to continue it or pick a new folder.")

    samples = prepare_data(args, out, is_main=dist_info.is_main)
    if args.init:
        model, _ = load_general(args.init, config=args.config)
    else:
        model = build_model(config_by_name(args.config))
    model = model.to(device).train()
    if dist_info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"general SAM-Med3D ({n_params / 1e6:.2f} M parameters) on {len(samples)} targets")
    groups = [
        {"params": model.image_encoder.parameters(), "scale": 1.0},
        {"params": model.prompt_encoder.parameters(), "scale": 0.1},
        {"params": model.mask_decoder.parameters(), "scale": 0.1},
    ]
    optimizer = torch.optim.AdamW(groups, lr=args.lr, betas=(0.9, 0.999), weight_decay=args.weight_decay)
    amp_dtype = pick_amp_dtype(device, enabled=args.amp)
    scaler = make_grad_scaler(device, amp_dtype)
    start = 0
    if args.resume and ckpt_path.exists():
        start = resume_run(
            ckpt_path, kind=KIND, model=model, optimizer=optimizer, scaler=scaler, generator=rng, device=device
        )
        if dist_info.is_main:
            print(f"resumed {ckpt_path} at step {start}")
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    encode, _ = maybe_compile(model.image_encoder, use_compile)
    # box embeddings and the mask-only steps leave some parameters without gradient in some steps
    forward_model = wrap_ddp(InteractiveSam(model, encode=encode), dist_info, find_unused_parameters=True)
    logger = MetricsLogger(out / "log.csv", is_main=dist_info.is_main, start_step=start)
    stop = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    protocol = dict(num_clicks=args.num_clicks, box_prob=args.box_prob, jitter=args.jitter, ce=not args.dice_only)

    bar = tqdm(range(start, stop), desc="general", disable=not dist_info.is_main, leave=False)
    t0, running, count = time.time(), 0.0, 0
    for step in bar:
        lr = cosine_lr(step, args.steps, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["scale"]
        image, gt, _ = draw_batch(samples, args.batch_size, model.cfg.image_size, rng)
        image, gt = image.to(device), gt.to(device)
        with autocast_context(device, enabled=args.amp):
            loss, _ = forward_model(image, gt, rng, **protocol)
        check_finite_loss(loss, step, checkpoint_path=ckpt_path if ckpt_path.exists() else None)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        per_click = float(loss.detach()) / args.num_clicks
        running, count = running + per_click, count + 1
        bar.set_postfix(loss=f"{per_click:.4f}")
        done = step + 1
        if done % args.save_every == 0 or done == stop:
            mean = all_reduce_mean(running / count)
            logger.log(step=done, lr=lr, loss_per_click=mean, seconds=time.time() - t0)
            rng_states = gather_rng_state(rng)
            if dist_info.is_main:
                print(f"step {done}/{args.steps}: loss per click {mean:.4f}, lr {lr:.2e} ({time.time() - t0:.0f} s)")
                save_run(
                    ckpt_path,
                    kind=KIND,
                    model=model,
                    config={"sam": sam_config_dict(model.cfg)},
                    optimizer=optimizer,
                    scaler=scaler,
                    step=done,
                    args=args,
                    rng=rng_states,
                    box_trained=True,
                )
            running, count = 0.0, 0


if __name__ == "__main__":
    run_cli(main)
