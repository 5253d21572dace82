"""Segment with a fine-tuned BrainSegFounder SwinUNETR: nnU-Net raw cases in, label maps in the input's grid out.

    python -m brainsegfounder.predict --model runs/finetune/repeat_0/checkpoint.pt --data DATASET_DIR \
        --split Ts --output preds/

Sliding-window inference over the whole volume (Gaussian blending), sigmoid > 0.5 per channel. BraTS
targets are written as labels as the official `test.py` does: WT -> edema, then TC -> necrosis, then
ET -> enhancing (later regions overwrite earlier ones); a binary target is written as 1.
"""

import argparse
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from brainsegfounder.common import SEG_KIND
from brainsegfounder.data import load_channels
from brainsegfounder.model import SwinUNETR, SwinUNETRConfig, build_swinunetr
from shared.checkpoint import load_checkpoint
from shared.cli import run_cli
from shared.dataset import list_cases
from shared.errors import InputError
from shared.harness import autocast_context, pick_device
from shared.nifti import write_nifti
from shared.sliding_window import sliding_window_inference


def load_segmenter(path, device) -> tuple[SwinUNETR, dict]:
    """Rebuild the SwinUNETR of a `brainsegfounder.finetune` checkpoint, in eval mode, and return the checkpoint."""
    ckpt = load_checkpoint(path, map_location=device, expect_kind=SEG_KIND)
    if ckpt.get("kind") != SEG_KIND:
        raise InputError(f"--model {path} is not a brainsegfounder.finetune checkpoint.")
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in ckpt["config"].items()}
    model = build_swinunetr(SwinUNETRConfig(**fields))
    model.load_state_dict(ckpt["model"])
    return model.to(device).eval(), ckpt


def predict_probabilities(model: SwinUNETR, image: np.ndarray, *, patch_size, overlap: float = 0.5,
                          tiles_per_batch: int = 1, device="cpu", amp: bool = True) -> np.ndarray:  # fmt: skip
    """Sigmoid probabilities (K, X, Y, Z) float32 of one normalised (C, X, Y, Z) volume.

    `patch_size` sides must be multiples of 32 (the training patch); smaller volumes are zero-padded.
    """
    device = torch.device(device)
    x = torch.from_numpy(np.ascontiguousarray(image))[None].to(device)  # (1, C, X, Y, Z)

    def forward(tiles):
        with autocast_context(device, enabled=amp):
            return model(tiles).float()

    logits = sliding_window_inference(forward, x, patch_size, overlap=overlap, tiles_per_batch=tiles_per_batch)
    return torch.sigmoid(logits[0]).cpu().numpy()


def probabilities_to_labels(probs: np.ndarray, target: str, brats_labels=(1, 2, 3)) -> np.ndarray:
    """(K, X, Y, Z) probabilities -> (X, Y, Z) uint8 label map (see the module docstring)."""
    masks = probs > 0.5
    labels = np.zeros(probs.shape[1:], dtype=np.uint8)
    if target == "binary":
        labels[masks[0]] = 1
        return labels
    necrosis, edema, enhancing = brats_labels
    tc, wt, et = masks
    labels[wt] = edema
    labels[tc] = necrosis
    labels[et] = enhancing
    return labels


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="checkpoint.pt written by brainsegfounder.finetune")
    parser.add_argument("--data", required=True, help="nnU-Net raw dataset folder holding the cases to segment")
    parser.add_argument("--split", choices=("Tr", "Ts"), default="Ts", help="imagesTr or imagesTs")
    parser.add_argument("--cases", nargs="+", help="only these case ids")
    parser.add_argument("--output", required=True, help="folder for the label maps CASE.nii.gz")
    parser.add_argument("--patch", type=int, nargs=3, help="sliding-window patch (default: the training patch)")
    parser.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap in [0, 1)")
    parser.add_argument("--tiles-per-batch", type=int, default=1, help="tiles per forward call")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision on CUDA")
    args = parser.parse_args(argv)
    if not 0.0 <= args.overlap < 1.0:
        raise InputError(f"--overlap must lie in [0, 1), got {args.overlap}.")
    cases = list_cases(args.data, args.split)
    if args.cases:
        unknown = sorted(set(args.cases) - {c.case_id for c in cases})
        if unknown:
            raise InputError(f"--cases {unknown} are not in {args.data}/images{args.split}.")
        cases = [c for c in cases if c.case_id in set(args.cases)]
    device = pick_device(args.device)
    model, ckpt = load_segmenter(args.model, device)
    train_args = ckpt["args"]
    patch = tuple(args.patch or train_args["patch"])
    out = Path(args.output)
    for case in tqdm(cases, desc="predict", disable=None):
        image, _, reference = load_channels(case, ckpt["channels"], "zscore")
        probs = predict_probabilities(model, image, patch_size=patch, overlap=args.overlap,
                                      tiles_per_batch=args.tiles_per_batch, device=device, amp=args.amp)  # fmt: skip
        labels = probabilities_to_labels(probs, train_args["target"], tuple(train_args["brats_labels"]))
        write_nifti(out / f"{case.case_id}.nii.gz", labels, like=reference, dtype=np.uint8)
    print(f"wrote {len(cases)} predictions to {out}")


if __name__ == "__main__":
    run_cli(main)
