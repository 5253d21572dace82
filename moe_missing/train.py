"""Train the task-conditional MoE UNet with modality dropout, L_reg and online self-distillation (Eq. 1-7).

    python -m moe_missing.train --data DatasetXXX_MS --out runs/moe_missing            # MoE + L_reg + L_sd
    python -m moe_missing.train --data DatasetXXX_MS --out runs/md --no-moe --no-sd    # modality dropout only
    python -m moe_missing.train --data DatasetXXX_MS --out runs/dm_101 --dedicated 101   # dedicated model

Each step draws B full-modality crops x and one code m per crop (uniform over the non-empty codes the case
has), and runs the full view x and the dropped view x~ = x * m (Eq. 1) as one batch of 2B. The full view is
supervised and is also the stop-gradient teacher of the dropped view (Eq. 5, 6); L_reg (Eq. 4) acts on the
gates of all 2^K - 1 codes; Eq. (7) adds them with the ramp-up w(t). Table 1 ablations: --stem,
--no-moe-encoder, --no-reg, --no-sd, --stem dynamic (ModDrop++ stem).

Not in the paper: the gradient norm is clipped at --clip 12 by default (nnU-Net's value; the paper names no
clipping, --clip 0 switches it off); the soft Dice of L is MONAI's (sums of p and t in the denominator, see
`losses.dice_ce_loss`), where the paper's footnote cites V-Net's squared form.

A dedicated model (Tables 2-3, "DM") is the plain UNet of --no-moe trained on one configuration only: every
crop is x~(x, m) for the fixed code m, one view, L = DiceCE; no MoE layer, gate noise, L_reg or L_sd. Training
cases that lack one of its channels are left out. The checkpoint records the code, and `evaluate` scores the
model on that configuration only.

--data may name several datasets with the model's modalities (the aggregation the paper motivates): each is
split into folds on its own, and the crops are drawn from the pooled training cases. Every --val-every steps
the held-out cases are scored (`validate.py`: the exact Eq. 2 objective and the Dice), logged to val.csv, and
the best checkpoint by --val-metric is kept as best.pt beside the last one, checkpoint.pt.
"""

import argparse
import time
from pathlib import Path

import torch
from tqdm import tqdm

from moe_missing.data import MissingModalityBatches, dataset_modalities, has_channels, preprocessing
from moe_missing.losses import (
    all_codes,
    dice_ce_loss,
    drop_modalities,
    moe_regulariser,
    segmentation_loss,
    self_distillation_loss,
    sigmoid_rampup,
    total_loss,
)
from moe_missing.model import STEMS, MoEUNetConfig, build_model
from moe_missing.runs import KIND, save_run
from moe_missing.validate import METRICS, improved, validation_score
from shared.augment import PIPELINES, BatchAugmentation
from shared.cache import build_cache
from shared.checkpoint import prepare_run_dir, restore_run
from shared.cli import (
    add_run_args,
    fold_count,
    fold_index,
    make_parser,
    non_negative_float,
    non_negative_int,
    overlap_fraction,
    positive_float,
    positive_int,
    probability,
    run_cli,
)
from shared.dataset import canonical_modality
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
from shared.loader import add_loader_args, default_workers, training_batches
from shared.splits import split_datasets, write_split


def parse_args(argv=None):
    parser = make_parser(__doc__)
    g = parser.add_argument_group("data")
    g.add_argument("--data", nargs="+", required=True, help="nnU-Net raw dataset folder(s) (DatasetXXX_Name) with "
                   "labelsTr; several datasets must all have the --modalities")  # fmt: skip
    g.add_argument("--modalities", nargs="+", help="input channels in order (default: the first dataset's channels)")
    g.add_argument("--fold", type=fold_index, default=0, help="cross-validation "
                   "fold held out; -1 trains on all cases")  # fmt: skip
    g.add_argument("--folds", type=fold_count, default=3, help="number of deterministic "
                   "folds (paper: 3)")  # fmt: skip
    g.add_argument("--patch", type=positive_int, nargs=3, default=(96, 96, 96), help="training crop size at 1 mm")
    g.add_argument("--batch-size", type=positive_int, default=4, help="crops per step and process (paper: 4)")
    g.add_argument("--fg-prob", type=probability, default=0.8, help="probability of a crop centred on a lesion voxel")
    g.add_argument("--augment", action="store_true", help="nnU-Net v2's default augmentation (the paper names none); "
                   "a missing channel stays zero")  # fmt: skip
    add_loader_args(g)
    g = parser.add_argument_group("model")
    g.add_argument("--features", type=positive_int, nargs="+", default=[16, 32, 64, 128, 256], help="UNet widths per "
                   "level")  # fmt: skip
    g.add_argument("--experts", type=positive_int, default=4, help="experts N per MoE layer (paper: 4)")
    g.add_argument("--stem", choices=STEMS, default="moe", help="stem conv: MoE, plain, or ModDrop++ dynamic")
    g.add_argument("--no-moe-encoder", action="store_true", help="plain second conv in the encoder blocks")
    g.add_argument("--no-moe", action="store_true", help="no MoE layer at all (plain stem and encoder)")
    g.add_argument("--gate-noise", type=non_negative_float, default=0.2, help="std of the training noise on the code")
    g.add_argument("--dedicated", metavar="CODE", help="a dedicated model: the plain UNet (as --no-moe) trained on "
                   "this configuration only, e.g. 101 = T1 and FLAIR of T1/T2/FLAIR; no L_reg, no L_sd")  # fmt: skip
    g.add_argument("--fixed-code", help=argparse.SUPPRESS)  # removed: refused with a pointer to --dedicated
    g = parser.add_argument_group("losses")
    g.add_argument("--alpha", type=non_negative_float, default=0.1, help="weight of L_reg in Eq. 7")
    g.add_argument("--beta", type=non_negative_float, default=1.0, help="weight of L_sd in Eq. 7")
    g.add_argument("--tau", type=positive_float, default=2.0, help="self-distillation temperature")
    g.add_argument("--sd-form", choices=("dicece", "kl"), default="dicece", help="L_tau: DiceCE (paper) or KL*tau^2")
    g.add_argument("--no-sd", action="store_true", help="drop L_sd (Eq. 6)")
    g.add_argument("--no-reg", action="store_true", help="drop L_reg (Eq. 4)")
    g.add_argument("--reg-printed-sign", action="store_true", help="Eq. 4 with the printed '+' (ablation)")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=positive_int, default=50000, help="training steps (paper: 50k MSSEG-2016, 150k "
                   "OPERA I)")  # fmt: skip
    g.add_argument("--lr", type=positive_float, default=1e-4, help="Adam learning rate, cosine decay to 0")
    g.add_argument("--clip", type=non_negative_float, default=12.0, help="gradient-norm clipping threshold, "
                   "nnU-Net's value; not in the paper, 0: no clipping, as the paper")  # fmt: skip
    g = parser.add_argument_group("validation on the held-out fold")
    g.add_argument("--val-every", type=non_negative_int, default=1000, help="steps between validations (0: none)")
    g.add_argument("--val-metric", choices=tuple(METRICS), default="objective", help="what picks best.pt: the "
                   "exact Eq. 2 objective (lower is better) or the lesion Dice (higher)")  # fmt: skip
    g.add_argument("--val-overlap", type=overlap_fraction, default=0.5, help="sliding-window overlap of the "
                   "validation")  # fmt: skip
    g = parser.add_argument_group("run")
    add_run_args(g, out_holds="checkpoint.pt, best.pt, log.csv, val.csv, split.json", unit="steps",
                 compiled="the model")  # fmt: skip
    g.add_argument("--save-every", type=positive_int, default=1000, help="steps between checkpoints")
    g.add_argument("--log-every", type=positive_int, default=50, help="steps averaged into one log row")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args) -> None:
    """Refuse bad flag values with one sentence each; fills in the modalities and what --dedicated implies."""
    for data in args.data:
        if not Path(data, "dataset.json").is_file():
            raise InputError(f"--data {data}: no dataset.json found; expected an nnU-Net raw dataset folder.")
    if len({Path(d).name for d in args.data}) != len(args.data):
        raise InputError(f"--data {' '.join(args.data)}: two datasets have the same folder name.")
    if len(args.features) < 2:
        raise InputError(f"--features must give at least 2 widths (one per UNet level), got {args.features}.")
    channels = dataset_modalities(args.data[0])
    args.modalities = [canonical_modality(m) for m in (args.modalities or channels)]
    if len(set(args.modalities)) != len(args.modalities):
        raise InputError(f"--modalities {args.modalities} names a channel twice.")
    for data in args.data:
        missing = [m for m in args.modalities if m not in dataset_modalities(data)]
        if missing:
            raise InputError(
                f"--data {data} has no channel {missing} (its channels: {list(dataset_modalities(data))})."
            )
    K = len(args.modalities)
    if args.fixed_code is not None:
        raise InputError("--fixed-code was removed: it kept the MoE layers, the gate noise and L_reg on one code; "
                         "use --dedicated CODE for a dedicated model.")  # fmt: skip
    if args.dedicated is not None:
        code = args.dedicated
        if len(code) != K or set(code) - {"0", "1"} or "1" not in code:
            raise InputError(f"--dedicated {code} must be {K} digits 0/1 (one per modality of {args.modalities}) "
                             "with at least one 1.")  # fmt: skip
        if args.stem == "dynamic":
            raise InputError(
                "--dedicated trains the plain UNet; --stem dynamic needs the multi-configuration training."
            )
        # the plain UNet on one configuration: no MoE layer, so no gate noise and no L_reg; one view, so no L_sd
        args.no_moe = args.no_sd = args.no_reg = True
    if args.no_moe:
        args.stem, args.no_moe_encoder = ("plain" if args.stem == "moe" else args.stem), True
    depth = len(args.features) - 1
    if any(p % 2**depth for p in args.patch):
        raise InputError(f"--patch {args.patch} must be divisible by 2^{depth} for {len(args.features)} levels.")


def config_from_args(args) -> MoEUNetConfig:
    try:
        return MoEUNetConfig(modalities=tuple(args.modalities), features=tuple(args.features),
                             num_experts=args.experts, stem=args.stem, moe_encoder=not args.no_moe_encoder,
                             gate_noise=args.gate_noise)  # fmt: skip
    except ValueError as err:
        raise InputError(f"invalid model flags: {err}") from err


def cached_cases(args, splits, subset: str, dist_info) -> list:
    """The cached `subset` cases of every dataset, built by rank 0 first (the other ranks then only read)."""
    prep = preprocessing(args.modalities)
    cases = []
    for data in args.data:
        ids = splits[Path(data).name][subset]
        if not ids:
            continue
        if not dist_info.is_main and dist_info.world_size > 1:
            torch.distributed.barrier()  # wait until rank 0 has built this cache
        cases += build_cache(data, prep, case_ids=ids, labelled_only=True, cache_root=args.cache,
                             progress=dist_info.is_main)  # fmt: skip
        if dist_info.is_main and dist_info.world_size > 1:
            torch.distributed.barrier()
    if args.dedicated is not None:  # a dedicated model only sees cases that have all of its channels
        cases = [c for c in cases if has_channels(c, args.dedicated)]
    return cases


def main(argv=None) -> None:
    args = parse_args(argv)
    dist_info = init_distributed(args.device)
    device = dist_info.device
    rng = seed_everything(args.seed, rank=dist_info.rank)
    out = Path(args.out)
    ckpt_path, best_path = out / "checkpoint.pt", out / "best.pt"
    resumed = prepare_run_dir(out, resume=args.resume, args=args, kind=KIND, is_main=dist_info.is_main)

    splits = split_datasets(args.data, fold=args.fold, folds=args.folds)
    train_cases = cached_cases(args, splits, "train", dist_info)
    if not train_cases:
        raise InputError(f"--data {' '.join(args.data)}: no training case has the channels of --dedicated "
                         f"{args.dedicated}.")  # fmt: skip
    val_cases = cached_cases(args, splits, "val", dist_info) if args.val_every > 0 else []
    if dist_info.is_main:
        write_split(out / "split.json", splits)

    cfg = config_from_args(args)
    model = build_model(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scaler = make_grad_scaler(device, pick_amp_dtype(device, enabled=args.amp))
    start, best = 0, None
    if resumed is not None:
        restore_run(resumed, kind=KIND, model=model, optimizer=optimizer, scaler=scaler, generator=rng, device=device)
        start, best = int(resumed["step"]), resumed.get("best")
    workers = default_workers(device) if args.workers is None else args.workers
    if dist_info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(
            f"{KIND}: stem {cfg.stem}, MoE encoder {cfg.moe_encoder}, {len(model.moe_layers())} MoE layers, "
            f"{n_params / 1e6:.2f} M parameters; {len(train_cases)} training and {len(val_cases)} validation cases "
            f"of {args.modalities}; {workers} loader workers; starting at step {start} of {args.steps}"
        )
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    forward_model, raw_model = maybe_compile(wrap_ddp(model, dist_info), use_compile)
    codes = all_codes(cfg.num_modalities).to(device)
    reg_sign = 1.0 if args.reg_printed_sign else -1.0
    logger = MetricsLogger(out / "log.csv", is_main=dist_info.is_main, start_step=start)
    val_logger = MetricsLogger(out / "val.csv", is_main=dist_info.is_main, start_step=start)
    last = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    pipeline = PIPELINES["nnunet" if args.augment else "none"]
    draw = MissingModalityBatches(train_cases, batch_size=args.batch_size, patch=tuple(args.patch),
                                  fg_prob=args.fg_prob, dedicated=args.dedicated, pipeline=pipeline)  # fmt: skip
    augment = BatchAugmentation(pipeline, tuple(args.patch)) if draw.augments else None
    batches = training_batches(draw, seed=args.seed, rank=dist_info.rank, start=start, stop=last, workers=workers,
                               device=device, augment=augment)  # fmt: skip
    sums, count, t0 = {}, 0, time.time()

    forward_model.train()
    for batch in tqdm(batches, desc="train", disable=not dist_info.is_main, initial=start, total=last):
        step = batch["step"]
        lr = cosine_lr(step, args.steps, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y, available, code = batch["image"], batch["label"], batch["available"], batch["code"]
        if args.dedicated is None:
            x_in = torch.cat([x, drop_modalities(x, code)])  # (2B, K, D, H, W): full view, then dropped view
            code_in, eps = torch.cat([available, code]), batch["eps"]  # the full view's code: the case's channels
        else:
            x_in, code_in, eps = drop_modalities(x, code), code, None  # one view; a plain UNet has no gate noise
        with autocast_context(device, enabled=args.amp):
            logits = forward_model(x_in, code_in, eps).float()
        if args.dedicated is None:
            full, dropped = logits.chunk(2)  # (B, C, D, H, W) each
            seg = segmentation_loss(full, dropped, y)  # Eq. (5)
        else:
            seg = dice_ce_loss(logits, y)
        sd = reg = torch.zeros((), device=device)
        if not args.no_sd:
            sd = self_distillation_loss(dropped, full, tau=args.tau, form=args.sd_form)  # Eq. (6)
        if not args.no_reg:
            reg = moe_regulariser(raw_model.moe_layers(), codes, sign=reg_sign)  # Eq. (4), summed over layers
        loss = total_loss(seg, reg, sd, step=step, total_steps=args.steps, alpha=args.alpha, beta=args.beta)
        check_finite_loss(loss, step, checkpoint_path=ckpt_path if ckpt_path.exists() else None)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if args.clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        for key, value in (("loss", loss), ("seg", seg), ("reg", reg), ("sd", sd)):
            sums[key] = sums.get(key, 0.0) + float(value.detach())
        count, done = count + 1, step + 1
        if done % args.log_every == 0 or done == last:
            means = {k: all_reduce_mean(v / count) for k, v in sums.items()}
            logger.log(step=done, lr=lr, w=sigmoid_rampup(step, args.steps), seconds=time.time() - t0, **means)
            sums, count, t0 = {}, 0, time.time()
        val_due, new_best = bool(val_cases) and (done % args.val_every == 0 or done == args.steps), False
        if val_due:
            score = validation_score(raw_model, val_cases, patch=tuple(args.patch), device=device,
                                     dedicated=args.dedicated, overlap=args.val_overlap, amp=args.amp,
                                     rank=dist_info.rank, world_size=dist_info.world_size)  # fmt: skip
            new_best = improved(score[args.val_metric], best, args.val_metric)
            if new_best:
                best = {"metric": args.val_metric, "value": score[args.val_metric], "step": done}
            val_logger.log(step=done, **score, best_step=best["step"] if best else "")
        if val_due or done % args.save_every == 0 or done == last:  # best.pt and checkpoint.pt agree on `best`
            rng_states = gather_rng_state(rng)
            if dist_info.is_main:
                payload = dict(model=raw_model, cfg=cfg, optimizer=optimizer, scaler=scaler, step=done, args=args,
                               rng=rng_states, best=best)  # fmt: skip
                if new_best:
                    save_run(best_path, **payload)
                save_run(ckpt_path, **payload)


if __name__ == "__main__":
    run_cli(main)
