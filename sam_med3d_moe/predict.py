"""Segment one target in a NIfTI volume with SAM-Med3D, a task expert or SAM-Med3D-MoE, from points, a box or
clicks simulated from a label file; the mask is written in the input's grid and affine.

    python -m sam_med3d_moe.predict --model runs/moe/checkpoint.pt --image scan.nii.gz --point 40 52 31 \
        --output mask.nii.gz
    python -m sam_med3d_moe.predict --model turbo.pt --image ct.nii.gz --box 10 20 30 50 60 70 --output m.nii.gz
    python -m sam_med3d_moe.predict --model ... --image scan.nii.gz --label gt.nii.gz --clicks 5 --output m.nii.gz

Pipeline: RAS reorientation, resampling to --spacing mm (optionally the CT clamp), crop/pad of the model cube
centred on the prompt by torchio's rule (the first point, the box, or the label's bounding box), z-normalisation
over voxels > 0 after the crop; then one decoder step per given point (each with the previous low-res mask, the
protocol the maintainers recommend) or one box step; sigmoid > 0.5; pasted back and resampled (nearest) to the
input grid. A target larger than the crop gets more overlapping crops, blended (`inference.py`); one that needs
more than --max-crops is refused. Coordinates are input voxel indices; prompts outside the image are refused.
"""

import argparse
from pathlib import Path

import numpy as np

from sam_med3d_moe.config import SELECTOR_MODES
from sam_med3d_moe.inference import MAX_CROPS, segment_box, segment_clicks, segment_label
from sam_med3d_moe.predictor import Predictor
from sam_med3d_moe.preprocess import CT_CLAMP, bounding_box, to_model_grid
from shared.cli import run_cli
from shared.errors import InputError
from shared.geometry import from_canonical, resample_to_shape
from shared.harness import pick_device
from shared.nifti import read_nifti, write_nifti


def input_to_model(points: np.ndarray, affine, canon_affine, canon_shape, rs_shape) -> np.ndarray:
    """Map (N, 3) input voxel indices to the reoriented, resampled grid (continuous voxel coordinates)."""
    world = affine @ np.c_[points, np.ones(len(points))].T  # (4, N)
    canon = (np.linalg.inv(canon_affine) @ world)[:3].T  # (N, 3) indices in the RAS grid
    scale = np.asarray(rs_shape) / np.asarray(canon_shape)
    return (canon + 0.5) * scale - 0.5  # voxel-edge aligned, as shared.geometry.resample_to_shape


def check_inside(points: np.ndarray, shape, flag: str) -> None:
    """Refuse input voxel coordinates (N, 3) outside the image (a click there gives an empty or full mask)."""
    points = np.asarray(points, dtype=np.float64)
    if (points < 0).any() or (points > np.array(shape) - 1).any():
        raise InputError(f"{flag}: lies outside the image (voxel indices 0..{np.array(shape) - 1} per axis).")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="run checkpoint of this package or converted state_dict")
    parser.add_argument(
        "--config", default="vit_b_ori", help="architecture of a plain state_dict: vit_b_ori, small or tiny"
    )
    parser.add_argument("--image", required=True, help="one single-channel NIfTI volume")
    parser.add_argument("--output", required=True, help="NIfTI file for the binary mask (input grid and affine)")
    parser.add_argument(
        "--point",
        type=float,
        nargs=3,
        action="append",
        metavar=("I", "J", "K"),
        help="a positive click (input voxel indices); repeat for one refinement step per click",
    )
    parser.add_argument(
        "--negative",
        type=float,
        nargs=3,
        action="append",
        metavar=("I", "J", "K"),
        help="a negative click, applied after the positive ones",
    )
    parser.add_argument(
        "--box",
        type=float,
        nargs=6,
        metavar=("I0", "J0", "K0", "I1", "J1", "K1"),
        help="a box given by two opposite corners (input voxel indices)",
    )
    parser.add_argument(
        "--allow-untrained-box",
        action="store_true",
        help="run --box even on box embeddings that were never trained (random, seeded by --seed): a test only",
    )
    parser.add_argument("--label", help="ground-truth mask (> 0) to simulate clicks from, as the official validation")
    parser.add_argument("--clicks", type=int, default=1, help="simulated clicks with --label")
    parser.add_argument("--spacing", type=float, default=1.5, help="isotropic resampling in mm (official: 1.5)")
    parser.add_argument(
        "--ct-clamp",
        action="store_true",
        help=f"clamp intensities to {list(CT_CLAMP)} HU before the z-normalisation (official CT preprocessing)",
    )
    parser.add_argument(
        "--max-crops",
        type=int,
        default=MAX_CROPS,
        help="most model crops for a target larger than one crop (the official sliding window used 27)",
    )
    parser.add_argument("--selector", choices=SELECTOR_MODES, help="MoE mask selector override")
    parser.add_argument("--tau", type=float, help="MoE selector threshold override")
    parser.add_argument("--seed", type=int, default=2023, help="seed of simulated clicks (official validation: 2023)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    given = [args.point is not None, args.box is not None, args.label is not None]
    if sum(given) != 1:
        raise InputError("give exactly one kind of prompt: --point (with optional --negative), --box or --label.")
    if args.negative and not args.point:
        raise InputError("--negative clicks need at least one --point first.")
    if args.clicks < 1 or args.max_crops < 1:
        raise InputError(f"--clicks and --max-crops must be at least 1, got {args.clicks}, {args.max_crops}.")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    predictor = Predictor(args.model, device, config=args.config, selector=args.selector, tau=args.tau, seed=args.seed)
    if args.box:
        predictor.check_box(args.allow_untrained_box, "--allow-untrained-box")
    vol = read_nifti(args.image)
    data = np.clip(vol.data, *CT_CLAMP) if args.ct_clamp else vol.data
    image, canon_affine, info, canon_shape = to_model_grid(data, vol.affine, args.spacing, order=1)
    rng = np.random.default_rng(args.seed)

    def to_model(points) -> np.ndarray:
        flat = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        return input_to_model(flat, vol.affine, canon_affine, canon_shape, image.shape)

    gt = None
    if args.label:
        lab = read_nifti(args.label)
        if lab.data.shape != vol.data.shape:
            raise InputError(f"--label {args.label}: shape {lab.data.shape} differs from the image's {vol.data.shape}.")
        gt, _, _, _ = to_model_grid((lab.data > 0).astype(np.uint8), lab.affine, args.spacing, order=0)
        if not gt.any():
            raise InputError(f"--label {args.label}: the mask is empty after resampling to {args.spacing} mm.")
        bbox = bounding_box(gt)
    elif args.box:
        check_inside(np.reshape(args.box, (2, 3)), vol.data.shape, "--box")
        corners = to_model(args.box)
        bbox = (np.clip(np.round(corners.min(axis=0)), 0, np.array(image.shape) - 1).astype(np.int64),
                np.clip(np.round(corners.max(axis=0)), 0, np.array(image.shape) - 1).astype(np.int64))  # fmt: skip
    else:
        given = [("--point", p, 1) for p in args.point] + [("--negative", p, 0) for p in args.negative or []]
        names = [f"{flag} {' '.join(f'{c:g}' for c in p)}" for flag, p, _ in given]
        for (_, p, _), name in zip(given, names):
            check_inside(np.asarray(p)[None], vol.data.shape, name)
        points = np.clip(to_model([p for _, p, _ in given]), 0, np.array(image.shape) - 1)
        model_clicks = [(point, label) for point, (_, _, label) in zip(points, given)]
    routing = []
    if gt is not None:
        mask, starts = segment_label(predictor, image, gt, args.clicks, rng, args.max_crops, routing)
    elif args.box:
        mask, starts = segment_box(predictor, image, *bbox, max_crops=args.max_crops, routing=routing)
    else:
        mask, starts = segment_clicks(predictor, image, model_clicks, names, args.max_crops, routing)
    full = resample_to_shape(mask.astype(np.uint8), canon_shape, order=0)
    write_nifti(Path(args.output), from_canonical(full, info), like=vol, dtype=np.uint8)
    if routing:  # an MoE: where the gate sent the last prompt
        scores = routing[-1][0]
        k = int(np.argmax(scores[1:]))
        tau = predictor.moe.gate_cfg.tau
        to = predictor.moe.gate_cfg.tasks[k] if scores[1 + k] > tau else "the general expert"
        print(f"gate: last prompt to {to} (top expert score {scores[1 + k]:.2f}, tau {tau})")
    crops = f"{len(starts)} crops" if len(starts) > 1 else "1 crop"
    print(f"wrote {args.output} ({int(full.sum())} foreground voxels in the RAS grid, {crops})")


if __name__ == "__main__":
    run_cli(main)
