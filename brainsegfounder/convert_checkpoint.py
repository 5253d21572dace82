"""Convert SwinUNETR / Swin-UNETR / BrainSegFounder weights into one plain file this package reads directly.

    python -m brainsegfounder.convert_checkpoint model_weights_BRATS-finetune.pt --out bsf_brats.pt \
        --channels FLAIR T1ce T1 T2
    python -m brainsegfounder.convert_checkpoint finetune_best_val_loss.pt --out atlas.pt --channels T1 --trust-pickle

The format is detected and reported (see `brainsegfounder.weights`); the layout is read off the shapes. The
output holds only tensors and plain values (it loads with `torch.load(..., weights_only=True)`), our key names,
the inferred layout, the patch-merging order and, when given, the input modalities, so that `finetune --init`
and `predict --model` need no further flags. `--trust-pickle` unpickles a file that holds Python objects (e.g.
a whole `torch.save(model)`); that runs code from the file, so use it only for files you trust, once, here.
"""

import argparse
from pathlib import Path

from brainsegfounder.train_common import patch_size
from brainsegfounder.weights import (
    CONVERTED_KIND,
    describe_weights,
    read_weights,
    resolve_legacy_merging,
    segmentation_target,
)
from shared import cli
from shared.checkpoint import save_checkpoint
from shared.cli import run_cli
from shared.dataset import canonical_modality
from shared.errors import InputError


def main(argv=None) -> None:
    parser = cli.make_parser(__doc__, prog="python -m brainsegfounder.convert_checkpoint")
    parser.add_argument("source", help="weights file (.pt / .pth / .ckpt)")
    parser.add_argument("--out", required=True, help="plain output file (.pt)")
    parser.add_argument("--channels", nargs="+", help="input modalities in channel order (BSF BraTS: FLAIR T1ce T1 T2)")
    parser.add_argument("--legacy-merging", action=argparse.BooleanOptionalAction, default=None,
                        help="patch-merging order the weights were trained with: MONAI < 1.5 (legacy) or not "
                        "(default: as recorded, else legacy, as the released weights)")  # fmt: skip
    parser.add_argument("--patch", type=patch_size, nargs=3, help="sliding-window patch recorded for predict (e.g. "
                        "128 128 128)")  # fmt: skip
    parser.add_argument("--trust-pickle", action="store_true",
                        help="unpickle Python objects in the source (runs its code: trusted files only)")  # fmt: skip
    args = parser.parse_args(argv)
    out = cli.check_output_file(args.out, "--out", suffixes=(".pt", ".pth"))
    if out.resolve() == Path(args.source).resolve():
        raise InputError(f"--out {out} is the source file; write the plain copy beside it.")
    weights = read_weights(args.source, flag="source", trust_pickle=args.trust_pickle)
    legacy, merging_note = resolve_legacy_merging(weights, args.legacy_merging, flag="source")
    channels = [canonical_modality(c) for c in args.channels] if args.channels else weights.channels
    if channels and len(channels) != weights.in_channels:
        raise InputError(f"--channels names {len(channels)} channel(s) but {args.source} has {weights.in_channels}.")
    weights.channels = channels
    target = segmentation_target(weights, flag="source") if weights.out_channels is not None else None
    config = {**weights.arch, "in_channels": weights.in_channels, "legacy_merging": legacy}
    if weights.out_channels is not None:
        config["out_channels"] = weights.out_channels
    save_checkpoint(out, kind=CONVERTED_KIND, format=weights.format, source=str(args.source), model=weights.state,
                    config=config, channels=channels, legacy_merging=legacy, target=target,
                    patch=list(args.patch or weights.meta.get("patch") or []) or None,
                    brats_labels=weights.meta.get("brats_labels"))  # fmt: skip
    print(describe_weights(weights, merging_note))
    if target is not None:
        print(f"  output channels: {'TC, WT, ET sigmoid' if target == 'brats' else 'one lesion sigmoid'}")
    print(f"wrote {out} ({len(weights.state)} tensors)")


if __name__ == "__main__":
    run_cli(main)
