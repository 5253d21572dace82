"""Fine-tune a task expert: a copy of the general mask decoder trained on one new task, encoders frozen
(paper Sec. 2.1 "Finetune Expert Decoders", Sec. 3: AdamW, lr 1e-4).

    python -m sam_med3d_moe.finetune_expert --general runs/general/checkpoint.pt --data LESION_DATASET \
        --union --out runs/expert_lesion

The image encoder and the prompt encoder stay frozen; only the decoder copy (and, with --train-box, the new
box-corner embeddings) is trained with the interactive recipe. The checkpoint holds the whole fine-tuned model,
which is the "FT-expert" row of the paper's Table 1, and names its task: the first --data folder.
"""

import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

from sam_med3d_moe.data import draw_batch
from sam_med3d_moe.interaction import InteractiveSam
from sam_med3d_moe.train_common import (
    add_common_args,
    check_common_args,
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
    gather_rng_state,
    init_distributed,
    make_grad_scaler,
    pick_amp_dtype,
    seed_everything,
    wrap_ddp,
)

KIND = "sam_med3d_expert"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("expert")
    g.add_argument(
        "--general", required=True, help="general model: a sam_med3d_moe.train run or a converted official state_dict"
    )
    g.add_argument("--config", default="vit_b_ori", help="architecture of a plain state_dict: vit_b_ori, small or tiny")
    g.add_argument(
        "--train-box",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train the box-corner embeddings too (default: only if the general model never trained them)",
    )
    add_common_args(parser, lr=1e-4, steps=1000)
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
    task = Path(args.data[0]).name  # the gate recognises a task by its dataset folder

    samples = prepare_data(args, out, is_main=dist_info.is_main)
    model, info = load_general(args.general, config=args.config)
    train_box = (not info["box_trained"]) if args.train_box is None else args.train_box
    model.requires_grad_(False)
    model.mask_decoder.requires_grad_(True)
    box = model.prompt_encoder.box_corner_embeddings
    if train_box and box is not None:
        box.requires_grad_(True)
    model = model.to(device).train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    if dist_info.is_main:
        print(
            f"expert for task {task}: {sum(p.numel() for p in trainable) / 1e6:.2f} M trainable parameters "
            f"(box embeddings {'trained' if train_box else 'frozen'}) on {len(samples)} targets"
        )
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    amp_dtype = pick_amp_dtype(device, enabled=args.amp)
    scaler = make_grad_scaler(device, amp_dtype)
    start = 0
    if args.resume and ckpt_path.exists():
        start = resume_run(
            ckpt_path, kind=KIND, model=model, optimizer=optimizer, scaler=scaler, generator=rng, device=device
        )
    forward_model = wrap_ddp(InteractiveSam(model, frozen_encoder=True), dist_info, find_unused_parameters=True)
    logger = MetricsLogger(out / "log.csv", is_main=dist_info.is_main, start_step=start)
    stop = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    protocol = dict(num_clicks=args.num_clicks, box_prob=args.box_prob, jitter=args.jitter, ce=not args.dice_only)

    bar = tqdm(range(start, stop), desc=f"expert {task}", disable=not dist_info.is_main, leave=False)
    t0, running, count = time.time(), 0.0, 0
    for step in bar:
        lr = args.lr  # constant, as the paper
        image, gt, _ = draw_batch(samples, args.batch_size, model.cfg.image_size, rng)
        image, gt = image.to(device), gt.to(device)
        with autocast_context(device, enabled=args.amp):
            loss, _ = forward_model(image, gt, rng, **protocol)
        check_finite_loss(loss, step, checkpoint_path=ckpt_path if ckpt_path.exists() else None)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, args.clip)
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
                print(f"step {done}/{args.steps}: loss per click {mean:.4f} ({time.time() - t0:.0f} s)")
                save_run(
                    ckpt_path,
                    kind=KIND,
                    model=model,
                    config={"sam": sam_config_dict(model.cfg), "task": task},
                    optimizer=optimizer,
                    scaler=scaler,
                    step=done,
                    args=args,
                    rng=rng_states,
                    general=str(args.general),
                    box_trained=bool(train_box or info["box_trained"]),
                    trained_box=bool(train_box),
                )
            running, count = 0.0, 0


if __name__ == "__main__":
    run_cli(main)
