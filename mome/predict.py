"""Segment brain lesions with a trained MoME model: NIfTI in, NIfTI out in the input's grid and affine.

    python -m mome.predict --model runs/mome/checkpoint.pt --input scan.nii.gz --output preds/
    python -m mome.predict --model runs/mome/checkpoint.pt --input DatasetXXX/imagesTr --output preds/ --mirror

Every input file is one single-modality image (any of the experts' modalities, registered to MNI space as in
training); no modality label is needed. Only the finest fused output o^1 is used (paper 2.2). The output is
the argmax label map (0 background, 1 lesion) with the input's file name.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from mome.model import MoME, build_mome
from mome.train_common import config_from_checkpoint
from shared.checkpoint import load_checkpoint
from shared.cli import run_cli
from shared.errors import InputError
from shared.harness import autocast_context, pick_device
from shared.nifti import read_nifti, write_nifti
from shared.sliding_window import sliding_window_inference
from shared.transforms import zscore

NIFTI_ENDINGS = (".nii.gz", ".nii")


def load_mome(path, device) -> tuple[MoME, dict]:
    """Rebuild a MoME model from a `mome.train` checkpoint, in eval mode with deep supervision off."""
    ckpt = load_checkpoint(path, map_location=device, expect_kind="mome")
    cfg = config_from_checkpoint(ckpt)
    model = build_mome(cfg)
    model.load_state_dict(ckpt["model"])
    model.deep_supervision = False  # inference needs only the finest level
    return model.to(device).eval(), ckpt


def list_inputs(path, cases=None) -> list[Path]:
    """The NIfTI files to segment: one file, or every NIfTI file of a folder (optionally of some case ids)."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError(f"--input {path} does not exist.")
    files = sorted(p for p in path.iterdir() if p.name.endswith(NIFTI_ENDINGS))
    if cases:
        wanted = set(cases)
        files = [p for p in files if p.name.split(".nii")[0].rsplit("_", 1)[0] in wanted]
    if not files:
        raise InputError(
            f"--input {path} holds no NIfTI file (.nii or .nii.gz){' of the given --cases' * bool(cases)}."
        )
    return files


def predict_volume(model: MoME, image: np.ndarray, *, patch_size, overlap=0.5, mirror=False, tiles_per_batch=2,
                   device="cpu", amp=True) -> np.ndarray:  # fmt: skip
    """Label map (X, Y, Z) uint8 of one single-modality volume (X, Y, Z), z-scored as in training."""
    device = torch.device(device)
    x = torch.from_numpy(zscore(image[None]))[None].to(device)  # (1, 1, X, Y, Z)

    def forward(tiles):
        with autocast_context(device, enabled=amp):
            return model(tiles).float()

    logits = sliding_window_inference(
        forward,
        x,
        patch_size,
        overlap=overlap,
        tiles_per_batch=tiles_per_batch,
        mirror_axes=(0, 1, 2) if mirror else (),
    )
    return logits[0].argmax(dim=0).to(torch.uint8).cpu().numpy()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint.pt written by mome.train")
    parser.add_argument("--input", required=True, help="a NIfTI file or a folder of NIfTI files")
    parser.add_argument("--output", required=True, help="folder for the predicted label maps")
    parser.add_argument("--cases", nargs="+", help="only these case ids (files CASE_XXXX.nii.gz) of a folder")
    parser.add_argument("--patch", type=int, nargs=3, help="sliding-window patch (default: the training patch)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")
    parser.add_argument("--tiles-per-batch", type=int, default=2, help="tiles per forward call")
    parser.add_argument("--mirror", action="store_true", help="mirroring test-time augmentation (8 passes)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision on CUDA")
    args = parser.parse_args(argv)
    if not 0.0 <= args.overlap < 1.0:
        raise InputError(f"--overlap must lie in [0, 1), got {args.overlap}.")
    files = list_inputs(args.input, args.cases)
    device = pick_device(args.device)
    model, ckpt = load_mome(args.model, device)
    patch = tuple(args.patch or ckpt["args"]["patch"])
    out = Path(args.output)
    for path in tqdm(files, desc="predict", disable=None):
        vol = read_nifti(path)
        label = predict_volume(model, vol.data, patch_size=patch, overlap=args.overlap, mirror=args.mirror,
                               tiles_per_batch=args.tiles_per_batch, device=device, amp=args.amp)  # fmt: skip
        write_nifti(out / path.name, label, like=vol, dtype=np.uint8)
    print(f"wrote {len(files)} predictions to {out}")


if __name__ == "__main__":
    run_cli(main)
