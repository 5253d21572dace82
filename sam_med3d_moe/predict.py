"""Segment one target in a NIfTI volume with SAM-Med3D, a task expert or SAM-Med3D-MoE, from points, a box or
clicks simulated from a label file; the mask is written in the input's grid and affine.

    python -m sam_med3d_moe.predict --model runs/moe/checkpoint.pt --image scan.nii.gz --point 40 52 31 \
        --output mask.nii.gz
    python -m sam_med3d_moe.predict --model turbo.pt --image ct.nii.gz --box 10 20 30 50 60 70 --output m.nii.gz
    python -m sam_med3d_moe.predict --model ... --image scan.nii.gz --label gt.nii.gz --clicks 5 --output m.nii.gz

Pipeline: RAS reorientation, resampling to --spacing mm, crop/pad of the model cube centred on the prompt (the
first point, the box centre, or the label's bounding box), z-normalisation over voxels > 0; then one decoder step
per given point (each with the previous low-res mask, the protocol the maintainers recommend) or one box step;
sigmoid > 0.5; pasted back and resampled (nearest) to the input grid. Coordinates are input voxel indices.
"""

import argparse
import dataclasses
from pathlib import Path

import numpy as np
import torch

from sam_med3d_moe.config import SELECTOR_MODES, GateConfig
from sam_med3d_moe.data import crop_at, crop_start, paste_at, target_centre, to_model_grid, znorm_positive
from sam_med3d_moe.interaction import evaluate_points
from sam_med3d_moe.model import build_model, config_from_dict, load_weights, upsample
from sam_med3d_moe.moe import SamMed3DMoE
from sam_med3d_moe.train_common import KINDS, config_by_name
from shared.checkpoint import load_checkpoint
from shared.cli import run_cli
from shared.errors import InputError
from shared.geometry import from_canonical, resample_to_shape
from shared.harness import pick_device
from shared.nifti import read_nifti, write_nifti


class Predictor:
    """A loaded model ready for interactive steps: `embed(image)` once, then `step(emb, points=, boxes=, masks=)`.

    Args:
        path: a run checkpoint of this package (general, expert or MoE) or a converted official state_dict.
        device: torch device.
        config: architecture of a plain state_dict ("vit_b_ori" or "small").
        selector, tau: override the MoE's mask selector (Table 2 variants); ignored for single models.
    """

    def __init__(self, path, device, config: str = "vit_b_ori", selector: str | None = None, tau: float | None = None):
        ckpt = load_checkpoint(path, map_location="cpu")
        self.kind = ckpt.get("kind", "state_dict")
        if self.kind in KINDS:
            cfg = config_from_dict(ckpt["config"]["sam"])
            weights = ckpt["model"]
        else:
            cfg, weights = config_by_name(config, box_prompts=True), ckpt
        sam = build_model(cfg)
        self.moe = None
        if self.kind == "sam_med3d_moe":
            gate = dict(ckpt["config"]["gate"])
            gate.update({k: v for k, v in (("selector", selector), ("tau", tau)) if v is not None})
            names = {f.name for f in dataclasses.fields(GateConfig)}
            gate_cfg = GateConfig(**{k: v for k, v in gate.items() if k in names})
            self.moe = SamMed3DMoE(sam, [build_model(cfg).mask_decoder for _ in gate_cfg.tasks], gate_cfg)
            load_weights(self.moe, weights, source=str(path), allow_new=False)
            self.moe.to(device).eval()
        else:
            load_weights(sam, weights, source=str(path), allow_new=self.kind not in KINDS)
        self.sam = sam.to(device).eval()
        self.cfg = cfg
        self.device = device

    @torch.no_grad()
    def embed(self, image: torch.Tensor) -> torch.Tensor:
        """(B, 1, I, I, I) z-normalised crop -> (B, C, g, g, g) image embedding."""
        return self.sam.image_encoder(image.to(self.device))

    @torch.no_grad()
    def step(self, emb: torch.Tensor, points=None, boxes=None, masks=None) -> torch.Tensor:
        """One prompt step -> (B, 1, 4g, 4g, 4g) low-res logits (the MoE's fused M_o for an MoE)."""
        if self.moe is not None:
            return self.moe.step(emb, points=points, boxes=boxes, masks=masks)["fused"]
        return self.sam.decode(emb, points=points, boxes=boxes, masks=masks)

    def stepper(self, emb: torch.Tensor):
        """The `step(points=, boxes=, masks=)` callable of the interaction protocols, on fixed embeddings."""
        return lambda points=None, boxes=None, masks=None: self.step(emb, points=points, boxes=boxes, masks=masks)


def input_to_model(points: np.ndarray, affine, canon_affine, canon_shape, rs_shape) -> np.ndarray:
    """Map (N, 3) input voxel indices to the reoriented, resampled grid (continuous voxel coordinates)."""
    world = affine @ np.c_[points, np.ones(len(points))].T  # (4, N)
    canon = (np.linalg.inv(canon_affine) @ world)[:3].T  # (N, 3) indices in the RAS grid
    scale = np.asarray(rs_shape) / np.asarray(canon_shape)
    return (canon + 0.5) * scale - 0.5  # voxel-edge aligned, as shared.geometry.resample_to_shape


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
    parser.add_argument("--label", help="ground-truth mask (> 0) to simulate clicks from, as the official validation")
    parser.add_argument("--clicks", type=int, default=1, help="simulated clicks with --label")
    parser.add_argument("--spacing", type=float, default=1.5, help="isotropic resampling in mm (official: 1.5)")
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
    if args.clicks < 1:
        raise InputError(f"--clicks must be at least 1, got {args.clicks}.")
    return args


def main(argv=None) -> None:
    args = parse_args(argv)
    device = pick_device(args.device)
    predictor = Predictor(args.model, device, config=args.config, selector=args.selector, tau=args.tau)
    cfg = predictor.cfg
    vol = read_nifti(args.image)
    image, canon_affine, info, canon_shape = to_model_grid(vol.data, vol.affine, args.spacing, order=1)

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
        centre = target_centre(gt)
    elif args.box:
        corners = to_model(args.box)
        centre = corners.mean(axis=0)
    else:
        clicks = [(p, 1) for p in args.point] + [(p, 0) for p in args.negative or []]
        model_points = to_model([p for p, _ in clicks])
        centre = model_points[0]
    start = crop_start(centre, cfg.image_size)
    crop = torch.from_numpy(znorm_positive(crop_at(image, start, cfg.image_size)))[None, None]
    emb = predictor.embed(crop)
    low_res = torch.zeros(1, 1, *(cfg.low_res,) * 3, device=device)
    if gt is not None:
        target = torch.from_numpy(crop_at(gt, start, cfg.image_size).astype(np.float32))[None, None].to(device)
        _, logits = evaluate_points(predictor.stepper(emb), target, np.random.default_rng(args.seed), cfg, args.clicks)
    elif args.box:
        local = np.clip(np.round(corners - start), 0, cfg.image_size - 1)
        box = torch.tensor(np.concatenate([local.min(0), local.max(0)]), dtype=torch.long, device=device)[None]
        logits = upsample(predictor.step(emb, boxes=box, masks=low_res), cfg)
    else:
        for (_, label), point in zip(clicks, model_points):
            local = np.clip(np.round(point - start), 0, cfg.image_size - 1)
            coords = torch.tensor(local, dtype=torch.long, device=device).reshape(1, 1, 3)
            labels = torch.tensor([[label]], device=device)
            low_res = predictor.step(emb, points=(coords, labels), masks=low_res)
        logits = upsample(low_res, cfg)
    mask = (torch.sigmoid(logits) > 0.5)[0, 0].cpu().numpy().astype(np.uint8)
    full = resample_to_shape(paste_at(mask, start, image.shape), canon_shape, order=0)
    write_nifti(Path(args.output), from_canonical(full, info), like=vol, dtype=np.uint8)
    print(f"wrote {args.output} ({int(full.sum())} foreground voxels in the RAS grid)")


if __name__ == "__main__":
    run_cli(main)
