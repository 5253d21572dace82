"""Segment lesions with any subset of the modalities: NIfTI in, NIfTI out in the input's grid and affine.

    python -m moe_missing.predict --model runs/moe_missing/checkpoint.pt --input DatasetXXX_MS --output preds/
    python -m moe_missing.predict --model ckpt.pt --input DatasetXXX_MS --split Tr --use T2 FLAIR --output preds/
    python -m moe_missing.predict --model ckpt.pt --input scans/ --output preds/   # CASE_0000.nii.gz ... files
    python -m moe_missing.predict --model ckpt.pt --input scan_0002.nii.gz --output preds/   # FLAIR only

--input is a NIfTI file, a folder of NIfTI files or an nnU-Net dataset folder (`shared.inputs`: in a dataset
the channels are matched by their dataset.json names, elsewhere file CASE_XXXX is the model's modality number
XXXX; --split Tr|Ts picks a dataset's images, --cases a subset). A channel file that is absent (or left out
with --use) is a missing modality: a zero channel and a 0 in the code (paper 2.1). As in training, the image
is resampled to 1 mm, each sliding-window tile is z-scored per channel, and the class probabilities are
resampled back to the native grid before the argmax (paper 3.2). Writes OUTPUT/CASE.nii.gz (0 background,
1 lesion).
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from moe_missing.data import TARGET_SPACING, read_case, zscore_patches
from moe_missing.model import MoEUNet
from moe_missing.runs import load_model
from shared.atomic import undone_on_input_error
from shared.cli import make_parser, overlap_fraction, positive_int, run_cli
from shared.dataset import Case, canonical_modality
from shared.errors import InputError
from shared.geometry import resample_to_shape, resample_to_spacing
from shared.harness import autocast_context, pick_device
from shared.inputs import add_input_args, inputs_from_args
from shared.nifti import write_nifti
from shared.sliding_window import sliding_window_inference


@torch.no_grad()
def window_logits(model: MoEUNet, x: torch.Tensor, code: torch.Tensor, *, patch_size, overlap: float = 0.5,
                  tiles_per_batch: int = 2, amp: bool = True) -> torch.Tensor:  # fmt: skip
    """Sliding-window logits (1, C, D, H, W) of a 1 mm volume x (1, K, D, H, W) with its code (1, K).

    Each tile is z-scored per channel, as every training crop (a zero channel stays zero); the tiles are
    blended with a Gaussian window. Put the model in eval mode first.
    """

    def forward(tiles):
        with autocast_context(x.device, enabled=amp):
            return model(zscore_patches(tiles), code.expand(tiles.shape[0], -1)).float()

    return sliding_window_inference(forward, x, patch_size, overlap=overlap, tiles_per_batch=tiles_per_batch)


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
    logits = window_logits(model, x, code, patch_size=patch_size, overlap=overlap, tiles_per_batch=tiles_per_batch,
                           amp=amp)  # fmt: skip
    probs = torch.softmax(logits[0], dim=0).cpu().numpy()  # (C, D, H, W)
    probs = resample_to_shape(probs, native_shape, order=1)  # back to the native grid (paper 3.2)
    return probs.argmax(0).astype(np.uint8)


def predict_case(model: MoEUNet, case: Case, modalities, **kwargs) -> tuple[np.ndarray, object, tuple]:
    """Read a case (missing channels zero), predict it; returns (label map, reference Volume, code)."""
    image, _, ref, code = read_case(case, list(modalities))
    return predict_image(model, image, code, ref.spacing, **kwargs), ref, code


def cases_to_predict(inputs, modalities, use=None) -> list[Case]:
    """The `shared.inputs` cases keyed by the model's modalities (None = missing), only `use` kept if given;
    refuses a case that then has none of the modalities (checked for every case before any prediction)."""
    cases = []
    for item in inputs:
        case = item.as_case(modalities)
        if use is not None:
            case.images = {m: (p if m in use else None) for m, p in case.images.items()}
            case.missing = [m for m, p in case.images.items() if p is None]
        if all(p is None for p in case.images.values()):
            raise InputError(f"--input: case {case.case_id} has no image of the modalities {list(use or modalities)}.")
        cases.append(case)
    return cases


def main(argv=None) -> None:
    parser = make_parser(__doc__)
    parser.add_argument("--model", required=True, help="checkpoint.pt (or best.pt) written by moe_missing.train")
    add_input_args(parser)
    parser.add_argument("--use", nargs="+", help="only these modalities (the others are treated as missing)")
    parser.add_argument("--patch", type=positive_int, nargs=3, help="sliding-window tile (default: the training crop)")
    parser.add_argument("--overlap", type=overlap_fraction, default=0.5, help="sliding-window overlap")
    parser.add_argument("--tiles-per-batch", type=positive_int, default=2, help="tiles per forward call")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision on CUDA")
    args = parser.parse_args(argv)
    inputs = inputs_from_args(args)  # checks --input, --cases and --output before any work
    device = pick_device(args.device)
    model, ckpt = load_model(args.model, device)
    modalities = list(model.cfg.modalities)
    use = None
    if args.use:
        use = [canonical_modality(m) for m in args.use]
        if set(use) - set(modalities):
            raise InputError(f"--use {args.use}: the model's modalities are {modalities}.")
    cases = cases_to_predict(inputs, modalities, use)
    patch = tuple(args.patch or ckpt["args"]["patch"])
    if any(p % model.cfg.divisor for p in patch):
        raise InputError(
            f"--patch {' '.join(map(str, patch))} must be divisible by {model.cfg.divisor} for this model."
        )
    out = Path(args.output)
    with undone_on_input_error(out):
        for case in tqdm(cases, desc="predict", disable=None):
            label, ref, code = predict_case(model, case, modalities, patch_size=patch, overlap=args.overlap,
                                            tiles_per_batch=args.tiles_per_batch, device=device,
                                            amp=args.amp)  # fmt: skip
            missing = [m for m, c in zip(modalities, code) if not c]
            if missing:
                print(
                    f"{case.case_id}: missing {missing}, predicted from {[m for m in modalities if m not in missing]}"
                )
            write_nifti(out / f"{case.case_id}.nii.gz", label, like=ref, dtype=np.uint8)
    print(f"wrote {len(cases)} predictions to {out}")


if __name__ == "__main__":
    run_cli(main)
