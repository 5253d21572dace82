"""Assemble SAM-Med3D-MoE and train its gating network (paper Sec. 2.2 and 3).

    python -m sam_med3d_moe.train_gate --general runs/general/checkpoint.pt \
        --experts runs/expert_lesion/checkpoint.pt --data ANATOMY_DIR LESION_DIR --out runs/moe

Shared frozen image and prompt encoders and the frozen general decoder come from --general; expert k's decoder
and its own box-corner embeddings from --experts[k], which must have been fine-tuned from that general model.
Each step runs the interaction with the MoE (`SamMed3DMoE.step`: general decoder, gate, top-1 expert, mask
selector) and minimises, summed over the clicks, DiceCE of the fused mask + cross-entropy of the gate on the
task identity (the two summed 1:1; the paper gives no weighting): class k + 1 for a target that expert k was
fine-tuned on (its datasets and, if it was trained with --labels, only those label values;
`tasks.expected_expert`), 0 for every other target. The gate re-decides at every click from that click's prompt
alone. No mask-only steps (the official recipe's point-free steps): the gate needs a point or box token.

Experts frozen or trained (--expert-lr): the paper contradicts itself. Its abstract ("without updating any
parameters of them") and Sec. 3.1 ("by only training the gating network") freeze the experts; its implementation
details ("confining updates exclusively to the parameters of the Top-1 expert mask decoder", lr 1e-4) train them.
Default --expert-lr 0: experts frozen, so the MoE's expert k is bit-identical to the expert run it was assembled
from. With --expert-lr > 0 (the implementation-details reading, paper 1e-4) an expert is stepped only in a step
where the selector used it for some sample (its top-1 expert with s_top > tau): the other experts' gradients are
set to None before the step, so AdamW neither decays them nor moves them by momentum, and the experts' weight
decay is 0. The gate: AdamW, lr 1e-6 in the paper, --weight-decay. The checkpoint records, per decoder, whether
its box embeddings were trained.
"""

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from sam_med3d_moe.config import CONFIG_NAMES, SELECTOR_MODES, GateConfig, config_by_name
from sam_med3d_moe.data import click_rng
from sam_med3d_moe.interaction import train_interaction
from sam_med3d_moe.losses import gate_loss
from sam_med3d_moe.model import build_model, load_sam, load_weights
from sam_med3d_moe.moe import SamMed3DMoE
from sam_med3d_moe.tasks import ExpertTask, check_disjoint, expected_expert
from sam_med3d_moe.train_common import (
    add_common_args,
    batches,
    check_common_args,
    prepare_data,
    read_run,
    resume_step,
    sam_config_dict,
    save_run,
    threshold,
)
from shared.checkpoint import prepare_run_dir
from shared.cli import make_parser, non_negative_float, positive_float, run_cli
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
    parser = make_parser(__doc__)
    g = parser.add_argument_group("MoE")
    g.add_argument("--general", required=True, help="general model (sam_med3d_moe.train run or converted state_dict)")
    g.add_argument("--config", choices=CONFIG_NAMES, default="vit_b_ori", help="architecture of a plain state_dict")
    g.add_argument("--experts", nargs="+", required=True, help="sam_med3d_moe.finetune_expert checkpoints")
    g.add_argument("--gate-lr", type=positive_float, default=1e-6, help="AdamW lr of the gate (paper: 1e-6)")
    g.add_argument(
        "--expert-lr",
        type=non_negative_float,
        default=0.0,
        help="AdamW lr of the experts (default 0: frozen, "
        "the paper's abstract and Sec. 3.1; its implementation details: 1e-4, the top-1 expert only)",
    )
    g.add_argument("--tau", type=threshold, default=0.5, help="selector threshold on the top expert score")
    g.add_argument("--selector", choices=SELECTOR_MODES, default="weighted", help="mask selector (Table 2 variants)")
    add_common_args(parser, lr=None, steps=1000)  # two learning rates: --gate-lr and --expert-lr
    args = parser.parse_args(argv)
    check_common_args(args)
    return args


BOX_KEY = "prompt_encoder.box_corner_embeddings.weight"


def check_fine_tuned_from(expert_weights: dict, general_weights: dict, expert_path, general_path) -> None:
    """Refuse an expert whose frozen parts (image encoder, prompt encoder except the box corners, which an expert
    may train) differ from the general model's: it was fine-tuned from another model."""
    for key, value in general_weights.items():
        if key.startswith("mask_decoder.") or key == BOX_KEY:
            continue
        if key not in expert_weights or not torch.equal(expert_weights[key].cpu(), value.cpu()):
            raise InputError(
                f"--experts {expert_path} was not fine-tuned from --general {general_path}: {key} differs."
            )


def assemble(general_path, expert_paths, config: str, tau: float, selector: str) -> tuple[SamMed3DMoE, dict]:
    """Build the MoE from a general model and expert runs (each expert's mask decoder, box-corner embeddings and
    task).

    Returns:
        the MoE and {"expert_tasks": [ExpertTask], "box_trained": {"general": bool, "experts": [bool]}}.
    """
    sam, info = load_sam(general_path, config_by_name(config))
    general_weights = sam.state_dict()
    experts, tasks, boxes, box_trained = [], [], [], []
    for path in expert_paths:
        ckpt = read_run(path, "sam_med3d_expert", hint="pass the checkpoint.pt of a sam_med3d_moe.finetune_expert run")
        if ckpt["config"]["sam"] != sam_config_dict(sam.cfg):
            raise InputError(f"--experts {path}: its architecture differs from the general model's.")
        weights = ckpt["model"]
        check_fine_tuned_from(weights, general_weights, path, general_path)
        decoder = build_model(sam.cfg).mask_decoder
        prefix = "mask_decoder."
        load_weights(decoder, {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}, str(path))
        experts.append(decoder)
        boxes.append(weights.get(BOX_KEY))
        box_trained.append(bool(ckpt.get("box_trained", False)))
        if "expert_task" not in ckpt["config"]:
            raise InputError(f"--experts {path}: records no task; fine-tune it again with this version.")
        tasks.append(ExpertTask.from_dict(ckpt["config"]["expert_task"]))
    check_disjoint(tasks, [str(p) for p in expert_paths])
    try:
        gate_cfg = GateConfig(tasks=tuple(t.name for t in tasks), dim=sam.cfg.prompt_dim, tau=tau, selector=selector)
    except ValueError as err:
        raise InputError(f"--experts/--tau/--selector: {err}.") from err
    moe = SamMed3DMoE(sam, experts, gate_cfg)
    if moe.expert_boxes is not None:
        for k, weight in enumerate(boxes):  # each expert keeps the box embeddings it was fine-tuned with
            moe.expert_boxes[k].weight.data.copy_(weight)
    return moe, {"expert_tasks": tasks, "box_trained": {"general": info["box_trained"], "experts": box_trained}}


def optimizer_groups(moe: SamMed3DMoE, gate_lr: float, expert_lr: float, weight_decay: float) -> list[dict]:
    """AdamW parameter groups: the gate (lr `gate_lr`, `weight_decay`), and with `expert_lr` > 0 the experts
    (lr `expert_lr`, weight decay 0: an expert must change only through its own gradient). Sets requires_grad:
    everything else (encoders, general decoder, box embeddings) frozen."""
    moe.requires_grad_(False)
    moe.gate.requires_grad_(True)
    groups = [{"params": list(moe.gate.parameters()), "lr": gate_lr, "weight_decay": weight_decay}]
    if expert_lr > 0:
        moe.experts.requires_grad_(True)
        groups.append({"params": list(moe.experts.parameters()), "lr": expert_lr, "weight_decay": 0.0})
    return groups


def drop_unchosen_grads(experts: torch.nn.ModuleList, chosen: torch.Tensor) -> None:
    """Set to None the gradients of every expert `chosen` (K,) bool marks False, so that the optimizer step skips
    it (a zero gradient would still move it through AdamW's momentum)."""
    for k, expert in enumerate(experts):
        if not bool(chosen[k]):
            for p in expert.parameters():
                p.grad = None


class InteractiveMoE(torch.nn.Module):
    """The MoE run through the training interaction in one forward: (summed DiceCE, summed gate CE). `chosen`
    (K,) bool: the experts the selector used for some sample at some click of the last forward."""

    def __init__(self, moe: SamMed3DMoE) -> None:
        super().__init__()
        self.moe = moe
        self.chosen = torch.zeros(len(moe.experts), dtype=torch.bool)

    def forward(self, image, gt, target, rng: np.random.Generator, **protocol):
        with torch.no_grad():  # the image encoder is frozen
            emb = self.moe.sam.image_encoder(image)
        gate_logits = []
        chosen = torch.zeros(len(self.moe.experts), dtype=torch.bool, device=emb.device)

        def step(points=None, boxes=None, masks=None):
            out = self.moe.step(emb, points=points, boxes=boxes, masks=masks)
            gate_logits.append(out["logits"])
            chosen[out["top_index"][out["uses_expert"]]] = True
            return out["fused"]

        # no mask-only steps: the gate needs a point or box token at every step
        seg, _ = train_interaction(step, gt, rng, self.moe.sam.cfg, mask_only_steps=False, **protocol)
        self.chosen = chosen
        return seg, sum(gate_loss(logits, target) for logits in gate_logits)


def main(argv=None) -> None:
    args = parse_args(argv)
    dist_info = init_distributed(args.device)
    device = dist_info.device
    rng = seed_everything(args.seed, rank=dist_info.rank)
    out = Path(args.out)
    ckpt_path = out / "checkpoint.pt"
    resumed = prepare_run_dir(out, resume=args.resume, args=args, kind=KIND, is_main=dist_info.is_main)

    moe, info = assemble(args.general, args.experts, args.config, args.tau, args.selector)
    expert_tasks = info["expert_tasks"]
    entries, targets = prepare_data(args, out, is_main=dist_info.is_main)
    # the gate target of each target: the expert fine-tuned on its class, else 0 (the general expert)
    expert_of = torch.tensor([expected_expert(expert_tasks, t.dataset, t.label) for t in targets])
    if not expert_of.any():
        raise InputError(f"--data holds no target of the experts' tasks {[t.name for t in expert_tasks]}.")
    groups = optimizer_groups(moe, args.gate_lr, args.expert_lr, args.weight_decay)
    moe = moe.to(device).train()
    trainable = [p for g in groups for p in g["params"]]
    if dist_info.is_main:
        print(
            f"MoE: general + {len(expert_tasks)} experts {list(moe.gate_cfg.tasks)}, gate over "
            f"{moe.gate_cfg.num_classes} classes, "
            f"{sum(p.numel() for p in trainable) / 1e6:.2f} M trainable parameters, {len(targets)} targets"
        )
    optimizer = torch.optim.AdamW(groups)
    amp_dtype = pick_amp_dtype(device, enabled=args.amp)
    scaler = make_grad_scaler(device, amp_dtype)
    start = resume_step(resumed, kind=KIND, model=moe, optimizer=optimizer, scaler=scaler, generator=rng, device=device)
    interactive = InteractiveMoE(moe)
    forward_model = wrap_ddp(interactive, dist_info, find_unused_parameters=True)
    logger = MetricsLogger(out / "log.csv", is_main=dist_info.is_main, start_step=start)
    stop = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    protocol = dict(num_clicks=args.num_clicks, box_prob=args.box_prob, jitter=args.jitter, ce=not args.dice_only)
    config = {
        "sam": sam_config_dict(moe.sam.cfg),
        "gate": dataclasses.asdict(moe.gate_cfg),
        "expert_tasks": [t.to_dict() for t in expert_tasks],
    }

    stream = batches(args, entries, targets, moe.sam.cfg.image_size, dist_info.rank, start, stop, device)
    bar = tqdm(zip(range(start, stop), stream), total=stop - start, desc="gate", disable=not dist_info.is_main,
               leave=False)  # fmt: skip
    t0, sums, count = time.time(), np.zeros(3), 0
    for step, batch in bar:
        image, gt = batch["image"].to(device), batch["label"][:, None].to(device, torch.float32)
        target = expert_of[batch["target"].cpu()].to(device)
        with autocast_context(device, enabled=args.amp):
            seg, ce = forward_model(image, gt, target, click_rng(args.seed, dist_info.rank, step), **protocol)
            loss = seg + ce
        check_finite_loss(loss, step, checkpoint_path=ckpt_path if ckpt_path.exists() else None)
        scaler.scale(loss).backward()
        if args.expert_lr > 0:  # step only the experts some sample of some rank used
            drop_unchosen_grads(moe.experts, all_reduce_mean(interactive.chosen.float()) > 0)
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
                    box_trained=info["box_trained"],
                )
            sums, count = np.zeros(3), 0


if __name__ == "__main__":
    run_cli(main)
