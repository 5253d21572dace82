"""Turn the official MoME release (a gate and five expert nnU-Net checkpoints) into one checkpoint for mome.predict.

    python -m mome.convert_checkpoint --release MoME_CHECKPOINT/.../fold_MoME --output runs/mome_official.pt
    python -m mome.convert_checkpoint --gate fold_MoME/checkpoint_best.pth \
        --experts fold_MoME/checkpoint_best{1,2,3,4,5}.pth --plans plans.json --output runs/mome_official.pt
    python -m mome.predict --model runs/mome_official.pt --input scans/ --output preds/

The official predictor loads `checkpoint_best.pth` (the gate, 1 + 5*32 channels in, 10 out) and
`checkpoint_best1..5.pth` (the experts in the order T1, T1ce, T2, FLAIR, DWI); `--release DIR` picks these
names (`--checkpoint final` picks checkpoint_final*.pth). The topology (stages, widths, kernels, strides, conv
counts) is read from the weights. The training patch, which the sliding window of mome.predict uses, is read
from nnU-Net's plans: `--plans plans.json`, else the plans that nnU-Net stores in the gate checkpoint
(`init_args`), else a plans.json beside the release folder; given plans must also agree with the weights.
nnU-Net checkpoints pickle numpy scalars, which are read with `torch.load(weights_only=True)` and an
allowlist; a file that pickles anything else needs `--trust-pickle` (it then runs the file's pickle code: only
for files whose origin you trust). The output holds tensors and plain values only and loads with weights_only.
"""

import dataclasses
from pathlib import Path

from mome.config import MoMEConfig
from mome.model import build_mome
from mome.nnunet_import import load_checked, load_nnunet_mome, read_nnunet_file
from mome.nnunet_plans import read_plans
from mome.train_common import stride_divisor
from shared.checkpoint import save_checkpoint
from shared.cli import check_output_file, make_parser, positive_int, run_cli
from shared.dataset import MODALITIES, canonical_modality
from shared.errors import InputError
from shared.geometry import MNI_CROPPED_SHAPE

OFFICIAL_ORDER = MODALITIES  # T1, T1ce, T2, FLAIR, DWI: network1..5 of the official trainer


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--release", help="folder with checkpoint_<name>.pth (gate) and checkpoint_<name>1..N.pth")
    parser.add_argument("--checkpoint", default="best", help="<name> of the release files: best, final or latest")
    parser.add_argument("--gate", help="the gate's nnU-Net checkpoint (instead of --release)")
    parser.add_argument("--experts", nargs="+", help="the experts' nnU-Net checkpoints in --modalities order")
    parser.add_argument("--modalities", nargs="+", default=list(OFFICIAL_ORDER), help="expert order")
    parser.add_argument("--plans", help="nnU-Net plans.json (default: the plans stored in the gate checkpoint)")
    parser.add_argument("--configuration", default="3d_fullres", help="configuration of the plans")
    parser.add_argument("--patch", type=positive_int, nargs=3, help="sliding-window patch, overriding the plans")
    parser.add_argument("--grid", type=positive_int, nargs=3, default=list(MNI_CROPPED_SHAPE),
                        help="input grid the model was trained on; mome.predict refuses other shapes unless cropped "
                        "or padded explicitly (the paper: MNI152 1 mm cropped to 160 196 160)")  # fmt: skip
    parser.add_argument("--trust-pickle", action="store_true", help="allow unpickling inputs that pickle more than "
                        "numpy scalars (runs their code: only for files you trust)")  # fmt: skip
    parser.add_argument("--output", required=True, help="checkpoint file to write (.pt)")
    parser.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    args = parser.parse_args(argv)
    if bool(args.release) == bool(args.gate or args.experts):
        raise InputError("give either --release DIR or --gate and --experts, not both or neither.")
    args.modalities = [canonical_modality(m) for m in args.modalities]
    if len(set(args.modalities)) != len(args.modalities):
        raise InputError(f"--modalities {args.modalities} names a modality twice.")
    if args.release:
        release = Path(args.release)
        if not release.is_dir():
            raise InputError(f"--release {release} is not a folder.")
        args.gate = str(release / f"checkpoint_{args.checkpoint}.pth")
        args.experts = [str(release / f"checkpoint_{args.checkpoint}{i + 1}.pth") for i in range(len(args.modalities))]
    elif not (args.gate and args.experts):
        raise InputError("--gate and --experts are needed together (or give --release DIR).")
    if len(args.experts) != len(args.modalities):
        raise InputError(f"--experts lists {len(args.experts)} files but --modalities has {len(args.modalities)}.")
    for path in [args.gate, *args.experts]:
        if not Path(path).is_file():
            raise InputError(f"{path}: checkpoint file not found.")
    out = check_output_file(args.output, "--output", suffixes=(".pt",))
    if out.exists() and not args.force:
        raise InputError(f"--output {out} exists; pass --force to overwrite it.")
    return args


def _nested_tuple(value):
    """Lists and tuples at any depth as tuples, so that plans (JSON lists) compare with weight shapes (tuples)."""
    return tuple(_nested_tuple(v) for v in value) if isinstance(value, list | tuple) else value


def find_plans(args) -> tuple[dict | str | None, str]:
    """The plans to read the patch from, and where they came from (see the module docstring for the order)."""
    if args.plans:
        return args.plans, "--plans"
    init_args = read_nnunet_file(args.gate, trust_pickle=args.trust_pickle).get("init_args")
    if isinstance(init_args, dict) and isinstance(init_args.get("plans"), dict):
        args.configuration = init_args.get("configuration", args.configuration)
        return init_args["plans"], f"the plans stored in {args.gate}"
    for folder in (Path(args.gate).parent, Path(args.gate).parent.parent):
        if (folder / "plans.json").is_file():
            return str(folder / "plans.json"), "plans.json"
    return None, ""


def config_of(model, modalities) -> MoMEConfig:
    """The MoMEConfig that rebuilds an imported MoME (experts and gate share kernels, strides and conv counts)."""
    expert, gate = model.experts[0].arch, model.gate.unet.arch
    for key in ("kernel_sizes", "strides", "n_conv_per_stage", "n_conv_per_stage_decoder", "conv_bias"):
        if expert[key] != gate[key]:
            raise InputError(f"the gate's {key} {gate[key]} differs from the experts' {expert[key]}.")
    return MoMEConfig(
        modalities=tuple(modalities),
        in_channels=expert["in_channels"],
        num_classes=expert["num_classes"],
        features=tuple(expert["features"]),
        kernel_sizes=tuple(expert["kernel_sizes"]),
        strides=tuple(expert["strides"]),
        n_conv_per_stage=tuple(expert["n_conv_per_stage"]),
        n_conv_per_stage_decoder=tuple(expert["n_conv_per_stage_decoder"]),
        conv_bias=expert["conv_bias"],
        gate_features=tuple(gate["features"]),
    )


def convert(args) -> dict:
    """Load and check the release; return the checkpoint payload that `mome.predict.load_model` rebuilds."""
    model = load_nnunet_mome(args.gate, args.experts, trust_pickle=args.trust_pickle)
    cfg = config_of(model, args.modalities)
    rebuilt = build_mome(cfg)
    load_checked(rebuilt, model.state_dict(), source=f"the release {args.gate}")  # what mome.predict will do
    plans, origin = find_plans(args)
    patch = None
    if plans is not None:
        info = read_plans(plans, args.configuration, source=origin)
        for key, value in info["arch"].items():
            found = model.experts[0].arch[key]
            if _nested_tuple(found) != _nested_tuple(value):
                raise InputError(f"{origin}: {key} {_nested_tuple(value)} contradicts the weights ({found}).")
        patch = info["patch_size"]
    if args.patch is not None:
        patch, origin = tuple(args.patch), "--patch"
    if patch is None:
        raise InputError(
            f"{args.gate} records no plans and none were found beside it; pass --plans PLANS.json or --patch X Y Z."
        )
    divisor = stride_divisor(cfg)
    if any(p % d for p, d in zip(patch, divisor)):
        raise InputError(f"patch {list(patch)} from {origin} is not divisible by the network's strides {divisor}.")
    return {
        "kind": "mome",
        "config": dataclasses.asdict(cfg),
        "model": rebuilt.state_dict(),
        "patch": list(patch),
        "grid": list(args.grid),
        "mirror_axes": [0, 1, 2],  # the official predictor mirrors along all three axes (8 passes)
        "source": {"gate": str(args.gate), "experts": [str(p) for p in args.experts], "patch_from": origin},
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    payload = convert(args)
    save_checkpoint(args.output, **payload)
    n_params = sum(v.numel() for v in payload["model"].values())
    print(
        f"wrote {args.output}: MoME with experts {', '.join(args.modalities)} and gate, {n_params / 1e6:.1f} M "
        f"parameters, patch {payload['patch']} ({payload['source']['patch_from']}), grid {payload['grid']}"
    )


if __name__ == "__main__":
    run_cli(main)
