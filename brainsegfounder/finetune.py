"""BrainSegFounder Stage 3: supervised fine-tuning of SwinUNETR from a pretrained encoder (or from scratch).

    python -m brainsegfounder.finetune --data BRATS_DIR --channels FLAIR T1ce T1 T2 --target brats \
        --init runs/stage2/best.pt --out runs/finetune
    python -m brainsegfounder.finetune ... --train-fraction 0.05 0.1 0.2 0.4 --repeats 5 --arm two-stage \
        --out runs/fewshot/two_stage                                  # few-shot (paper Fig. 5, Table 9)
    python -m brainsegfounder.fewshot runs/fewshot/*                  # the table over the arms

The encoder comes from `--init` (a pretraining run, Swin-UNETR's `model_swinvit.pt`, BrainSegFounder or MONAI
weights; format detected and reported), the decoder is fresh; without `--init` the whole model is trained
from scratch (the SwinUNETR baseline). A study's arms are calls that differ only in `--init` (and `--arm`):
scratch, one-stage (a Stage-1 or a Stage-2-only encoder) and two-stage.

Cases: the labelled imagesTr cases, split into training and validation by `--fold/--folds` (k-fold),
`--split-file` (nnU-Net's splits_final.json, a BrainSegFounder fold list, a plain split) or `--holdout N` (a
fixed held-out set, the paper's ATLAS recipe). For each `--train-fraction` f and repeat r a random subset of
ceil(f N) training cases is drawn from (seed, f, r) alone, so every arm trains on the same subsets, from the
same decoder initialisation and with the same batches. Each run validates every `--val-every` steps and at the
end, and keeps as best.pt the checkpoint of the highest mean validation Dice. Validation scores what predict +
evaluate score (sigmoid > 0.5, through the label map and back to regions, `brainsegfounder.scoring`); a case
whose reference region is empty is left out of that region's mean by default (`--empty-reference skip`, BSF's
MONAI DiceMetric; the skipped counts are printed and stored) or scored 1 / 0 (`score`). The selection uses
this hard Dice by default; BSF selects by soft Dice (MONAI DiceMetric on the sigmoid channels, no threshold),
which is `--select soft` (the soft Dice is computed and logged either way). It writes

    OUT/fraction_<f>/repeat_<r>/checkpoint.pt, best.pt, log.csv, split.json
    OUT/summary.json, OUT/split.json

BraTS targets are the [TC, WT, ET] regions of the label values named in dataset.json (`--brats-labels`
overrides). `--freeze-encoder` trains only the patch embedding and the decoder (BSF's option).

Defaults follow the paper's Stage 3 (Table 3: batch 2, AdamW lr 1e-4, 50,000 steps) with BSF's 128^3 crops;
the official code's warm-up cosine schedule (`--warmup 500` steps here, 50 epochs there) stands in for its
300 epochs.
"""

import dataclasses
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from brainsegfounder.data import (
    SegDraw,
    cache_cases,
    parse_channels,
    preprocessing,
    read_volume,
    segmentation_target,
)
from brainsegfounder.losses import dice_bce_loss, dice_loss
from brainsegfounder.model import SwinUNETRConfig, build_swinunetr
from brainsegfounder.predict import predict_probabilities
from brainsegfounder.regions import REGIONS, region_channels
from brainsegfounder.scoring import (
    add_empty_reference_arg,
    case_scores,
    describe_skipped,
    predicted_regions,
    region_means,
)
from brainsegfounder.splits import few_shot_subsets, held_out_split, run_seed
from brainsegfounder.train_common import (
    SEG_KIND,
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
from shared.atomic import atomic_path
from shared.augment import PIPELINES, AugmentationPipeline, BatchAugmentation, initial_patch_size
from shared.brats import describe, labels_from_dataset
from shared.checkpoint import check_same_run, load_checkpoint, prepare_run_dir, restore_run, save_checkpoint
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
from shared.loader import default_workers, training_batches
from shared.splits import write_split
from shared.stats import mean_std

LOSSES = {"dice": dice_loss, "dicece": dice_bce_loss}
TARGET_REGIONS = {"brats": REGIONS, "binary": ("lesion",)}
dropout_rate = cli.number_in(float, "a rate in [0, 1)", low=0.0, high=1.0, high_open=True)


def parse_args(argv=None):
    parser = cli.make_parser(__doc__, prog="python -m brainsegfounder.finetune")
    g = parser.add_argument_group("data")
    g.add_argument("--data", required=True, help="labelled nnU-Net raw dataset folder")
    g.add_argument("--channels", nargs="+", required=True, help="input modalities in channel order")
    g.add_argument("--target", choices=sorted(TARGET_REGIONS), default="brats",
                   help="brats: TC/WT/ET sigmoid channels; binary: one lesion channel (label > 0)")  # fmt: skip
    g.add_argument("--brats-labels", type=cli.positive_int, nargs=3, metavar=("NECROSIS", "EDEMA", "ENH"),
                   help="label values of the BraTS classes, overriding the dataset.json names")  # fmt: skip
    add_split_args(g)
    g.add_argument("--patch", type=patch_size, nargs=3, default=(128, 128, 128), help="training crop (BSF: 128^3)")
    g.add_argument("--batch-size", type=cli.positive_int, default=2, help="crops per step and process")
    g.add_argument("--loss", choices=sorted(LOSSES), default="dice", help="sigmoid Dice (BSF) or Dice + BCE")
    g.add_argument("--overlap", type=cli.overlap_fraction, default=0.5, help="sliding-window overlap of the validation")
    add_empty_reference_arg(g)
    g.add_argument("--select", choices=("hard", "soft"), default="hard",
                   help="validation Dice that picks best.pt: hard (sigmoid > 0.5, as scored) or soft (BSF: the "
                   "sigmoid channels themselves, no threshold)")  # fmt: skip
    g = parser.add_argument_group("few-shot study")
    g.add_argument("--train-fraction", type=cli.fraction, nargs="+", default=[1.0],
                   help="fractions of the training cases, one run per fraction and repeat (paper: 0.05 0.1 0.2 "
                   "0.4)")  # fmt: skip
    g.add_argument(
        "--repeats", type=cli.positive_int, default=1, help="random training subsets per fraction (paper: 5)"
    )
    g.add_argument("--arm", help="name of this arm in the study table (default: scratch, or the --init run's name)")
    g.add_argument("--val-every", type=cli.non_negative_int, default=0,
                   help="validate every N steps and keep the best checkpoint (0: only at the end)")  # fmt: skip
    add_model_args(parser)
    g = parser.add_argument_group("regularisation")
    g.add_argument("--dropout", type=dropout_rate, default=0.0, help="dropout in the Swin blocks (paper ATLAS: 0.1)")
    g.add_argument(
        "--rotation",
        type=cli.probability,
        default=0.0,
        help="probability of a random rotation (up to 30 degrees about each axis, nnU-Net's) per patch, "
        "added to BSF's flips and intensity scale/shift (paper ATLAS recipe: rotation; e.g. 0.2)",
    )
    g.add_argument("--freeze-encoder", action="store_true",
                   help="train only the patch embedding and the decoder (needs --init)")  # fmt: skip
    add_run_args(parser, lr=1e-4, steps=50_000, warmup=500, weight_decay=1e-5,
                 out_holds="summary.json, split.json, fraction_F/repeat_R/{checkpoint.pt, best.pt, log.csv, "
                 "split.json}")  # fmt: skip
    args = parser.parse_args(argv)
    check_run_args(args)
    args.channels = parse_channels(args.channels)
    if len(set(args.train_fraction)) != len(args.train_fraction):
        raise InputError(f"--train-fraction {' '.join(map(str, args.train_fraction))}: a fraction is repeated.")
    if args.freeze_encoder and not args.init:
        raise InputError("--freeze-encoder needs --init: a randomly initialised encoder has nothing to keep.")
    args.arm = args.arm or default_arm(args.init)
    return args


def default_arm(init) -> str:
    """The study's name of a run: scratch, or the --init run folder's name (best.pt / checkpoint.pt), or the file's."""
    if not init:
        return "scratch"
    path = Path(init)
    return path.parent.name if path.stem in ("best", "checkpoint") and path.parent.name else path.stem


def freeze_encoder(model) -> int:
    """Stop gradients into the Swin encoder except its patch embedding (BSF `--freeze_encoder`); frozen count."""
    frozen = 0
    for name, param in model.swinViT.named_parameters():
        if not name.startswith("patch_embed."):
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


@torch.no_grad()
def validate(model, cases, *, channels, patch, target: str, values, overlap: float, device, amp: bool,
             empty_reference: str = "skip") -> dict:  # fmt: skip
    """Validation Dice per region, as predict + evaluate would score the same model (`brainsegfounder.scoring`).

    Sliding windows, sigmoid > 0.5, through the label map and back to regions; each region's mean over the
    cases with `empty_reference` "skip" (cases with an empty reference left out, BSF / MONAI) or "score"
    (empty / empty = 1, a prediction on an empty reference = 0). Each rank scores its share of the cached
    cases, one volume in memory at a time; the per-case scores are gathered.

    Returns:
        `scoring.region_means` ({region: mean, "mean", "skipped", "n_cases"}) plus "soft" (the same means of
        the soft Dice of each sigmoid channel, no threshold, BSF's selection metric), "empty_reference" and
        "per_case" ({case id: {"dice": {region: Dice with the "score" convention}, "empty": [regions]}}), from
        which `fewshot` recomputes the means under either convention.
    """
    model.eval()
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    names = TARGET_REGIONS[target]
    per_case = {}
    for case in cases[rank::world]:
        image, label = read_volume(case, channels)
        probs = predict_probabilities(model, image, patch_size=patch, overlap=overlap, device=device, amp=amp)
        truth = segmentation_target(label, target, values) > 0.5
        per_case[case.case_id] = case_scores(predicted_regions(probs, target, values), truth, names, probs=probs)
    if dist.is_initialized():
        shares = [None] * world
        dist.all_gather_object(shares, per_case)
        per_case = {k: v for share in shares for k, v in share.items()}
    model.train()
    per_case = {c.case_id: per_case[c.case_id] for c in cases}  # case order, whatever the ranks
    means = region_means(per_case, names, empty_reference)
    soft = region_means(per_case, names, empty_reference, key="soft")
    return {
        **means,
        "soft": {k: soft[k] for k in (*names, "mean")},
        "empty_reference": empty_reference,
        "per_case": per_case,
    }


def augmentation(args) -> AugmentationPipeline:
    """BrainSegFounder's fine-tuning augmentation (flips, intensity scale and shift), plus `--rotation`."""
    return dataclasses.replace(PIPELINES["bsf_finetune"], p_rotation=args.rotation)


def run_folder(out: Path, fraction: float, repeat: int) -> Path:
    return out / f"fraction_{fraction:g}" / f"repeat_{repeat}"


def train_run(args, fraction: float, repeat: int, pool: list, cached: dict, val_cases: list, values, arch: dict,
              init, dist_info, workers: int) -> dict | None:  # fmt: skip
    """Train one (fraction, repeat) run to the end (or to --stop-after); its result, or None if stopped early."""
    device = dist_info.device
    out = run_folder(Path(args.out), fraction, repeat)
    ckpt_path = out / "checkpoint.pt"
    previous = prepare_run_dir(out, resume=args.resume, args=args, kind=SEG_KIND, is_main=dist_info.is_main)
    resuming = previous is not None
    if resuming and previous["step"] == args.steps and "result" in previous:
        return previous["result"]  # this run already finished
    subset = few_shot_subsets(pool, fraction, seed=args.seed, repeats=repeat + 1)[repeat]
    seed = run_seed(args.seed, fraction, repeat, 1)
    rng = seed_everything(seed, rank=dist_info.rank)  # the same decoder initialisation in every arm
    cfg = SwinUNETRConfig(in_channels=len(args.channels), out_channels=len(TARGET_REGIONS[args.target]),
                          drop_rate=args.dropout, use_checkpoint=args.checkpointing, **arch)  # fmt: skip
    model = build_swinunetr(cfg).to(device)
    if init is not None and not resuming:
        init_encoder(model.swinViT, init, args, args.channels, dist_info.is_main)
    if args.freeze_encoder:
        frozen = freeze_encoder(model)
        if dist_info.is_main:
            print(f"--freeze-encoder: {frozen:,} encoder parameters frozen (patch embedding trained)")
    if dist_info.is_main:
        print(f"fraction {fraction:g}, repeat {repeat}: {len(subset)} of {len(pool)} training cases "
              f"({', '.join(subset[:6])}{' ...' * (len(subset) > 6)})")  # fmt: skip
        write_split(
            out / "split.json", {Path(args.data).name: {"train": subset, "val": [c.case_id for c in val_cases]}}
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=args.weight_decay)
    scaler = make_grad_scaler(device, pick_amp_dtype(device, enabled=args.amp))
    start, best = 0, {"mean": -1.0, "step": 0}
    if resuming:
        ckpt = restore_run(previous, kind=SEG_KIND, model=model, optimizer=optimizer, scaler=scaler, generator=rng,
                           device=device)  # fmt: skip
        start, best = int(ckpt["step"]), dict(ckpt.get("best", best))
    use_compile = device.type == "cuda" if args.compile is None else args.compile
    forward_model, raw_model = maybe_compile(wrap_ddp(model, dist_info), use_compile)
    logger = MetricsLogger(out / "log.csv", is_main=dist_info.is_main, start_step=start)
    loss_fn = LOSSES[args.loss]
    stop = args.steps if args.stop_after is None else min(args.steps, start + args.stop_after)
    pipeline = augmentation(args)
    draw = SegDraw(tuple(cached[c] for c in subset), tuple(args.channels), args.batch_size, tuple(args.patch),
                   initial_patch_size(args.patch, pipeline), pipeline)  # fmt: skip
    batches = training_batches(draw, seed=seed, rank=dist_info.rank, start=start, stop=stop, workers=workers,
                               device=device, augment=BatchAugmentation(pipeline, tuple(args.patch)))  # fmt: skip
    total, summed, t0, final = 0.0, 0, time.time(), {}

    def result(final: dict, best: dict) -> dict:
        return {"fraction": fraction, "repeat": repeat, "train_cases": subset, "final": final,
                "best": best if best["mean"] >= 0 else {}}  # fmt: skip

    record = {"channels": args.channels, "target": args.target, "patch": list(args.patch),
              "brats_labels": list(values) if values else None}  # fmt: skip

    forward_model.train()
    bar = tqdm(batches, total=stop - start, desc=f"finetune f{fraction:g} r{repeat}", disable=not dist_info.is_main)
    for step, batch in zip(range(start, stop), bar):
        lr = warmup_cosine_lr(step, args.steps, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = batch["image"]  # (B, C, *patch), augmented
        y = region_channels(batch["label"], args.target, values)  # (B, K, *patch) from the augmented labels
        with autocast_context(device, enabled=args.amp):
            loss = loss_fn(forward_model(x).float(), y)
        check_finite_loss(loss, step, checkpoint_path=ckpt_path)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(trainable, args.grad_clip)
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        total += float(loss.detach())
        summed += 1
        bar.set_postfix(loss=f"{loss.item():.4f}")
        done = step + 1
        scores = {}
        if val_cases and (done == args.steps or (args.val_every and done % args.val_every == 0)):
            scores = validate(raw_model, val_cases, channels=args.channels, patch=args.patch, target=args.target,
                              values=values, overlap=args.overlap, device=device, amp=args.amp,
                              empty_reference=args.empty_reference)  # fmt: skip
            if dist_info.is_main and scores["empty_reference"] == "skip":
                print(f"step {done}: {describe_skipped(scores['skipped'], scores['n_cases'])}")
            selection = scores["mean"] if args.select == "hard" else scores["soft"]["mean"]
            if selection > best.get("selection", best["mean"]):
                best = {**scores, "step": done, "select": args.select, "selection": selection}
                if dist_info.is_main:
                    save_checkpoint(out / "best.pt", kind=SEG_KIND, config=dataclasses.asdict(cfg),
                                    model=raw_model.state_dict(), step=done, validation=best, **record)  # fmt: skip
            if done == args.steps:
                final = scores
        if done % args.log_every == 0 or done == stop or scores:
            logger.log(step=done, lr=lr, loss=all_reduce_mean(total / summed), seconds=time.time() - t0,
                       **{f"val_{k}": scores[k] for k in (*TARGET_REGIONS[args.target], "mean") if scores},
                       **({"val_soft_mean": scores["soft"]["mean"]} if scores else {}))  # fmt: skip
            total, summed, t0 = 0.0, 0, time.time()
        if done % args.log_every == 0 or done == stop:
            rng_states = gather_rng_state(rng)
            if dist_info.is_main:  # a finished run keeps its result, so a resumed study does not train it again
                save_run(ckpt_path, kind=SEG_KIND, model=raw_model, cfg=cfg, channels=args.channels,
                         optimizer=optimizer, scaler=scaler, step=done, args=args, rng=rng_states, best=best,
                         **({"result": result(final, best)} if done == args.steps else {}),
                         **{k: v for k, v in record.items() if k != "channels"})  # fmt: skip
    return result(final, best) if stop == args.steps else None


def summarise(args, results: list, val_ids: list) -> dict:
    """OUT/summary.json: the arm, its runs, and mean +- std (ddof 1) of the final mean Dice per fraction."""
    fractions = {}
    for fraction in args.train_fraction:
        finals = [r["final"]["mean"] for r in results if r["fraction"] == fraction and r["final"]]
        if finals:
            mean, std = mean_std(finals)
            fractions[f"{fraction:g}"] = {"mean": mean, "std": std, "n": len(finals)}
    return {"arm": args.arm, "init": args.init, "data": str(Path(args.data).resolve()), "target": args.target,
            "regions": list(TARGET_REGIONS[args.target]), "seed": args.seed, "steps": args.steps,
            "fold": args.fold, "folds": args.folds, "split_file": args.split_file, "holdout": args.holdout,
            "val_cases": val_ids,
            "empty_reference": args.empty_reference,
            "metric": "Dice per region of sigmoid > 0.5 as predict + evaluate score it, on the validation cases "
            f"(empty references: {args.empty_reference}), mean over regions",
            "fractions": fractions, "runs": results}  # fmt: skip


def check_existing_runs(out: Path, args) -> None:
    """Before any work: refuse a folder that holds runs unless resuming, and runs of other flags when resuming."""
    out = cli.check_output_dir(out, "--out")
    existing = sorted(out.glob("fraction_*/repeat_*/checkpoint.pt"))
    if (existing or (out / "summary.json").exists()) and not args.resume:
        raise InputError(f"--out {out} already holds runs; pass --resume to continue them or pick a new folder.")
    for path in existing:  # each run is checked again when it starts; this refuses before anything is written
        check_same_run(load_checkpoint(path).get("args"), args, path=path)


def main(argv=None) -> None:
    args = parse_args(argv)
    out = Path(args.out)
    check_existing_runs(out, args)
    dist_info = init_distributed(args.device)
    values = None
    if args.target == "brats":
        values, source = labels_from_dataset(args.data, args.brats_labels)
        if dist_info.is_main:
            print(describe(values, source))
    split = held_out_split(args.data, fold=args.fold, folds=args.folds, split_file=args.split_file,
                           holdout=args.holdout)  # fmt: skip
    arch, init = resolve_architecture(args)
    workers = default_workers(dist_info.device) if args.workers is None else args.workers
    entries = cache_cases(args.data, preprocessing(args.channels, "zscore"), split["train"] + split["val"],
                          cache_root=args.cache, processes=max(1, workers))  # fmt: skip
    cached = {c.case_id: c for c in entries}
    val_cases = [cached[c] for c in split["val"]]
    if dist_info.is_main:
        write_split(out / "split.json", {Path(args.data).name: split})
    results = []
    for fraction in args.train_fraction:
        for repeat in range(args.repeats):
            result = train_run(args, fraction, repeat, split["train"], cached, val_cases, values, arch, init, dist_info,
                               workers)  # fmt: skip
            if result is None:
                if dist_info.is_main:
                    print(f"stopped in fraction {fraction:g}, repeat {repeat}; continue with --resume")
                return
            results.append(result)
            if dist_info.is_main and result["final"]:
                print(f"fraction {fraction:g}, repeat {repeat}: validation Dice "
                      + ", ".join(f"{k} {result['final'][k]:.4f}" for k in (*TARGET_REGIONS[args.target], "mean"))
                      + f" ({describe_skipped(result['final']['skipped'], result['final']['n_cases'])})")  # fmt: skip
    if dist_info.is_main:
        summary = summarise(args, results, [c.case_id for c in val_cases])
        with atomic_path(out / "summary.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=1))
        for fraction, entry in summary["fractions"].items():
            print(f"{args.arm}, fraction {fraction}: validation Dice {entry['mean']:.4f} +- {entry['std']:.4f} "
                  f"over {entry['n']} repeat(s)")  # fmt: skip
        print(f"wrote {out / 'summary.json'}")


if __name__ == "__main__":
    run_cli(main)
