"""BrainSegFounder self-supervised pretraining, Stage 1 (unlabelled healthy brains) and Stage 2 (target data).

    python -m brainsegfounder.pretrain --data UKB_DIR --channels T1 FLAIR --out runs/stage1
    python -m brainsegfounder.pretrain --data BRATS_DIR --channels FLAIR T1ce T1 T2 \
        --init runs/stage1/checkpoint.pt --out runs/stage2

Each step draws `--batch-size` volumes x `--crops` random crops, makes two rotated + cut-out views of each
crop and trains the SSL head on rotation CE + NT-Xent (t = 0.5) + L1 inpainting (Tang et al. Eq. 4, weights 1).
Stage 2 (`--init`) starts from the Stage-1 encoder with channel adaptation by modality name; the SSL heads
start fresh. Modality restriction (paper Table 5: one modality fed to both channels of the unchanged
network) is `--channels T1 T1 --channel-transfer position` in Stage 2 and in fine-tuning, from a T1 + FLAIR
Stage-1 encoder: both Stage-1 filters are kept (by name, the T1 filter would be copied twice). Table 5's
ablation restricts Stage 1 as well (`--channels T1 T1` in all three stages; name and position then agree).

Which images: by default the training cases of each dataset only. The cases that fine-tuning holds out
(`--fold/--folds`, `--split-file` or `--holdout`, exactly as `brainsegfounder.finetune` reads them) are the SSL
validation set, and imagesTs is never read, so Stage 2 on the target dataset sees no image that the
fine-tuned model is scored on. `--transductive` restores the earlier behaviour: every image of imagesTr and
imagesTs is trained on, nothing is validated (the test images are seen without labels; fair only when they
never score the fine-tuned model). Every `--val-every` steps the SSL losses of fixed crops and views of each
validation volume are logged (paper Fig. 4) and the checkpoint with the lowest validation inpainting L1 is
kept as best.pt (the official `model_bestValRMSE.pt`). OUT/split.json lists the cases.

The SSL views rotate each crop by a multiple of 90 degrees in the plane of the last two array axes, as the
official `rot_rand` on its arrays; the volumes are not reoriented (no RAS), so which anatomical plane that is
depends on the files' voxel order.

Defaults are the official code's (`pretrain/main.py`: AdamW lr 4e-4, weight decay 0.1, warm-up cosine with 500
warm-up steps over 100,000 steps, 96^3 crops, 2 crops per volume), not the paper's, which disagrees with
itself: Stage 1 in the text is lr 6e-6 over 15,000 iterations with batch 2 per GPU on 64 GPUs, in Table 3
batch 128, lr 1e-6, 2 x 10^5 steps; Stage 2 (BraTS, Table 3) is batch 2, lr 1e-4, 50,000 steps. Pass
`--lr`, `--steps`, `--batch-size` to follow either.
"""

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from brainsegfounder.data import SSLDraw, cache_cases, parse_channels, preprocessing, ssl_validation_views
from brainsegfounder.losses import ssl_loss
from brainsegfounder.splits import pretraining_split
from brainsegfounder.ssl_head import SSLConfig, build_ssl_head
from brainsegfounder.train_common import (
    SSL_KIND,
    add_model_args,
    add_run_args,
    add_split_args,
    check_run_args,
    init_encoder,
    patch_size,
    resolve_architecture,
    save_run,
)
from shared import cli
from shared.checkpoint import prepare_run_dir, restore_run, save_checkpoint
from shared.cli import run_cli
from shared.dataset import list_cases
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
from shared.loader import default_workers, training_batches
from shared.splits import write_split


def parse_args(argv=None):
    parser = cli.make_parser(__doc__, prog="python -m brainsegfounder.pretrain")
    g = parser.add_argument_group("data")
    g.add_argument("--data", nargs="+", required=True, help="nnU-Net raw dataset folders (labels are not used)")
    g.add_argument("--channels", nargs="+", required=True,
                   help="input modalities in channel order; repeat one to feed it to several channels")  # fmt: skip
    g.add_argument("--intensity", choices=("percentile", "ct", "zscore"), default="percentile",
                   help="intensity scaling (official code: ct, a CT window applied to MRI)")  # fmt: skip
    g.add_argument("--patch", type=patch_size, nargs=3, default=(96, 96, 96), help="crop size (paper: 96^3)")
    g.add_argument("--batch-size", type=cli.positive_int, default=1, help="volumes per step and process")
    g.add_argument("--crops", type=cli.positive_int, default=2, help="random crops per volume (official sw_batch_size)")
    g.add_argument("--temperature", type=cli.positive_float, default=0.5, help="NT-Xent temperature")
    g = parser.add_argument_group("cases (the cases fine-tuning holds out are the SSL validation set)")
    add_split_args(g)
    g.add_argument(
        "--transductive",
        action="store_true",
        help="train on every image of imagesTr and imagesTs, validate on none (sees the test images)",
    )
    g.add_argument("--val-every", type=cli.non_negative_int, default=0,
                   help="SSL validation every N steps, best.pt kept by inpainting L1 (0: only at the end)")  # fmt: skip
    add_model_args(parser)
    add_run_args(parser, lr=4e-4, steps=100_000, warmup=500, weight_decay=0.1,
                 out_holds="checkpoint.pt, best.pt, log.csv, split.json")  # fmt: skip
    args = parser.parse_args(argv)
    check_run_args(args)
    args.channels = parse_channels(args.channels)
    if args.batch_size * args.crops < 2:
        raise InputError(f"--batch-size x --crops must be at least 2 (contrastive negatives), got "
                         f"{args.batch_size} x {args.crops}.")  # fmt: skip
    if len(set(args.patch[1:])) != 1:
        raise InputError(f"--patch {' '.join(map(str, args.patch))}: the last two sides must be equal (90-degree "
                         "rotations in their plane).")  # fmt: skip
    if args.split_file and len(args.data) > 1:
        raise InputError("--split-file names the cases of one dataset; give one --data with it.")
    return args


def pretraining_cases(args, processes: int) -> tuple[list, list, dict]:
    """(training, validation) `CachedCase` lists and the split record over the --data datasets (module docstring).

    Cases without every requested channel are left out of both, and counted in the log. Every case is read,
    checked and cached here, before anything of the run is written.
    """
    prep = preprocessing(args.channels, args.intensity)
    train, val, record, skipped = [], [], {}, 0
    for root in args.data:
        split = pretraining_split(root, fold=args.fold, folds=args.folds, split_file=args.split_file,
                                  holdout=args.holdout, transductive=args.transductive)  # fmt: skip
        usable = {}
        for part in ("Tr", "Ts") if split["imagesTs"] else ("Tr",):
            cases = list_cases(root, part)
            usable[part] = {c.case_id for c in cases if all(c.images.get(m) is not None for m in args.channels)}
            skipped += len(cases) - len(usable[part])
        split = {
            key: [c for c in ids if c in usable["Ts" if key == "imagesTs" else "Tr"]] for key, ids in split.items()
        }
        kwargs = {"cache_root": args.cache, "processes": processes}
        train += cache_cases(root, prep, split["train"], **kwargs)
        train += cache_cases(root, prep, split["imagesTs"], split="Ts", **kwargs)
        val += cache_cases(root, prep, split["val"], **kwargs)
        record[Path(root).name] = split
    if not train:
        raise InputError(f"--data {' '.join(map(str, args.data))} holds no training case with all channels "
                         f"{' '.join(args.channels)}.")  # fmt: skip
    if skipped:
        print(f"left out {skipped} case(s) without all of the channels {' '.join(args.channels)}")
    return train, val, record


@torch.no_grad()
def validate(model, cases, args, device) -> dict:
    """Mean SSL losses over the validation volumes (paper Fig. 4), read from the cache one volume at a time.

    Volume i always gets the same max(2, --crops) crops and views (drawn from (seed, i)), so the curve measures
    the model, not the draw. Each rank scores its share; the sums are reduced over ranks.
    """
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    keys = ("loss", "inpaint", "contrast", "rotation")
    sums = torch.zeros(len(keys) + 1, dtype=torch.float64)
    for i in range(rank, len(cases), world):
        rng = np.random.default_rng([args.seed, i])
        views = ssl_validation_views(cases[i], args.channels, args.patch, max(2, args.crops), rng)
        views = {k: v.to(device) for k, v in views.items()}
        n = views["inputs"].shape[0] // 2
        with autocast_context(device, enabled=args.amp):
            rot_logits, z, reconstruction = model(views["inputs"])
            losses = ssl_loss(rot_logits.float(), views["labels"], z[:n].float(), z[n:].float(),
                              reconstruction.float(), views["targets"], temperature=args.temperature)  # fmt: skip
        sums += torch.tensor([float(losses[k]) for k in keys] + [1.0], dtype=torch.float64)
    if dist.is_initialized():
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu()
    model.train()
    return {k: float(sums[j] / sums[-1]) for j, k in enumerate(keys)}


def main(argv=None) -> None:
    args = parse_args(argv)
    dist_info = init_distributed(args.device)
    device = dist_info.device
    rng = seed_everything(args.seed, rank=dist_info.rank)  # model initialisation, dropout; batches: below
    workers = default_workers(device) if args.workers is None else args.workers
    out = Path(args.out)
    ckpt_path = out / "checkpoint.pt"
    previous = prepare_run_dir(out, resume=args.resume, args=args, kind=SSL_KIND, is_main=dist_info.is_main)

    arch, init = resolve_architecture(args)  # --init is read and checked before any case is cached
    cases, val_cases, record = pretraining_cases(args, processes=max(1, workers))
    cfg = SSLConfig(in_channels=len(args.channels), use_checkpoint=args.checkpointing, **arch)
    model = build_ssl_head(cfg).to(device)
    resuming = previous is not None
    if init is not None and not resuming:
        init_encoder(model.swinViT, init, args, args.channels, dist_info.is_main)
    if dist_info.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"SSL pretraining: {n_params:,} parameters, {len(cases)} training and {len(val_cases)} validation "
              f"volumes{' (transductive: imagesTs included)' * args.transductive}, channels "
              f"{' '.join(args.channels)}, {workers} loader worker(s)")  # fmt: skip
        write_split(out / "split.json", record)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    amp_dtype = pick_amp_dtype(device, enabled=args.amp)
    scaler = make_grad_scaler(device, amp_dtype)
    start, best = 0, {"inpaint": float("inf"), "step": 0}
    if resuming:
        ckpt = restore_run(previous, kind=SSL_KIND, model=model, optimizer=optimizer, scaler=scaler, generator=rng,
                           device=device)  # fmt: skip
        start, best = int(ckpt["step"]), dict(ckpt.get("best", best))
        if dist_info.is_main:
            print(f"resumed {ckpt_path} at step {start}")
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    forward_model, raw_model = maybe_compile(wrap_ddp(model, dist_info), use_compile)
    logger = MetricsLogger(out / "log.csv", is_main=dist_info.is_main, start_step=start)
    stop = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    draw = SSLDraw(tuple(cases), tuple(args.channels), args.batch_size, args.crops, tuple(args.patch))
    batches = training_batches(draw, seed=args.seed, rank=dist_info.rank, start=start, stop=stop, workers=workers,
                               device=device)  # fmt: skip
    sums, summed, t0 = {"loss": 0.0, "inpaint": 0.0, "contrast": 0.0, "rotation": 0.0}, 0, time.time()

    forward_model.train()
    bar = tqdm(batches, total=stop - start, desc="pretrain", disable=not dist_info.is_main)
    for step, views in zip(range(start, stop), bar):  # views: (2N, C, *patch) inputs/targets, (2N,) labels
        lr = warmup_cosine_lr(step, args.steps, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        n = views["inputs"].shape[0] // 2
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
        summed += 1
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        val = {}
        if val_cases and (done == args.steps or (args.val_every and done % args.val_every == 0)):
            val = validate(raw_model, val_cases, args, device)
            if val["inpaint"] < best["inpaint"]:
                best = {**val, "step": done}
                if dist_info.is_main:
                    save_checkpoint(out / "best.pt", kind=SSL_KIND, config=dataclasses.asdict(cfg),
                                    channels=list(args.channels), model=raw_model.state_dict(), step=done,
                                    validation=val)  # fmt: skip
        if done % args.log_every == 0 or done == stop or val:
            means = {k: all_reduce_mean(v / summed) for k, v in sums.items()}
            logger.log(step=done, lr=lr, seconds=time.time() - t0, **means, **{f"val_{k}": v for k, v in val.items()})
            sums, summed, t0 = dict.fromkeys(sums, 0.0), 0, time.time()
        if done % args.log_every == 0 or done == stop:
            rng_states = gather_rng_state(rng)
            if dist_info.is_main:
                save_run(ckpt_path, kind=SSL_KIND, model=raw_model, cfg=cfg, channels=args.channels,
                         optimizer=optimizer, scaler=scaler, step=done, args=args, rng=rng_states,
                         best=best)  # fmt: skip
    if dist_info.is_main:
        print(f"saved {ckpt_path} at step {stop}" + (f"; best validation inpainting L1 {best['inpaint']:.4f} at step "
              f"{best['step']} in {out / 'best.pt'}" if best["step"] else ""))  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
