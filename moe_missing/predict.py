"""Segment lesions with any subset of the modalities: NIfTI in, NIfTI out in the input's grid and affine.

    python -m moe_missing.predict --model runs/moe_missing/checkpoint.pt --input DatasetXXX_MS --output preds/
    python -m moe_missing.predict --model ckpt.pt --input DatasetXXX_MS --use T2 FLAIR --output preds_T2_FLAIR/
    python -m moe_missing.predict --model ckpt.pt --input scans/ --output preds/   # CASE_0000.nii.gz ... files

--input is an nnU-Net dataset folder (channels named by its dataset.json) or a plain folder of CASE_XXXX files
whose channel XXXX is the model's modality number XXXX. A channel file that is absent (or left out with --use)
is a missing modality: a zero channel and a 0 in the code (paper 2.1). As in training, the image is resampled
to 1 mm, each sliding-window tile is z-scored per channel, and the class probabilities are resampled back to
the native grid before the argmax (paper 3.2). Writes OUT/CASE.nii.gz (0 background, 1 lesion).
"""

import argparse
import re
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moe_missing.data import TARGET_SPACING, read_case, zscore_patches
from moe_missing.model import MoEUNet, build_model
from moe_missing.train import KIND, config_from_checkpoint
from shared.checkpoint import load_checkpoint
from shared.cli import run_cli
from shared.dataset import Case, canonical_modality, list_cases
from shared.errors import InputError
from shared.geometry import resample_to_shape, resample_to_spacing
from shared.harness import autocast_context, pick_device
from shared.nifti import write_nifti
from shared.sliding_window import sliding_window_inference

_CHANNEL_FILE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})\.nii(\.gz)?$")


def load_model(path, device) -> tuple[MoEUNet, dict]:
    """Rebuild the model of a `moe_missing.train` checkpoint, in eval mode on `device`."""
    ckpt = load_checkpoint(path, map_location=device, expect_kind=KIND)
    model = build_model(config_from_checkpoint(ckpt))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def collect_cases(input_dir, modalities, split: str = "Tr", cases=None, use=None) -> list[Case]:
    """The cases to segment, each with its channel files keyed by the model's modalities (None = missing).

    Args:
        input_dir: nnU-Net dataset folder (with dataset.json) or a plain folder of CASE_XXXX.nii(.gz) files.
        modalities: the model's modalities in channel order.
        split: "Tr" or "Ts" images of a dataset folder.
        cases: only these case ids.
        use: only these modalities are read; the others count as missing.
    """
    root = Path(input_dir)
    if not root.is_dir():
        raise InputError(f"--input {root} is not a folder.")
    found = []
    if (root / "dataset.json").is_file():
        for case in list_cases(root, split=split):
            images = {m: case.images.get(m) for m in modalities}
            found.append(Case(case.case_id, images, case.label, case.dataset, label_values=case.label_values))
    else:
        files = {}
        for entry in sorted(root.iterdir()):
            match = _CHANNEL_FILE.match(entry.name)
            if match and int(match["channel"]) < len(modalities):
                files.setdefault(match["case"], {})[modalities[int(match["channel"])]] = str(entry)
        found = [Case(c, {m: f.get(m) for m in modalities}, None, root.name) for c, f in sorted(files.items())]
    if cases:
        found = [c for c in found if c.case_id in set(cases)]
    if use is not None:
        for case in found:
            case.images = {m: (p if m in use else None) for m, p in case.images.items()}
    found = [c for c in found if any(p is not None for p in c.images.values())]
    if not found:
        raise InputError(f"--input {root} holds no case with an image of the modalities {list(use or modalities)}.")
    return found


@torch.no_grad()
def predict_image(model: MoEUNet, image: np.ndarray, code, spacing, *, patch_size, overlap: float = 0.5,
                  tiles_per_batch: int = 2, device="cpu", amp: bool = True) -> np.ndarray:  # fmt: skip
    """Lesion label map (X, Y, Z) uint8 of one K-channel image (K, X, Y, Z) in its native grid.

    Args:
        image: raw intensities, missing channels zero.
        code: K values 0/1, the modality code (1 = present).
        spacing: voxel size of `image` in mm.
    """
    device = torch.device(device)
    native_shape = image.shape[1:]
    resampled = resample_to_spacing(image, spacing, TARGET_SPACING, order=1)
    x = torch.from_numpy(np.ascontiguousarray(resampled, dtype=np.float32))[None].to(device)  # (1, K, D, H, W)
    code = torch.as_tensor(np.asarray(code, dtype=np.float32), device=device)[None]  # (1, K)

    def forward(tiles):
        # z-score per tile and channel, as every training crop (a zero channel stays zero)
        with autocast_context(device, enabled=amp):
            return model(zscore_patches(tiles), code.expand(tiles.shape[0], -1)).float()

    logits = sliding_window_inference(forward, x, patch_size, overlap=overlap, tiles_per_batch=tiles_per_batch)
    probs = torch.softmax(logits[0], dim=0).cpu().numpy()  # (C, D, H, W)
    probs = resample_to_shape(probs, native_shape, order=1)  # back to the native grid (paper 3.2)
    return probs.argmax(0).astype(np.uint8)


def predict_case(model: MoEUNet, case: Case, modalities, **kwargs) -> tuple[np.ndarray, object, tuple]:
    """Read a case (missing channels zero), predict it; returns (label map, reference Volume, code)."""
    image, _, ref, code = read_case(case, list(modalities))
    return predict_image(model, image, code, ref.spacing, **kwargs), ref, code


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint.pt written by moe_missing.train")
    parser.add_argument("--input", required=True, help="nnU-Net dataset folder or a folder of CASE_XXXX files")
    parser.add_argument("--output", required=True, help="folder for the predicted label maps")
    parser.add_argument("--split", choices=("Tr", "Ts"), default="Tr", help="imagesTr or imagesTs of a dataset")
    parser.add_argument("--cases", nargs="+", help="only these case ids")
    parser.add_argument("--use", nargs="+", help="only these modalities (the others are treated as missing)")
    parser.add_argument("--patch", type=int, nargs=3, help="sliding-window tile (default: the training crop)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")
    parser.add_argument("--tiles-per-batch", type=int, default=2, help="tiles per forward call")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision on CUDA")
    args = parser.parse_args(argv)
    if not 0.0 <= args.overlap < 1.0:
        raise InputError(f"--overlap must lie in [0, 1), got {args.overlap}.")
    device = pick_device(args.device)
    model, ckpt = load_model(args.model, device)
    modalities = list(model.cfg.modalities)
    use = None
    if args.use:
        use = [canonical_modality(m) for m in args.use]
        if set(use) - set(modalities):
            raise InputError(f"--use {args.use}: the model's modalities are {modalities}.")
    cases = collect_cases(args.input, modalities, split=args.split, cases=args.cases, use=use)
    patch = tuple(args.patch or ckpt["args"]["patch"])
    if any(p % model.cfg.divisor for p in patch):
        raise InputError(f"--patch {patch} must be divisible by {model.cfg.divisor}.")
    out = Path(args.output)
    for case in tqdm(cases, desc="predict", disable=None):
        label, ref, code = predict_case(model, case, modalities, patch_size=patch, overlap=args.overlap,
                                        tiles_per_batch=args.tiles_per_batch, device=device, amp=args.amp)  # fmt: skip
        missing = [m for m, c in zip(modalities, code) if not c]
        if missing:
            print(f"{case.case_id}: missing {missing}, predicted from {[m for m in modalities if m not in missing]}")
        write_nifti(out / f"{case.case_id}.nii.gz", label, like=ref, dtype=np.uint8)
    print(f"wrote {len(cases)} predictions to {out}")


if __name__ == "__main__":
    run_cli(main)
