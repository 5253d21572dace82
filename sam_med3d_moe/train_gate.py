"""Assemble SAM-Med3D-MoE and train its gating network (paper Sec. 2.2 and 3).

    python -m sam_med3d_moe.train_gate --general runs/general/checkpoint.pt \
        --experts runs/expert_lesion/checkpoint.pt --data ANATOMY_DIR LESION_DIR --out runs/moe

Shared frozen image and prompt encoders and the frozen general decoder come from --general; expert k's decoder
from --experts[k]. Each step runs the interaction with the MoE (`SamMed3DMoE.step`: general decoder, gate,
top-1 expert, mask selector) and minimises, summed over the clicks, DiceCE of the fused mask + cross-entropy of
the gate on the task identity (class k + 1 for expert k's task, 0 for any other dataset). Only the top-1 expert
of each sample receives a gradient (paper: lr 1e-4 experts, 1e-6 gate, AdamW; --expert-lr 0 freezes the experts).
"""

import argparse
import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sam_med3d_moe.config import SELECTOR_MODES, GateConfig
from sam_med3d_moe.data import draw_batch
from sam_med3d_moe.interaction import train_interaction
from sam_med3d_moe.losses import gate_loss
from sam_med3d_moe.model import build_model, load_weights
from sam_med3d_moe.moe import SamMed3DMoE
from sam_med3d_moe.train_common import (
    add_common_args,
    check_common_args,
    load_general,
    prepare_data,
    read_run,
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

KIND = "sam_med3d_moe"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("MoE")
    g.add_argument("--general", required=True, help="general model (sam_med3d_moe.train run or converted state_dict)")
    g.add_argument("--config", default="vit_b_ori", help="architecture of a plain state_dict: vit_b_ori, small or tiny")
    g.add_argument("--experts", nargs="+", required=True, help="sam_med3d_moe.finetune_expert checkpoints")
    g.add_argument("--gate-lr", type=float, default=1e-6, help="AdamW lr of the gate (paper: 1e-6)")
    g.add_argument("--expert-lr", type=float, default=1e-4, help="AdamW lr of the experts (paper: 1e-4; 0 freezes)")
    g.add_argument("--tau", type=float, default=0.5, help="selector threshold on the top expert score")
    g.add_argument("--selector", choices=SELECTOR_MODES, default="weighted", help="mask selector (Table 2 variants)")
    add_common_args(parser, lr=1e-4, steps=1000)
    args = parser.parse_args(argv)
    check_common_args(args)
    if args.gate_lr <= 0 or args.expert_lr < 0:
        raise InputError(
            f"--gate-lr must be positive and --expert-lr non-negative, got {args.gate_lr}, {args.expert_lr}."
        )
    return args


def assemble(general_path, expert_paths, config: str, tau: float, selector: str) -> SamMed3DMoE:
    """Build the MoE from a general model and expert runs (each expert's mask decoder and task name)."""
    sam, info = load_general(general_path, config=config)
    experts, tasks = [], []
    for path in expert_paths:
        ckpt = read_run(path, expect_kind="sam_med3d_expert")
        if ckpt["config"]["sam"] != sam_config_dict(sam.cfg):
            raise InputError(f"--experts {path}: its architecture differs from the general model's.")
        weights = ckpt["model"]
        decoder = build_model(sam.cfg).mask_decoder
        prefix = "mask_decoder."
        load_weights(decoder, {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}, str(path))
        key = "prompt_encoder.box_corner_embeddings.weight"
        if not info["box_trained"] and ckpt.get("trained_box") and key in weights:
            # the general model's boxes were never trained: take the corner embeddings of this expert
            sam.prompt_encoder.box_corner_embeddings.weight.data.copy_(weights[key])
            info["box_trained"] = True
        experts.append(decoder)
        tasks.append(ckpt["config"]["task"])
    try:
        gate_cfg = GateConfig(tasks=tuple(tasks), dim=sam.cfg.prompt_dim, tau=tau, selector=selector)
    except ValueError as err:
        raise InputError(f"--experts/--tau/--selector: {err}.") from err
    return SamMed3DMoE(sam, experts, gate_cfg)


class InteractiveMoE(torch.nn.Module):
    """The MoE run through the training interaction in one forward: (summed DiceCE, summed gate CE)."""

    def __init__(self, moe: SamMed3DMoE) -> None:
        super().__init__()
        self.moe = moe

    def forward(self, image, gt, target, rng: np.random.Generator, **protocol):
        with torch.no_grad():  # the image encoder is frozen
            emb = self.moe.sam.image_encoder(image)
        gate_logits = []

        def step(points=None, boxes=None, masks=None):
            out = self.moe.step(emb, points=points, boxes=boxes, masks=masks)
            gate_logits.append(out["logits"])
            return out["fused"]

        seg, _ = train_interaction(step, gt, rng, self.moe.sam.cfg, mask_only_steps=False, **protocol)
        return seg, sum(gate_loss(logits, target) for logits in gate_logits)


def main(argv=None) -> None:
    args = parse_args(argv)
    dist_info = init_distributed(args.device)
    device = dist_info.device
    rng = seed_everything(args.seed, rank=dist_info.rank)
    out = Path(args.out)
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not args.resume:
        raise InputError(f"--out {out} already holds a checkpoint; pass --resume to continue it or pick a new folder.")

    moe = assemble(args.general, args.experts, args.config, args.tau, args.selector)
    samples = prepare_data(args, out, is_main=dist_info.is_main)
    tasks = moe.gate_cfg.tasks
    if not any(s.task in tasks for s in samples):
        raise InputError(f"--data holds no dataset of the experts' tasks {list(tasks)}.")
    moe.requires_grad_(False)
    moe.gate.requires_grad_(True)
    groups = [{"params": list(moe.gate.parameters()), "lr": args.gate_lr}]
    if args.expert_lr > 0:
        moe.experts.requires_grad_(True)
        groups.append({"params": list(moe.experts.parameters()), "lr": args.expert_lr})
    moe = moe.to(device).train()
    trainable = [p for g in groups for p in g["params"]]
    if dist_info.is_main:
        print(
            f"MoE: general + {len(tasks)} experts {list(tasks)}, gate over {moe.gate_cfg.num_classes} classes, "
            f"{sum(p.numel() for p in trainable) / 1e6:.2f} M trainable parameters, {len(samples)} targets"
        )
    optimizer = torch.optim.AdamW(groups, weight_decay=args.weight_decay)
    amp_dtype = pick_amp_dtype(device, enabled=args.amp)
    scaler = make_grad_scaler(device, amp_dtype)
    start = 0
    if args.resume and ckpt_path.exists():
        start = resume_run(
            ckpt_path, kind=KIND, model=moe, optimizer=optimizer, scaler=scaler, generator=rng, device=device
        )
    forward_model = wrap_ddp(InteractiveMoE(moe), dist_info, find_unused_parameters=True)
    logger = MetricsLogger(out / "log.csv", is_main=dist_info.is_main, start_step=start)
    stop = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    protocol = dict(num_clicks=args.num_clicks, box_prob=args.box_prob, jitter=args.jitter, ce=not args.dice_only)
    config = {"sam": sam_config_dict(moe.sam.cfg), "gate": dataclasses.asdict(moe.gate_cfg)}

    bar = tqdm(range(start, stop), desc="gate", disable=not dist_info.is_main, leave=False)
    t0, sums, count = time.time(), np.zeros(3), 0
    for step in bar:
        image, gt, picked = draw_batch(samples, args.batch_size, moe.sam.cfg.image_size, rng)
        target = torch.tensor([tasks.index(t) + 1 if t in tasks else 0 for t in picked], device=device)
        image, gt = image.to(device), gt.to(device)
        with autocast_context(device, enabled=args.amp):
            seg, ce = forward_model(image, gt, target, rng, **protocol)
            loss = seg + ce
        check_finite_loss(loss, step, checkpoint_path=ckpt_path if ckpt_path.exists() else None)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, args.clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        sums += np.array([float(loss.detach()), float(seg.detach()), float(ce.detach())]) / args.num_clicks
        count += 1
        done = step + 1
        if done % args.save_every == 0 or done == stop:
            means = [all_reduce_mean(v / count) for v in sums]
            logger.log(step=done, loss_per_click=means[0], seg=means[1], gate_ce=means[2], seconds=time.time() - t0)
            rng_states = gather_rng_state(rng)
            if dist_info.is_main:
                print(
                    f"step {done}/{args.steps}: loss per click {means[0]:.4f} (DiceCE {means[1]:.4f}, gate CE "
                    f"{means[2]:.4f}) ({time.time() - t0:.0f} s)"
                )
                save_run(
                    ckpt_path,
                    kind=KIND,
                    model=moe,
                    config=config,
                    optimizer=optimizer,
                    scaler=scaler,
                    step=done,
                    args=args,
                    rng=rng_states,
                )
            sums, count = np.zeros(3), 0


if __name__ == "__main__":
    run_cli(main)
