"""Segment with a fine-tuned BrainSegFounder SwinUNETR: nnU-Net raw cases in, label maps in the input's grid out.

    python -m brainsegfounder.predict --model runs/finetune/fraction_1/repeat_0/best.pt --input DATASET_DIR \
        --split Ts --output preds/
    python -m brainsegfounder.predict --model bsf_brats.pt --input scans/ --output preds/   # CASE_XXXX files

`--input` is a NIfTI file, a folder of them (CASE_0000.nii.gz ... grouped by case, channel i = the model's
modality i) or an nnU-Net dataset folder (channels matched by dataset.json names, `--split`, `--cases`).

`--model` may also be a converted file (`brainsegfounder.convert_checkpoint`) or a whole SwinUNETR state dict
as MONAI and BrainSegFounder save it (`--channels` names its inputs, e.g. FLAIR T1ce T1 T2 for BSF's BraTS
model). Sliding-window inference over the whole volume (Gaussian blending), sigmoid > 0.5 per channel.
BraTS targets are written as labels as the official `test.py` does: WT -> edema, then TC -> necrosis, then
ET -> enhancing (later regions overwrite earlier ones), with the label values of the `--input` dataset's
dataset.json names (else the model's fine-tuning data, or `--brats-labels`); a binary target is written as 1.
"""

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from brainsegfounder.data import load_image
from brainsegfounder.model import SwinUNETR, SwinUNETRConfig, build_swinunetr
from brainsegfounder.regions import regions_to_labels
from brainsegfounder.train_common import patch_size
from brainsegfounder.weights import (
    describe_weights,
    load_model_state,
    read_weights,
    resolve_legacy_merging,
    segmentation_target,
)
from shared import cli
from shared.atomic import undone_on_input_error
from shared.brats import HINT, describe, labels_from_dataset
from shared.cli import run_cli
from shared.dataset import canonical_modality
from shared.errors import InputError
from shared.harness import autocast_context, pick_device
from shared.inputs import add_input_args, inputs_from_args
from shared.nifti import write_nifti
from shared.sliding_window import sliding_window_inference

DEFAULT_PATCH = (128, 128, 128)  # BrainSegFounder's and MONAI's BraTS fine-tuning crop, for files that record none


def load_segmenter(path, device, channels=None, legacy_merging: bool | None = None) -> tuple[SwinUNETR, dict]:
    """Rebuild a segmentation SwinUNETR from any supported file (`brainsegfounder.weights`), in eval mode.

    Args:
        path: a `brainsegfounder.finetune` checkpoint, a converted file, or a whole SwinUNETR state dict.
        channels: input modalities (needed when the file does not record them).
        legacy_merging: patch-merging order for foreign files (None: as recorded, else legacy).
    Returns:
        the model and {"channels", "target", "patch", "brats_labels", "report"} (patch / brats_labels None when
        the file does not record them).
    """
    weights = read_weights(path, flag="--model")
    target = segmentation_target(weights, flag="--model")
    legacy, merging_note = resolve_legacy_merging(weights, legacy_merging, flag="--model")
    names = [canonical_modality(c) for c in channels] if channels else weights.channels
    if not names:
        raise InputError(f"--model {path} does not record its input modalities; name its {weights.in_channels} "
                         "channel(s) with --channels (BrainSegFounder's BraTS models: FLAIR T1ce T1 T2).")  # fmt: skip
    if len(names) != weights.in_channels:
        raise InputError(f"--channels names {len(names)} modalities but --model {path} has {weights.in_channels} "
                         "input channels.")  # fmt: skip
    cfg = SwinUNETRConfig(in_channels=weights.in_channels, out_channels=weights.out_channels,
                          feature_size=weights.arch["feature_size"], depths=tuple(weights.arch["depths"]),
                          num_heads=tuple(weights.arch["num_heads"]), window_size=weights.arch["window_size"],
                          legacy_merging=legacy)  # fmt: skip
    model = build_swinunetr(cfg)
    load_model_state(model, weights.state, flag=f"--model {path}")
    weights.channels = names
    info = {
        "channels": names,
        "target": target,
        "patch": weights.meta.get("patch"),
        "brats_labels": weights.meta.get("brats_labels"),
        "report": describe_weights(weights, merging_note),
    }
    return model.to(device).eval(), info


def output_labels(explicit, data_dir, recorded) -> tuple[tuple[int, int, int], str]:
    """The label values predictions are written with: --brats-labels, else the input dataset's dataset.json names,
    else the values the model was fine-tuned with; refuses in one sentence when none of them decides."""
    if explicit is not None:
        return labels_from_dataset(data_dir, explicit) if data_dir else (tuple(explicit), "--brats-labels")
    if data_dir is not None:
        try:
            return labels_from_dataset(data_dir)
        except InputError:
            if recorded is None:
                raise
    if recorded is None:
        raise InputError(f"the model does not record its BraTS label values; {HINT}.")
    return tuple(recorded), "the model's fine-tuning data"


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


def probabilities_to_labels(probs: np.ndarray, target: str, brats_labels=None) -> np.ndarray:
    """(K, X, Y, Z) probabilities -> (X, Y, Z) uint8 label map (see the module docstring)."""
    masks = probs > 0.5
    if target == "binary":
        return masks[0].astype(np.uint8)
    return regions_to_labels(masks, brats_labels)


def main(argv=None) -> None:
    parser = cli.make_parser(__doc__, prog="python -m brainsegfounder.predict")
    parser.add_argument(
        "--model",
        required=True,
        help="a brainsegfounder.finetune checkpoint (best.pt or "
        "checkpoint.pt), a convert_checkpoint file, or a whole SwinUNETR state dict (MONAI, BSF)",
    )
    add_input_args(parser)
    parser.add_argument("--channels", nargs="+", help="input modalities of a --model that does not record them")
    parser.add_argument(
        "--legacy-merging",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="patch-merging order of a foreign --model (default: as recorded, else MONAI < 1.5)",
    )
    parser.add_argument("--brats-labels", type=cli.positive_int, nargs=3, metavar=("NECROSIS", "EDEMA", "ENH"),
                        help="label values to write (default: the --input dataset's dataset.json names, else the "
                        "model's)")  # fmt: skip
    parser.add_argument("--patch", type=patch_size, nargs=3, help="sliding-window patch, sides multiples of 32 "
                        f"(default: the training patch, else {' '.join(map(str, DEFAULT_PATCH))})")  # fmt: skip
    parser.add_argument("--overlap", type=cli.overlap_fraction, default=0.5, help="sliding-window overlap")
    parser.add_argument("--tiles-per-batch", type=cli.positive_int, default=1, help="tiles per forward call")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision on CUDA")
    args = parser.parse_args(argv)
    cases = inputs_from_args(args)
    device = pick_device(args.device)
    model, info = load_segmenter(args.model, device, channels=args.channels, legacy_merging=args.legacy_merging)
    print(info["report"])
    values = None
    if info["target"] == "brats":
        dataset = Path(args.input) if (Path(args.input) / "dataset.json").is_file() else None
        values, source = output_labels(args.brats_labels, dataset, info["brats_labels"])
        print(describe(values, source))
    patch = tuple(args.patch or info["patch"] or DEFAULT_PATCH)
    unique = list(dict.fromkeys(info["channels"]))  # a modality fed to several channels is one file
    for case in cases:  # every case has each modality before any work
        missing = [m for m, path in case.images(unique).items() if path is None]
        if missing:
            raise InputError(f"case {case.case_id} of {case.dataset} has no {' '.join(missing)} image; the model "
                             f"takes {' '.join(info['channels'])}.")  # fmt: skip
    out = Path(args.output)
    with undone_on_input_error(out):
        for case in tqdm(cases, desc="predict", disable=None):
            source_case = dataclasses.replace(case.as_case(unique), label=None)  # the label is not read
            image, reference = load_image(source_case, info["channels"])
            probs = predict_probabilities(model, image, patch_size=patch, overlap=args.overlap,
                                          tiles_per_batch=args.tiles_per_batch, device=device,
                                          amp=args.amp)  # fmt: skip
            labels = probabilities_to_labels(probs, info["target"], values)
            write_nifti(out / f"{case.case_id}.nii.gz", labels, like=reference, dtype=np.uint8)
    print(f"wrote {len(cases)} predictions to {out}")


if __name__ == "__main__":
    run_cli(main)
