"""Segment brain lesions with a trained model of this package: NIfTI in, NIfTI out in the input's grid and affine.

    python -m mome.predict --model runs/mome/checkpoint.pt --input scan.nii.gz --output preds/
    python -m mome.predict --model runs/nnunet/checkpoint.pt --input DatasetXXX --split Tr --cases A B --output preds/
    python -m mome.predict --model mome_official.pt --input scan_in_mni152.nii.gz --output preds/ --mni-crop

--model takes a MoME (mome.train, or the official release after mome.convert_checkpoint) or a single network of
mome.train_expert (a modality expert, the universal nnU-Net of --modality all, a task-specific nnU-Net).
--input is a NIfTI file, a folder of them or an nnU-Net dataset folder (its images<--split>). Every channel file
CASE_XXXX is one single-modality image, registered to MNI152 at 1 mm as in training, and gets its own prediction
OUTPUT/CASE_XXXX.nii.gz (the input's file name): the argmax label map, 0 background and 1 lesion. No modality
label is needed; --modality M keeps the files of one modality of a dataset folder (e.g. to send each modality to
its own expert). The input must lie on the grid the model was trained on (the paper: 160x196x160); other shapes
are refused unless --mni-crop (the official crop [20:180, 20:216, 0:160] of the 182x218x182 MNI152 grid) or
--crop-or-pad (centre crop/pad) is given, and the prediction is put back into the input's grid. Only the finest
fused output o^1 is used (paper 2.2); as the official predictor, the logits are averaged over the 8 mirrorings
of the three axes (--no-mirror: one pass).
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mome.model import build_expert, build_mome
from mome.train_common import config_from_checkpoint, stride_divisor
from shared.atomic import undone_on_input_error
from shared.checkpoint import load_checkpoint
from shared.cli import make_parser, overlap_fraction, positive_int, run_cli
from shared.dataset import canonical_modality
from shared.errors import InputError
from shared.geometry import crop_or_pad, mni_crop, mni_uncrop, uncrop_or_unpad
from shared.harness import autocast_context, pick_device
from shared.inputs import add_input_args, inputs_from_args
from shared.intensity import zscore
from shared.nifti import read_nifti, write_nifti
from shared.sliding_window import sliding_window_inference

KINDS = ("mome", "mome_expert")  # mome.train / mome.convert_checkpoint, mome.train_expert


def load_model(path, device, expect_kind: str | None = None) -> tuple[torch.nn.Module, dict]:
    """Rebuild the network of a checkpoint of this package for inference (eval mode, deep supervision off).

    Args:
        path: checkpoint of mome.train or mome.convert_checkpoint (kind "mome": experts + gate) or of
            mome.train_expert (kind "mome_expert": one PlainUNet).
        expect_kind: refuse other kinds (e.g. "mome" where the gate is needed).

    Returns:
        the model, whose forward maps (B, 1, D, H, W) to logits (B, K, D, H, W), and a dict with "kind",
        "patch" (sliding-window tile), "grid" (input shape it was trained on, or None), "mirror_axes",
        "modalities" (expert order; for one network the modality it was trained on) and "config".
    """
    ckpt = load_checkpoint(path, map_location=device, expect_kind=expect_kind)
    kind = ckpt.get("kind")
    if kind not in KINDS:
        if kind is None and "config" not in ckpt:
            raise InputError(
                f"{path} holds no run checkpoint (no 'kind' and 'config'), e.g. a plain state_dict; pass the "
                "checkpoint.pt of mome.train or mome.train_expert, or convert the official release with "
                "python -m mome.convert_checkpoint."
            )
        raise InputError(f"{path} is a {kind} checkpoint, expected one of {', '.join(KINDS)} (this package's).")
    cfg = config_from_checkpoint(ckpt)
    model = build_mome(cfg) if kind == "mome" else build_expert(cfg)
    try:
        model.load_state_dict(ckpt["model"])
    except (KeyError, RuntimeError) as err:
        raise InputError(f"{path}: its weights do not fit the config it stores ({type(err).__name__}).") from err
    model.deep_supervision = False  # inference needs only the finest level
    args = ckpt.get("args", {})
    grid = ckpt.get("grid")
    info = {
        "kind": kind,
        "patch": tuple(ckpt.get("patch") or args["patch"]),
        "grid": tuple(grid) if grid else None,
        "mirror_axes": tuple(ckpt.get("mirror_axes", (0, 1, 2))),
        "modalities": tuple(cfg.modalities) if kind == "mome" else (ckpt.get("modality"),),
        "config": cfg,
    }
    return model.to(device).eval(), info


def input_files(cases, modality: str | None = None) -> list[Path]:
    """Every channel file of the resolved input cases (`shared.inputs`), or of one modality of a dataset folder."""
    if modality is None:
        return [path for case in cases for path in case.files.values()]
    files = []
    for case in cases:
        if not case.channel_names:
            raise InputError("--modality needs an nnU-Net dataset folder as --input (its dataset.json names channels).")
        files += [path for index, path in case.files.items() if case.channel_names.get(index) == modality]
    if not files:
        raise InputError(f"--modality {modality}: no channel file of that modality in --input.")
    return files


def to_model_grid(data: np.ndarray, grid, fit: str | None, source: str):
    """Bring one volume onto the model's grid as asked, and a function that puts a prediction back.

    Args:
        data: (X, Y, Z) image.
        grid: the shape the model was trained on, or None (any shape).
        fit: None (the shape must already be `grid`), "mni" (`shared.geometry.mni_crop`) or "crop-or-pad".
        source: the file, for messages.
    """
    if fit == "mni":
        cropped, _ = mni_crop(data)
        if grid is not None and tuple(cropped.shape) != tuple(grid):
            raise InputError(f"--mni-crop gives 160x196x160, but this model was trained on {grid}.")
        return cropped, mni_uncrop
    if fit == "crop-or-pad" and grid is not None:
        fitted, info = crop_or_pad(data, grid)
        return fitted, lambda label: uncrop_or_unpad(label, info)
    if grid is not None and tuple(data.shape) != tuple(grid):
        shape = "x".join(map(str, data.shape))
        raise InputError(
            f"{source}: shape {shape} is not the {'x'.join(map(str, grid))} grid this model was trained on; register "
            "it to MNI152 at 1 mm and pass --mni-crop (182x218x182 input) or --crop-or-pad (centre crop/pad)."
        )
    return data, lambda label: label


def predict_volume(model, image: np.ndarray, *, patch_size, overlap=0.5, mirror_axes=(0, 1, 2), tiles_per_batch=2,
                   device="cpu", amp=True) -> np.ndarray:  # fmt: skip
    """Label map (X, Y, Z) uint8 of one single-modality volume (X, Y, Z), z-scored as in training.

    `mirror_axes` () gives one pass; (0, 1, 2) averages the 8 mirrorings, as the official predictor.
    """
    device = torch.device(device)
    x = torch.from_numpy(zscore(image[None]))[None].to(device)  # (1, 1, X, Y, Z)

    def forward(tiles):
        with autocast_context(device, enabled=amp):
            return model(tiles).float()

    logits = sliding_window_inference(
        forward, x, patch_size, overlap=overlap, tiles_per_batch=tiles_per_batch, mirror_axes=mirror_axes
    )
    return logits[0].argmax(dim=0).to(torch.uint8).cpu().numpy()


def check_patch(patch, cfg, source: str) -> tuple:
    """Refuse a sliding-window patch that the network's strides do not divide."""
    divisor = stride_divisor(cfg)
    if len(patch) != 3 or any(p < 1 or p % d for p, d in zip(patch, divisor)):
        raise InputError(f"{source} {list(patch)}: every side must be a positive multiple of {divisor}.")
    return tuple(patch)


def main(argv=None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--model", required=True, help="checkpoint of mome.train, mome.train_expert or "
                        "mome.convert_checkpoint")  # fmt: skip
    add_input_args(parser)
    parser.add_argument("--modality", help="only the channel files of this modality (a dataset folder --input)")
    parser.add_argument("--patch", type=positive_int, nargs=3, help="sliding-window patch (default: the training "
                        "patch)")  # fmt: skip
    parser.add_argument("--overlap", type=overlap_fraction, default=0.5, help="sliding-window overlap")
    parser.add_argument("--tiles-per-batch", type=positive_int, default=2, help="tiles per forward call")
    parser.add_argument("--mirror", action=argparse.BooleanOptionalAction, default=True,
                        help="average over the 8 mirrorings of the three axes, as the official predictor")  # fmt: skip
    fit = parser.add_mutually_exclusive_group()
    fit.add_argument("--mni-crop", action="store_const", const="mni", dest="fit",
                     help="crop 182x218x182 MNI152 inputs to [20:180, 20:216, 0:160] (official) and back")  # fmt: skip
    fit.add_argument("--crop-or-pad", action="store_const", const="crop-or-pad", dest="fit",
                     help="centre-crop or zero-pad inputs to the model's grid and back")  # fmt: skip
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision on CUDA")
    args = parser.parse_args(argv)
    files = input_files(inputs_from_args(args), canonical_modality(args.modality) if args.modality else None)
    device = pick_device(args.device)
    model, info = load_model(args.model, device)
    patch = check_patch(args.patch or info["patch"], info["config"], "--patch")
    mirror_axes = info["mirror_axes"] if args.mirror else ()
    out = Path(args.output)
    with undone_on_input_error(out):
        for path in tqdm(files, desc="predict", disable=None):
            vol = read_nifti(path)
            image, back = to_model_grid(vol.data, info["grid"], args.fit, str(path))
            label = predict_volume(model, image, patch_size=patch, overlap=args.overlap, mirror_axes=mirror_axes,
                                   tiles_per_batch=args.tiles_per_batch, device=device, amp=args.amp)  # fmt: skip
            write_nifti(out / path.name, back(label), like=vol, dtype=np.uint8)
    print(f"wrote {len(files)} predictions to {out}")


if __name__ == "__main__":
    run_cli(main)
