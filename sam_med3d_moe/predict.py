"""Segment targets in NIfTI volumes with SAM-Med3D, a task expert or SAM-Med3D-MoE, from clicks, a box or clicks
simulated from a label file; each mask is written in its input's grid and affine.

    # one image, one prompt set; --output a file (or a folder: OUTPUT/<case>.nii.gz)
    python -m sam_med3d_moe.predict --model runs/moe/checkpoint.pt --image scan.nii.gz --point 40 52 31 \\
        --output mask.nii.gz
    python -m sam_med3d_moe.predict --model runs/general/checkpoint.pt --image ct.nii.gz --box 10 20 30 50 60 70 \\
        --ct-clamp --output m.nii.gz
    python -m sam_med3d_moe.predict --model ... --image scan.nii.gz --label gt.nii.gz --clicks 5 --output m.nii.gz
    # a folder of images or an nnU-Net dataset, prompt sets per image from a JSON file (see prompts.py):
    # one mask per prompt set, OUTPUT/<case>_<name>.nii.gz
    python -m sam_med3d_moe.predict --model ... --input DATASET --split Ts --prompts prompts.json --output preds

Pipeline: RAS reorientation, resampling to --spacing mm (optionally the CT clamp first), crop/pad of the model
cube around the prompt by torchio's rule (the first click, the box, or the label's bounding box), z-normalisation
over voxels > 0 after the crop; then one decoder step per click (each with the previous low-res mask, the
protocol the maintainers recommend) or one box step; sigmoid > 0.5; pasted back and resampled (nearest) to the
input grid. A target larger than the crop gets more overlapping crops, blended (`inference.py`); one that needs
more than --max-crops is refused. Coordinates are voxel indices of the input image; prompts outside the image,
and clicks outside the crop around the first click, are refused. Box prompts need box embeddings that were
trained (`--box-prob > 0`); official SAM-Med3D weights have none.
"""

import contextlib
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from sam_med3d_moe.config import CONFIG_NAMES, SELECTOR_MODES
from sam_med3d_moe.inference import MAX_CROPS, segment_box, segment_clicks, segment_label
from sam_med3d_moe.predictor import Predictor
from sam_med3d_moe.preprocess import CT_CLAMP, to_model_grid
from sam_med3d_moe.prompts import check_inside, prompt_set_from_flags, read_prompt_file
from sam_med3d_moe.train_common import threshold
from shared.atomic import undone_on_input_error
from shared.cli import (
    check_output_dir,
    check_output_file,
    make_parser,
    non_negative_int,
    positive_float,
    positive_int,
    run_cli,
)
from shared.dataset import canonical_modality
from shared.errors import InputError
from shared.geometry import from_canonical, resample_to_shape
from shared.harness import pick_device
from shared.inputs import NIFTI_ENDINGS, SPLITS, resolve_inputs
from shared.nifti import read_nifti, write_nifti


def input_to_model(points: np.ndarray, affine, canon_affine, canon_shape, rs_shape) -> np.ndarray:
    """Map (N, 3) input voxel indices to the reoriented, resampled grid (continuous voxel coordinates)."""
    world = affine @ np.c_[points, np.ones(len(points))].T  # (4, N)
    canon = (np.linalg.inv(canon_affine) @ world)[:3].T  # (N, 3) indices in the RAS grid
    scale = np.asarray(rs_shape) / np.asarray(canon_shape)
    return (canon + 0.5) * scale - 0.5  # voxel-edge aligned, as shared.geometry.resample_to_shape


def parse_args(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--model", required=True, help="run checkpoint of this package or converted state_dict")
    parser.add_argument(
        "--config", choices=CONFIG_NAMES, default="vit_b_ori", help="architecture of a plain state_dict"
    )
    g = parser.add_argument_group("input and output")
    g.add_argument("--input", "--image", dest="input", required=True, help="a NIfTI file, a folder of NIfTI files "
                   "(CASE_XXXX channel files are grouped by case) or an nnU-Net dataset folder")  # fmt: skip
    g.add_argument("--split", choices=SPLITS, default="Ts", help="imagesTr or imagesTs of a dataset --input")
    g.add_argument("--cases", nargs="+", metavar="CASE", help="only these case ids (default: every case)")
    g.add_argument("--channel", help="the channel to segment when a case has several (SAM-Med3D takes one): its "
                   "index XXXX of CASE_XXXX, or its modality name in a dataset (e.g. FLAIR)")  # fmt: skip
    g.add_argument("--output", required=True, help="folder for the masks; a .nii.gz file for one image and one prompt")
    g = parser.add_argument_group("prompts (one kind)")
    g.add_argument("--point", type=float, nargs=3, action="append", metavar=("I", "J", "K"),
                   help="a positive click (input voxel indices); repeat for one refinement step per click")  # fmt: skip
    g.add_argument("--negative", type=float, nargs=3, action="append", metavar=("I", "J", "K"),
                   help="a negative click, applied after the positive ones")  # fmt: skip
    g.add_argument("--box", type=float, nargs=6, metavar=("I0", "J0", "K0", "I1", "J1", "K1"),
                   help="a box given by two opposite corners (input voxel indices)")  # fmt: skip
    g.add_argument("--prompts", help="JSON file of prompt sets per case id (for a folder or dataset --input)")
    g.add_argument("--label", help="ground-truth mask (> 0) to simulate clicks from, as the official validation")
    g.add_argument("--clicks", type=positive_int, default=1, help="simulated clicks with --label")
    g.add_argument("--allow-untrained-box", action="store_true", help="run box prompts even on box embeddings "
                   "that were never trained (random, seeded by --seed): a test only")  # fmt: skip
    g = parser.add_argument_group("preprocessing and model")
    g.add_argument("--spacing", type=positive_float, default=1.5, help="isotropic resampling in mm (official: 1.5)")
    g.add_argument("--ct-clamp", action="store_true",
                   help=f"clamp intensities to {list(CT_CLAMP)} HU before z-normalising (official CT)")  # fmt: skip
    g.add_argument("--max-crops", type=positive_int, default=MAX_CROPS,
                   help="most model crops for a target larger than one crop (official sliding window: 27)")  # fmt: skip
    g.add_argument("--selector", choices=SELECTOR_MODES, help="MoE mask selector override")
    g.add_argument("--tau", type=threshold, help="MoE selector threshold override")
    g.add_argument("--seed", type=non_negative_int, default=2023, help="seed of simulated clicks and of any fresh "
                   "initialisation (official validation: 2023)")  # fmt: skip
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    given = [args.point is not None, args.box is not None, args.label is not None, args.prompts is not None]
    if sum(given) != 1:
        raise InputError(
            "give exactly one kind of prompt: --point (with optional --negative), --box, --label or --prompts."
        )
    if args.negative and not args.point:
        raise InputError("--negative clicks need at least one --point first.")
    return args


def plan(args) -> list[tuple]:
    """Every (case, image file, prompt set or None for --label, output file), checked before any work."""
    cases = resolve_inputs(args.input, split=args.split, cases=args.cases, flag="--input")
    if args.prompts:
        table = read_prompt_file(args.prompts)
        unknown = sorted(set(table) - {c.case_id for c in cases})
        if unknown:
            raise InputError(f"--prompts {args.prompts} names case(s) {unknown[:5]} that --input does not hold.")
        skipped = [c.case_id for c in cases if c.case_id not in table]
        if skipped:
            print(
                f"--prompts has no prompt for {len(skipped)} of {len(cases)} case(s), which are skipped: {skipped[:5]}"
            )
        cases = [c for c in cases if c.case_id in table]
    elif len(cases) > 1:
        raise InputError(f"--input {args.input} holds {len(cases)} cases; --point/--box/--label prompt one image, "
                         "a folder takes --prompts FILE.")  # fmt: skip
    jobs = []
    for case in cases:
        sets = table[case.case_id] if args.prompts else [None if args.label else prompt_set_from_flags(args)]
        path = channel_file(case, args.channel)
        jobs += [(case, path, prompt) for prompt in sets]
    single = args.output.endswith(NIFTI_ENDINGS)
    if single and len(jobs) > 1:
        raise InputError(
            f"--output {args.output} is one file, but there are {len(jobs)} masks to write; give a folder."
        )
    if single:
        output = [check_output_file(args.output, "--output", suffixes=NIFTI_ENDINGS)]
    else:
        folder = check_output_dir(args.output, "--output")
        if folder.resolve() in {Path(path).parent.resolve() for _, path, _ in jobs}:
            raise InputError(f"--output {folder} is a folder of the input images; pick another folder.")
        named = args.prompts is not None
        output = [folder / (f"{c.case_id}_{p.name}.nii.gz" if named else f"{c.case_id}.nii.gz") for c, _, p in jobs]
    for _, path, prompt in jobs:
        if prompt is not None:
            check_inside(prompt, _header_shape(path))  # headers only: no image is read before every check
    return [(*job, out) for job, out in zip(jobs, output)]


def channel_file(case, channel: str | None) -> Path:
    """The one image file of `case` to segment: its only channel, or the one --channel names (index or modality)."""
    if channel is None:
        if len(case.files) > 1:
            names = ", ".join(f"{i:04d}" + (f" ({case.channel_names[i]})" if i in case.channel_names else "")
                              for i in case.files)  # fmt: skip
            raise InputError(f"case {case.case_id} has channels {names}; pick the one to segment with --channel.")
        return next(iter(case.files.values()))
    if channel.isdigit():
        index = int(channel)
    else:
        wanted = canonical_modality(channel)
        matches = [i for i, name in case.channel_names.items() if name == wanted]
        if not matches:
            raise InputError(f"--channel {channel}: case {case.case_id} has no channel of that modality.")
        index = matches[0]
    if index not in case.files:
        raise InputError(f"--channel {channel}: case {case.case_id} has no file for channel {index:04d}.")
    return case.files[index]


def _header_shape(path) -> tuple:
    try:
        return tuple(nib.load(path).shape)
    except Exception as err:  # nibabel raises many types for truncated or foreign files
        raise InputError(f"{path}: not a readable NIfTI file ({type(err).__name__}).") from err


def predict_one(predictor: Predictor, args, path, prompt, rng) -> tuple[np.ndarray, object, int, list]:
    """One mask in the input grid: (mask, the input volume, crops used, gate scores of each step)."""
    vol = read_nifti(path)
    data = np.clip(vol.data, *CT_CLAMP) if args.ct_clamp else vol.data
    image, canon_affine, info, canon_shape = to_model_grid(data, vol.affine, args.spacing, order=1)
    top = np.array(image.shape) - 1

    def to_model(points) -> np.ndarray:  # input voxel indices -> model grid, inside it
        flat = np.asarray(points, dtype=np.float64).reshape(-1, 3)
        return np.clip(input_to_model(flat, vol.affine, canon_affine, canon_shape, image.shape), 0, top)

    routing = []
    if prompt is None:
        lab = read_nifti(args.label)
        if lab.data.shape != vol.data.shape:
            raise InputError(f"--label {args.label}: shape {lab.data.shape} differs from the image's {vol.data.shape}.")
        if not np.allclose(lab.affine, vol.affine, atol=1e-3):
            raise InputError(f"--label {args.label}: its affine differs from the image's (another grid).")
        gt, _, _, _ = to_model_grid((lab.data > 0).astype(np.uint8), lab.affine, args.spacing, order=0)
        if not gt.any():
            raise InputError(f"--label {args.label}: the mask is empty after resampling to {args.spacing} mm.")
        mask, starts = segment_label(predictor, image, gt, args.clicks, rng, args.max_crops, routing)
    elif prompt.box is not None:
        corners = to_model(prompt.box)
        lo, hi = np.round(corners.min(axis=0)).astype(np.int64), np.round(corners.max(axis=0)).astype(np.int64)
        mask, starts = segment_box(predictor, image, lo, hi, max_crops=args.max_crops, routing=routing)
    else:
        points = to_model([p for p, _ in prompt.clicks()])
        clicks = [(point, label) for point, (_, label) in zip(points, prompt.clicks())]
        mask, starts = segment_clicks(predictor, image, clicks, prompt.names(), args.max_crops, routing)
    full = from_canonical(resample_to_shape(mask.astype(np.uint8), canon_shape, order=0), info)
    return full, vol, len(starts), routing


def main(argv=None) -> None:
    args = parse_args(argv)
    jobs = plan(args)
    device = pick_device(args.device)
    predictor = Predictor(args.model, device, config=args.config, selector=args.selector, tau=args.tau, seed=args.seed)
    if any(prompt is not None and prompt.box is not None for _, _, prompt, _ in jobs):
        predictor.check_box(args.allow_untrained_box, "--allow-untrained-box")
    rng = np.random.default_rng(args.seed)
    one_file = args.output.endswith(NIFTI_ENDINGS)  # written once, atomically, after every check: nothing to undo
    with contextlib.nullcontext() if one_file else undone_on_input_error(args.output):
        for _, path, prompt, out in tqdm(jobs, desc="predict", disable=None if len(jobs) > 1 else True):
            mask, vol, crops, routing = predict_one(predictor, args, path, prompt, rng)
            out.parent.mkdir(parents=True, exist_ok=True)  # with the first mask: a refused input leaves no folder
            write_nifti(out, mask, like=vol, dtype=np.uint8)
            note = ""
            if routing:  # an MoE: where the gate sent the last prompt
                scores, cfg = routing[-1][0], predictor.moe.gate_cfg
                k = int(np.argmax(scores[1:]))
                to = cfg.tasks[k] if scores[1 + k] > cfg.tau else "the general expert"
                note = f"; gate: last prompt to {to} (top expert score {scores[1 + k]:.2f}, tau {cfg.tau})"
            tqdm.write(f"wrote {out} ({int(mask.sum())} voxels, {crops} crop{'s' if crops > 1 else ''}{note})")


if __name__ == "__main__":
    run_cli(main)
