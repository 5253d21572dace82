"""Train the task-conditional MoE UNet with modality dropout, L_reg and online self-distillation (Eq. 1-7).

    python -m moe_missing.train --data DatasetXXX_MS --out runs/moe_missing            # MoE + L_reg + L_sd
    python -m moe_missing.train --data DatasetXXX_MS --out runs/md --no-moe --no-sd    # modality dropout only
    python -m moe_missing.train --data DatasetXXX_MS --out runs/dm_101 --fixed-code 101  # dedicated model

Each step draws B full-modality crops x and one code m per crop (uniform over the non-empty codes), and runs
the full view x and the dropped view x~ = x * m (Eq. 1) as one batch of 2B. The full view is supervised and
is also the stop-gradient teacher of the dropped view (Eq. 5, 6); L_reg (Eq. 4) acts on the gates of all
2^K - 1 codes; Eq. (7) adds them with the ramp-up w(t). Table 1 ablations: --stem, --no-moe-encoder,
--no-reg, --no-sd, --stem dynamic (ModDrop++ stem).
"""

import argparse
import dataclasses
import json
import time
from pathlib import Path

import torch
from tqdm import tqdm

from moe_missing.data import dataset_modalities, draw_batch, prepare_cases
from moe_missing.losses import (
    all_codes,
    dice_ce_loss,
    drop_modalities,
    moe_regulariser,
    sample_codes,
    segmentation_loss,
    self_distillation_loss,
    sigmoid_rampup,
    total_loss,
)
from moe_missing.model import STEMS, MoEUNetConfig, build_model
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.cli import add_run_args, run_cli
from shared.dataset import canonical_modality, split_dataset
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
    set_rng_state,
    wrap_ddp,
)

KIND = "moe_missing"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = parser.add_argument_group("data")
    g.add_argument("--data", required=True, help="nnU-Net raw dataset folder (DatasetXXX_Name) with labelsTr")
    g.add_argument("--modalities", nargs="+", help="input channels in order (default: the dataset's channels)")
    g.add_argument("--fold", type=int, default=0, help="cross-validation fold held out; -1 trains on all cases")
    g.add_argument("--folds", type=int, default=3, help="number of deterministic folds (paper: 3)")
    g.add_argument("--patch", type=int, nargs=3, default=(96, 96, 96), help="training crop size at 1 mm")
    g.add_argument("--batch-size", type=int, default=4, help="crops per step and process (paper: 4)")
    g.add_argument("--fg-prob", type=float, default=0.8, help="probability of a crop centred on a lesion voxel")
    g.add_argument("--augment", action="store_true", help="flips, rotations, intensity changes (not in the paper)")
    g = parser.add_argument_group("model")
    g.add_argument("--features", type=int, nargs="+", default=[16, 32, 64, 128, 256], help="UNet widths per level")
    g.add_argument("--experts", type=int, default=4, help="experts N per MoE layer (paper: 4)")
    g.add_argument("--stem", choices=STEMS, default="moe", help="stem conv: MoE, plain, or ModDrop++ dynamic")
    g.add_argument("--no-moe-encoder", action="store_true", help="plain second conv in the encoder blocks")
    g.add_argument("--no-moe", action="store_true", help="no MoE layer at all (plain stem and encoder)")
    g.add_argument("--gate-noise", type=float, default=0.2, help="std of the training noise on the code")
    g = parser.add_argument_group("losses")
    g.add_argument("--alpha", type=float, default=0.1, help="weight of L_reg in Eq. 7")
    g.add_argument("--beta", type=float, default=1.0, help="weight of L_sd in Eq. 7")
    g.add_argument("--tau", type=float, default=2.0, help="self-distillation temperature")
    g.add_argument("--sd-form", choices=("dicece", "kl"), default="dicece", help="L_tau: DiceCE (paper) or KL*tau^2")
    g.add_argument("--no-sd", action="store_true", help="drop L_sd (Eq. 6)")
    g.add_argument("--no-reg", action="store_true", help="drop L_reg (Eq. 4)")
    g.add_argument("--reg-printed-sign", action="store_true", help="Eq. 4 with the printed '+' (ablation)")
    g.add_argument("--fixed-code", help="dedicated model for one configuration, e.g. 101 = T1 and FLAIR of T1/T2/FLAIR")
    g = parser.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=50000, help="training steps (paper: 50k MSSEG-2016, 150k OPERA)")
    g.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate, cosine decay to 0")
    g.add_argument("--clip", type=float, default=12.0, help="gradient-norm clipping threshold")
    g = parser.add_argument_group("run")
    add_run_args(g, out_holds="checkpoint.pt, log.csv, split.json, cache/", unit="steps", compiled="the model")
    g.add_argument("--save-every", type=int, default=1000, help="steps between checkpoints")
    g.add_argument("--log-every", type=int, default=50, help="steps averaged into one log row")
    args = parser.parse_args(argv)
    check_args(args)
    return args


def check_args(args) -> None:
    """Refuse bad flag values with one sentence each; fills in the modalities and the fixed code."""
    if not Path(args.data, "dataset.json").is_file():
        raise InputError(f"--data {args.data}: no dataset.json found; expected an nnU-Net raw dataset folder.")
    for name in ("batch_size", "steps", "save_every", "log_every", "experts"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}.")
    if args.stop_after is not None and args.stop_after < 1:
        raise InputError(f"--stop-after must be at least 1, got {args.stop_after}.")
    if args.lr <= 0 or args.tau <= 0:
        raise InputError(f"--lr and --tau must be positive, got {args.lr} and {args.tau}.")
    if not 0.0 <= args.fg_prob <= 1.0:
        raise InputError(f"--fg-prob must lie in [0, 1], got {args.fg_prob}.")
    channels = dataset_modalities(args.data)
    args.modalities = [canonical_modality(m) for m in (args.modalities or channels)]
    missing = [m for m in args.modalities if m not in channels]
    if missing or len(set(args.modalities)) != len(args.modalities):
        raise InputError(f"--modalities {args.modalities} must name distinct channels of {args.data} {list(channels)}.")
    K = len(args.modalities)
    if args.fixed_code is not None:
        if len(args.fixed_code) != K or set(args.fixed_code) - {"0", "1"} or "1" not in args.fixed_code:
            raise InputError(f"--fixed-code {args.fixed_code} must be {K} digits 0/1 with at least one 1.")
        args.no_sd = True  # a dedicated model sees one configuration only: there is no full view to distil from
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


def config_from_checkpoint(ckpt: dict) -> MoEUNetConfig:
    """Rebuild the config stored in a checkpoint (lists back to tuples)."""
    return MoEUNetConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()})


def save_run(path, *, model, cfg, optimizer, scaler, step: int, args, rng) -> None:
    """Atomically write everything to predict with, or resume, the run (un-compiled, un-wrapped model)."""
    save_checkpoint(path, kind=KIND, config=dataclasses.asdict(cfg), model=model.state_dict(),
                    optimizer=optimizer.state_dict(), scaler=scaler.state_dict(), step=step,
                    args={k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
                    rng=rng)  # fmt: skip


def main(argv=None) -> None:
    args = parse_args(argv)
    dist_info = init_distributed(args.device)
    device = dist_info.device
    rng = seed_everything(args.seed, rank=dist_info.rank)
    out = Path(args.out)
    ckpt_path = out / "checkpoint.pt"
    if ckpt_path.exists() and not args.resume:
        raise InputError(f"--out {out} already holds a checkpoint; pass --resume to continue it or pick a new folder.")

    split = split_dataset(args.data, fold=args.fold, folds=args.folds)
    if dist_info.is_main:
        out.mkdir(parents=True, exist_ok=True)
        (out / "split.json").write_text(json.dumps({Path(args.data).name: split}, indent=1))
        cases = prepare_cases(args.data, split["train"], args.modalities, out / "cache")
    if dist_info.world_size > 1:
        torch.distributed.barrier()  # the cache is complete before the other ranks read it
    if not dist_info.is_main:
        cases = prepare_cases(args.data, split["train"], args.modalities, out / "cache")

    cfg = config_from_args(args)
    model = build_model(cfg).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scaler = make_grad_scaler(device, pick_amp_dtype(device, enabled=args.amp))
    start = 0
    if args.resume and ckpt_path.exists():
        ckpt = load_checkpoint(ckpt_path, map_location=device, expect_kind=KIND)
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        set_rng_state(ckpt["rng"], generator=rng)
        start = int(ckpt["step"])
    if dist_info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"{KIND}: stem {cfg.stem}, MoE encoder {cfg.moe_encoder}, {len(model.moe_layers())} MoE layers, "
              f"{n_params / 1e6:.2f} M parameters; {len(cases)} training cases of {args.modalities}; "
              f"starting at step {start} of {args.steps}")  # fmt: skip
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    forward_model, raw_model = maybe_compile(wrap_ddp(model, dist_info), use_compile)
    codes = all_codes(cfg.num_modalities).to(device)
    fixed = None
    if args.fixed_code is not None:
        fixed = torch.tensor([float(c) for c in args.fixed_code], device=device)
    reg_sign = 1.0 if args.reg_printed_sign else -1.0
    logger = MetricsLogger(out / "log.csv", is_main=dist_info.is_main, start_step=start)
    last = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    sums, count, t0 = {}, 0, time.time()

    forward_model.train()
    for step in tqdm(range(start, last), desc="train", disable=not dist_info.is_main, initial=start, total=last):
        lr = cosine_lr(step, args.steps, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x, y, available = draw_batch(cases, batch_size=args.batch_size, patch_size=args.patch, rng=rng,
                                     fg_prob=args.fg_prob, augmentation=args.augment)  # fmt: skip
        x, y, available = x.to(device, non_blocking=True), y.to(device, non_blocking=True), available.to(device)
        if fixed is None:
            code = sample_codes(available.cpu(), rng).to(device)  # (B, K), Eq. (2)'s uniform draw
            x_in = torch.cat([x, drop_modalities(x, code)])  # (2B, K, D, H, W): full view, then dropped view
            code_in = torch.cat([available, code])
        else:
            code = fixed.expand(x.shape[0], -1)
            x_in, code_in = drop_modalities(x, code), code
        with autocast_context(device, enabled=args.amp):
            logits = forward_model(x_in, code_in).float()
        if fixed is None:
            full, dropped = logits.chunk(2)  # (B, C, D, H, W) each
            seg = segmentation_loss(full, dropped, y)  # Eq. (5)
        else:
            dropped = logits
            seg = dice_ce_loss(dropped, y)
        sd = reg = torch.zeros((), device=device)
        if not args.no_sd:
            sd = self_distillation_loss(dropped, full, tau=args.tau, form=args.sd_form)  # Eq. (6)
        if not args.no_reg:
            reg = moe_regulariser(raw_model.moe_layers(), codes, sign=reg_sign)  # Eq. (4), summed over layers
        loss = total_loss(seg, reg, sd, step=step, total_steps=args.steps, alpha=args.alpha, beta=args.beta)
        check_finite_loss(loss, step, checkpoint_path=ckpt_path)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
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
        if done % args.save_every == 0 or done == last:
            rng_states = gather_rng_state(rng)
            if dist_info.is_main:
                save_run(ckpt_path, model=raw_model, cfg=cfg, optimizer=optimizer, scaler=scaler, step=done,
                         args=args, rng=rng_states)  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
