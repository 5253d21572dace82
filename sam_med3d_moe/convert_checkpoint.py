"""Convert an official SAM-Med3D checkpoint file (e.g. sam_med3d_turbo.pth) into a plain state_dict, once.

    python -m sam_med3d_moe.convert_checkpoint --input sam_med3d_turbo.pth --output turbo_state_dict.pt --trust-pickle

Official files are training checkpoints that pickle Python objects besides the weights (argparse Namespace,
lists of datasets, ...), so reading them runs pickle code: only do it for a file whose origin you trust, which
is what --trust-pickle states. The output holds only the `model_state_dict` tensors, checked key by key and
shape by shape against the official `vit_b_ori` architecture, and loads everywhere with weights_only=True.
"""

from pathlib import Path

import torch

from sam_med3d_moe.config import CONFIG_NAMES, config_by_name
from sam_med3d_moe.model import build_model, load_weights
from shared.checkpoint import load_foreign_checkpoint, save_checkpoint, strip_prefix
from shared.cli import check_output_file, make_parser, run_cli
from shared.errors import InputError


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--input", required=True, help="official checkpoint file (.pth)")
    parser.add_argument("--output", required=True, help="plain state_dict file to write")
    parser.add_argument(
        "--trust-pickle",
        action="store_true",
        help="required: allow unpickling the input (arbitrary code), for a file you trust",
    )
    parser.add_argument("--force", action="store_true", help="overwrite --output if it exists")
    parser.add_argument(
        "--config",
        choices=CONFIG_NAMES,
        default="vit_b_ori",
        help="architecture to check against: vit_b_ori (official), small or tiny (tests)",
    )
    return parser.parse_args(argv)


def convert(path, trust_pickle: bool, config: str = "vit_b_ori") -> dict:
    """Read an official checkpoint and return its checked state_dict (tensors only, DDP prefix removed)."""
    payload = load_foreign_checkpoint(path, trust_pickle=trust_pickle, flag="--input")  # a plain file needs no trust
    if isinstance(payload, dict) and "model_state_dict" in payload:
        payload = payload["model_state_dict"]
    if not isinstance(payload, dict) or not all(isinstance(v, torch.Tensor) for v in payload.values()):
        raise InputError(f"--input {path}: holds no state_dict (a 'model_state_dict' entry or a dict of tensors).")
    state_dict = {k: v.detach().clone().contiguous() for k, v in strip_prefix(payload).items()}
    with torch.device("meta"):
        model = build_model(config_by_name(config, box_prompts=False))
    load_weights(model, state_dict, source=str(path), allow_new=False, check_only=True)
    return state_dict


def main(argv=None) -> None:
    args = parse_args(argv)
    out = check_output_file(args.output, "--output")
    if out.exists() and not args.force:
        raise InputError(f"--output {out} exists; pass --force to overwrite it.")
    if Path(args.input).resolve() == out.resolve():
        raise InputError(f"--output {out} is the --input file; write the state_dict to another file.")
    state_dict = convert(args.input, args.trust_pickle, config=args.config)
    save_checkpoint(out, **state_dict)
    n = sum(v.numel() for k, v in state_dict.items() if "gaussian" not in k)
    print(f"wrote {out}: {len(state_dict)} tensors, {n:,} parameters (+ the positional-encoding buffer)")


if __name__ == "__main__":
    run_cli(main)
