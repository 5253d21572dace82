"""MoME phase 2: joint training of the experts and the hierarchical gate with the curriculum loss (Eq. 2).

    python -m mome.train --data DATASET_DIR [DATASET_DIR ...] --experts T1.pt T1ce.pt T2.pt FLAIR.pt DWI.pt \
        --out runs/mome

Every channel of every case is one single-modality sample; its modality picks the expert that the
specialisation term of Eq. 2 supervises. Table 3 ablations: `--random-experts` (no phase 1),
`--no-curriculum` (Eq. 4 only), `--gate basic` (no hierarchy: our reading of the paper's "basic
gating without hierarchical structure" is the finest gate map area-pooled to every coarser level; the
paper does not define it further).

Eq. 2's expert term is summed over the batch, as the official code does (it applies the loss per sample),
while L_MoME is a batch mean, so with batch B the expert term weighs B times more than a mean would;
`--expert-reduction mean` averages it instead (not in the paper or the official code).

Options for short schedules (not in the paper; the defaults are the official behaviour): `--transfer-heads`,
`--gate-init uniform`, `--gate-maps shared`, `--gate-lr` and `--gate-optimizer adam`.
"""

import time
from pathlib import Path

import torch
from tqdm import tqdm

from mome.data import prepare_data, training_batch_iterator
from mome.losses import curriculum_loss
from mome.model import build_mome
from mome.nnunet_import import load_checked, plain_state_dict, read_nnunet_checkpoint
from mome.train_common import (
    add_common_args,
    check_common_args,
    config_from_args,
    last_epoch,
    save_run,
)
from shared.checkpoint import load_checkpoint, prepare_run_dir, restore_run
from shared.cli import make_parser, positive_float, run_cli
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
    poly_lr,
    seed_everything,
    wrap_ddp,
)
from shared.splits import write_split

KIND = "mome"


def parse_args(argv=None):
    parser = make_parser(__doc__)
    g = parser.add_argument_group("MoME")
    g.add_argument("--experts", nargs="+", help="phase-1 checkpoints (mome.train_expert or nnU-Net v2), one per "
                   "modality in --modalities order")  # fmt: skip
    g.add_argument("--random-experts", action="store_true", help="ablation: start from randomly initialised experts")
    g.add_argument("--transfer-heads", action="store_true", help="also load the experts' seg heads (the official "
                   "code re-initialises them)")  # fmt: skip
    g.add_argument("--no-curriculum", action="store_true", help="ablation: L_MoME (Eq. 4) only, no curriculum")
    g.add_argument("--gate", choices=("hierarchical", "basic"), default="hierarchical", help="gating network type")
    g.add_argument("--gate-norm", choices=("none", "softmax"), default="none",
                   help="raw per-class gate maps (official code) or softmax over experts")  # fmt: skip
    g.add_argument("--gate-init", choices=("he", "uniform"), default="he",
                   help="gate seg heads: nnU-Net He init (official) or zero weights, every expert 1/N")  # fmt: skip
    g.add_argument(
        "--gate-maps",
        choices=("per-class", "shared"),
        default="per-class",
        help="one gate map per expert and class (official) or one per expert shared by the classes",
    )
    g.add_argument(
        "--gate-lr",
        type=positive_float,
        help="initial learning rate of the gate (default: --lr, as the paper); "
        "the gate starts from scratch while the experts are pretrained",
    )
    g.add_argument(
        "--gate-optimizer",
        choices=("sgd", "adam"),
        default="sgd",
        help="sgd: one SGD over experts and gate (official); adam: the gate gets its own Adam (at --gate-lr, "
        "default --lr), the experts keep SGD; Adam's step does not shrink with the (1 - f_epoch) loss weight",
    )
    g.add_argument("--clip-experts", action="store_true", help="clip expert gradients too (official: gate only)")
    g.add_argument("--expert-reduction", choices=("sum", "mean"), default="sum",
                   help="Eq. 2's expert term over the batch: sum of the per-sample losses (official code) or their "
                   "mean (the batch-mean scale of L_MoME)")  # fmt: skip
    add_common_args(parser, lr=1e-3, epochs=800)
    args = parser.parse_args(argv)
    check_common_args(args)
    if args.random_experts == bool(args.experts):
        raise InputError("give either --experts (one checkpoint per modality) or --random-experts, not both or none.")
    if args.experts and len(args.experts) != len(args.modalities):
        raise InputError(f"--experts lists {len(args.experts)} files but --modalities has {len(args.modalities)}.")
    return args


def expert_weights(path, modality: str) -> dict:
    """State dict of a phase-1 expert: a `mome.train_expert` checkpoint or an nnU-Net v2 checkpoint."""
    try:
        ckpt = load_checkpoint(path)
    except InputError:
        ckpt = None  # not our format (nnU-Net checkpoints pickle numpy scalars): try nnU-Net's
    if ckpt is not None and ckpt.get("kind") == "mome_expert":
        if ckpt.get("modality") == "all":
            raise InputError(f"--experts {path} is a universal nnU-Net (--modality all), not the {modality} expert.")
        if ckpt.get("modality") != modality:
            raise InputError(f"--experts {path} is the {ckpt.get('modality')} expert, expected {modality}.")
        return ckpt["model"]
    if ckpt is not None and "kind" in ckpt:
        raise InputError(f"--experts {path} is a {ckpt['kind']} checkpoint, expected a mome_expert one.")
    weights = plain_state_dict(read_nnunet_checkpoint(path), source=str(path))
    if "encoder.stages.0.0.convs.0.conv.weight" not in weights:
        raise InputError(
            f"--experts {path} holds neither a mome.train_expert run nor an nnU-Net PlainConvUNet; pass the "
            f"checkpoint.pt of mome.train_expert --modality {modality} (or an nnU-Net checkpoint_final.pth)."
        )
    return weights


def load_experts(model, paths, modalities, transfer_heads: bool) -> None:
    """Initialise the experts from phase 1; the seg heads stay freshly initialised unless `transfer_heads`."""
    for expert, path, modality in zip(model.experts, paths, modalities):
        weights = expert_weights(path, modality)
        if not transfer_heads:  # as the official code: keys with ".seg_layers." are not transferred
            own = expert.state_dict()
            weights = {k: (own[k] if ".seg_layers." in k else v) for k, v in weights.items()}
        load_checked(expert, weights, source=f"--experts {path}")


def build_optimizers(model, args) -> list:
    """The phase-2 optimizers, each param group carrying its `initial_lr` for the poly schedule.

    sgd (official): one SGD (nnU-Net: momentum 0.99, Nesterov) over experts and gate, the gate in a second
    group with its own initial lr (--gate-lr, default --lr). adam: that SGD over the experts only, and an Adam
    over the gate; Adam's step size does not depend on the gradient's scale, so the gate learns at its own
    pace while the curriculum still gives L_MoME a small weight (1 - f_epoch).
    """
    gate_lr = args.gate_lr or args.lr
    sgd = dict(momentum=0.99, nesterov=True, weight_decay=args.weight_decay)
    experts = {"params": model.experts.parameters(), "initial_lr": args.lr}
    gate = {"params": model.gate.parameters(), "initial_lr": gate_lr}
    if args.gate_optimizer == "sgd":
        return [torch.optim.SGD([experts, gate], lr=args.lr, **sgd)]
    return [torch.optim.SGD([experts], lr=args.lr, **sgd),
            torch.optim.Adam([gate], lr=gate_lr, weight_decay=args.weight_decay)]  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    dist_info = init_distributed(args.device)
    device = dist_info.device
    rng = seed_everything(args.seed, rank=dist_info.rank)
    ckpt = prepare_run_dir(args.out, resume=args.resume, args=args, kind=KIND, is_main=dist_info.is_main)
    out = Path(args.out)
    ckpt_path = out / "checkpoint.pt"

    cfg = config_from_args(args, gate_mode=args.gate, gate_norm=args.gate_norm,
                           gate_per_class=args.gate_maps == "per-class")  # fmt: skip
    model = build_mome(cfg).to(device)
    if args.experts:  # read and checked before any data is prepared
        load_experts(model, args.experts, cfg.modalities, args.transfer_heads)
    if args.gate_init == "uniform":
        model.gate.init_uniform()
    split, data = prepare_data(args, dist_info)
    if dist_info.is_main:
        write_split(out / "split.json", split)
    if dist_info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"phase 2: MoME ({cfg.num_experts} experts + {args.gate} gate, {n_params / 1e6:.2f} M parameters) "
              f"on {len(data.case_of)} images\n{data.describe()}")  # fmt: skip
    optimizers = build_optimizers(model, args)  # [SGD over experts (+ gate)] or [SGD over experts, Adam over gate]
    amp_dtype = pick_amp_dtype(device, enabled=args.amp)
    scaler = make_grad_scaler(device, amp_dtype)
    start_epoch = 0
    if ckpt is not None:
        restore_run(ckpt, kind=KIND, model=model, optimizer=optimizers[0], scaler=scaler, generator=rng,
                    device=device)  # fmt: skip
        if len(optimizers) > 1:  # --gate-optimizer adam (the same flag as the first call: prepare_run_dir)
            optimizers[1].load_state_dict(ckpt["gate_optimizer"])
        start_epoch = int(ckpt["epoch"])
        if dist_info.is_main:
            print(f"resumed {ckpt_path} at epoch {start_epoch}")
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    # the lowest deep-supervision head has loss weight 0 (nnU-Net), so its parameters get no gradient
    forward_model, raw_model = maybe_compile(wrap_ddp(model, dist_info, find_unused_parameters=True), use_compile)
    clipped = list(model.parameters() if args.clip_experts else model.gate.parameters())
    steps, stop_epoch = args.steps_per_epoch, last_epoch(args, start_epoch)
    logger = MetricsLogger(out / "log.csv", is_main=dist_info.is_main, start_step=start_epoch * steps)
    batches = training_batch_iterator(args, data, rank=dist_info.rank, device=device, start=start_epoch * steps,
                                      stop=stop_epoch * steps)  # fmt: skip

    for epoch in range(start_epoch, stop_epoch):
        for optimizer in optimizers:  # stepped once per epoch, as nnU-Net's PolyLRScheduler
            for group in optimizer.param_groups:
                group["lr"] = poly_lr(epoch, args.epochs, group["initial_lr"])
        lr = optimizers[0].param_groups[0]["lr"]  # the experts' lr, logged
        forward_model.train()
        t0, sums = time.time(), {"loss": 0.0, "mome": 0.0, "experts": 0.0}
        bar = tqdm(range(steps), desc=f"epoch {epoch}", disable=not dist_info.is_main, leave=False)
        for it in bar:
            batch = next(batches)  # on `device`, augmented
            x, y, expert = batch["image"], batch["label"], batch["expert"]
            with autocast_context(device, enabled=args.amp):
                out_all = forward_model(x, return_all=True)
                losses = curriculum_loss(
                    [o.float() for o in out_all["fused"]],
                    [[e.float() for e in levels] for levels in out_all["experts"]],
                    y,
                    expert,
                    epoch=epoch,
                    num_epochs=args.epochs,
                    curriculum=not args.no_curriculum,
                    expert_reduction=args.expert_reduction,
                )  # Eq. 2 (Eq. 4 alone with --no-curriculum)
            loss = losses["loss"]
            check_finite_loss(loss, epoch * steps + it, checkpoint_path=ckpt_path)
            scaler.scale(loss).backward()
            for optimizer in optimizers:
                scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(clipped, 12.0)
            for optimizer in optimizers:
                scaler.step(optimizer)
                optimizer.zero_grad(set_to_none=True)
            scaler.update()
            for key in sums:
                sums[key] += float(losses[key].detach())
            bar.set_postfix(loss=f"{loss.item():.4f}")
        means = {k: all_reduce_mean(v / steps) for k, v in sums.items()}
        f_epoch = 0.0 if args.no_curriculum else float(losses["f_epoch"])
        logger.log(step=(epoch + 1) * steps, epoch=epoch, lr=lr, f_epoch=f_epoch,
                   seconds=time.time() - t0, **means)  # fmt: skip
        rng_states = gather_rng_state(rng)
        if dist_info.is_main:
            print(f"epoch {epoch}: loss {means['loss']:.4f} (MoME {means['mome']:.4f}, experts {means['experts']:.4f},"
                  f" f_epoch {f_epoch:.3f}) lr {lr:.2e} ({time.time() - t0:.1f} s)")  # fmt: skip
            gate_state = optimizers[1].state_dict() if len(optimizers) > 1 else None
            save_run(ckpt_path, kind=KIND, model=raw_model, cfg=cfg, optimizer=optimizers[0], scaler=scaler,
                     epoch=epoch + 1, args=args, rng=rng_states, grid=data.grid, gate_optimizer=gate_state)  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
