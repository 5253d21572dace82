"""MoME phase 1: train one modality expert alone on the images of its modality (nnU-Net recipe); and baselines.

    python -m mome.train_expert --modality FLAIR --data DATASET_DIR [...] --out runs/expert_FLAIR
    python -m mome.train_expert --modality all --data DATASET_DIR [...] --out runs/nnunet          # baseline
    python -m mome.train_expert --modality FLAIR --data ONE_DATASET --out runs/task_FLAIR         # task-specific

The result `OUT/checkpoint.pt` is one of the `--experts` of `python -m mome.train` (phase 2). An nnU-Net v2
`checkpoint_final.pth` of a 1-channel PlainConvUNet can be used there instead.

The same recipe gives the paper's nnU-Net baselines (Sec. 3.2), which mome.predict and mome.evaluate take
like a MoME checkpoint: `--modality all` trains one network on every channel of every dataset, each a
single-modality sample ("a single nnU-Net trained with the combined training sets", the baseline foundation
model); with one dataset, `--modality all --data ONE_DATASET` is a dataset-specific nnU-Net, and
`--modality M --data ONE_DATASET` the paper's task-specific one (a task is one modality of one dataset).
The default of 800 epochs of 250 steps follows the paper (all models trained for 800 epochs); stock nnU-Net
uses 1000, and the official code does not say how long its experts were trained.
"""

import time
from pathlib import Path

import torch
from tqdm import tqdm

from mome.data import prepare_data, training_batch_iterator
from mome.losses import deep_supervised_loss, deep_supervision_weights, downsample_target
from mome.model import build_expert
from mome.train_common import (
    add_common_args,
    check_common_args,
    config_from_args,
    last_epoch,
    save_run,
)
from shared.checkpoint import prepare_run_dir, restore_run
from shared.cli import make_parser, run_cli
from shared.dataset import canonical_modality
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

KIND = "mome_expert"


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument(
        "--modality",
        required=True,
        help="the expert's modality, e.g. T1, T1ce, T2, FLAIR, DWI; "
        "all: one network on every channel of every dataset (the universal nnU-Net baseline)",
    )
    add_common_args(parser, lr=1e-2, epochs=800)  # the paper: every model 800 epochs (nnU-Net's own: 1000)
    args = parser.parse_args(argv)
    check_common_args(args)
    args.modality = "all" if args.modality.lower() == "all" else canonical_modality(args.modality)
    if args.modality != "all" and args.modality not in args.modalities:
        raise InputError(f"--modality {args.modality} is not one of --modalities {args.modalities}.")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    dist_info = init_distributed(args.device)
    device = dist_info.device
    rng = seed_everything(args.seed, rank=dist_info.rank)
    ckpt = prepare_run_dir(args.out, resume=args.resume, args=args, kind=KIND, is_main=dist_info.is_main)
    out = Path(args.out)
    ckpt_path = out / "checkpoint.pt"

    split, data = prepare_data(args, dist_info, only_modality=args.modality)
    if dist_info.is_main:
        write_split(out / "split.json", split)
        what = "universal nnU-Net (every modality)" if args.modality == "all" else f"expert for {args.modality}"
        print(f"phase 1: {what} on {len(data.case_of)} images\n{data.describe()}")
    cfg = config_from_args(args)
    model = build_expert(cfg).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.99, nesterov=True,
                                weight_decay=args.weight_decay)  # fmt: skip
    amp_dtype = pick_amp_dtype(device, enabled=args.amp)
    scaler = make_grad_scaler(device, amp_dtype)
    start_epoch = 0
    if ckpt is not None:
        start_epoch = int(restore_run(ckpt, kind=KIND, model=model, optimizer=optimizer, scaler=scaler,
                                      generator=rng, device=device)["epoch"])  # fmt: skip
        if dist_info.is_main:
            print(f"resumed {ckpt_path} at epoch {start_epoch}")
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    # the lowest deep-supervision head has loss weight 0 (nnU-Net), so its parameters get no gradient
    forward_model, raw_model = maybe_compile(wrap_ddp(model, dist_info, find_unused_parameters=True), use_compile)
    weights = deep_supervision_weights(cfg.num_levels).to(device)
    steps, stop_epoch = args.steps_per_epoch, last_epoch(args, start_epoch)
    logger = MetricsLogger(out / "log.csv", is_main=dist_info.is_main, start_step=start_epoch * steps)
    batches = training_batch_iterator(args, data, rank=dist_info.rank, device=device, start=start_epoch * steps,
                                      stop=stop_epoch * steps)  # fmt: skip

    for epoch in range(start_epoch, stop_epoch):
        lr = poly_lr(epoch, args.epochs, args.lr)  # nnU-Net steps the poly schedule once per epoch
        for group in optimizer.param_groups:
            group["lr"] = lr
        forward_model.train()
        t0, total = time.time(), 0.0
        bar = tqdm(range(steps), desc=f"epoch {epoch}", disable=not dist_info.is_main, leave=False)
        for it in bar:
            batch = next(batches)  # on `device`, augmented
            x, y = batch["image"], batch["label"]
            with autocast_context(device, enabled=args.amp):
                outputs = forward_model(x)  # L logits, highest resolution first
                targets = downsample_target(y, [o.shape[2:] for o in outputs])
                loss = deep_supervised_loss([o.float() for o in outputs], targets, weights)  # Eq. 3
            check_finite_loss(loss, epoch * steps + it, checkpoint_path=ckpt_path)
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), 12.0)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            total += loss.item()
            bar.set_postfix(loss=f"{loss.item():.4f}")
        mean_loss = all_reduce_mean(total / steps)
        logger.log(step=(epoch + 1) * steps, epoch=epoch, loss=mean_loss, lr=lr,
                   seconds=time.time() - t0)  # fmt: skip
        rng_states = gather_rng_state(rng)
        if dist_info.is_main:
            print(f"epoch {epoch}: loss {mean_loss:.4f} lr {lr:.2e} ({time.time() - t0:.1f} s)")
            save_run(ckpt_path, kind=KIND, model=raw_model, cfg=cfg, optimizer=optimizer, scaler=scaler,
                     epoch=epoch + 1, args=args, rng=rng_states, grid=data.grid, modality=args.modality)  # fmt: skip


if __name__ == "__main__":
    run_cli(main)
