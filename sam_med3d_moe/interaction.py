"""The interactive loops: the official iterative training recipe and the N-click / box evaluation protocols.

Every loop drives a `step(points, boxes, masks) -> low_res_logits` callable (a SAM-Med3D with a given decoder,
or the MoE), so the same protocol serves the general model, a task expert and the mixture.
"""

from collections.abc import Callable

import numpy as np
import torch

from sam_med3d_moe.clicks import box_from_mask, random_click, ritm_click
from sam_med3d_moe.config import SamConfig
from sam_med3d_moe.losses import dice_ce_loss
from sam_med3d_moe.model import upsample

Step = Callable[..., torch.Tensor]


def _zeros_low_res(gt: torch.Tensor, cfg: SamConfig) -> torch.Tensor:
    return gt.new_zeros(gt.shape[0], 1, *(cfg.low_res,) * 3)


def train_interaction(
    step: Step,
    gt: torch.Tensor,
    rng: np.random.Generator,
    cfg: SamConfig,
    num_clicks: int = 11,
    mask_only_steps: bool = True,
    box_prob: float = 0.0,
    jitter: int = 2,
    ce: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The official training interaction (`train.py` `interaction`), summed DiceCE over the clicks.

    Step t gets only the newest click (from the error region of the previous prediction, the first one a random
    foreground voxel) and the previous low-res logits as the mask prompt (zeros at t = 0). One random step in
    [2, 8] and the last step are mask-only (no point), when `mask_only_steps`. The logits are not detached, so
    gradients flow through the whole mask-prompt chain. With probability `box_prob` the first step gets the
    jittered ground-truth box instead of a click (boxes are not in the official recipe).

    Args:
        step: callable(points=, boxes=, masks=) -> (B, 1, 4g, 4g, 4g) logits.
        gt: (B, 1, I, I, I) binary targets.
        num_clicks: steps per batch (official: 11).
    Returns:
        the summed loss, and the last full-size logits (B, 1, I, I, I).
    """
    low_res = _zeros_low_res(gt, cfg)
    logits = torch.zeros_like(gt)
    mask_only = {int(rng.integers(2, 9)), num_clicks - 1} if mask_only_steps else set()
    use_box = box_prob > 0 and rng.random() < box_prob
    loss = gt.new_zeros(())
    for t in range(num_clicks):
        points, boxes = None, None
        if t == 0 and use_box:
            boxes = box_from_mask(gt, rng, jitter=jitter)
        elif t not in mask_only:
            points = random_click(logits.detach(), gt, rng)
        low_res = step(points=points, boxes=boxes, masks=low_res)
        logits = upsample(low_res, cfg)
        loss = loss + dice_ce_loss(logits, gt, ce=ce)
    return loss, logits


def dice_score(pred: np.ndarray, gt: np.ndarray) -> float:
    """Dice of two boolean arrays; 1.0 when both are empty."""
    denom = pred.sum() + gt.sum()
    return 1.0 if denom == 0 else float(2.0 * (pred & gt).sum() / denom)


@torch.no_grad()
def evaluate_points(
    step: Step, gt: torch.Tensor, rng: np.random.Generator, cfg: SamConfig, num_clicks: int = 10
) -> tuple[np.ndarray, torch.Tensor]:
    """The old official N-click validation (`validation.py` @c396811): one new click per step plus the previous
    low-res logits; clicks 1-2 from the error interior (`ritm_click`), later ones uniform in the error region.

    Args:
        gt: (B, 1, I, I, I) binary targets in the crop.
    Returns:
        dice (B, num_clicks): Dice of sigmoid > 0.5 after each click, on the crop (the official per-case score is
        the max over clicks, `dice.max(1)`; the last click is `dice[:, -1]`), and the last logits (B, 1, I, I, I).
    """
    low_res = _zeros_low_res(gt, cfg)
    logits = torch.zeros_like(gt)
    target = gt.squeeze(1).cpu().numpy() > 0
    dice = np.zeros((gt.shape[0], num_clicks))
    for t in range(num_clicks):
        points = (ritm_click if t < 2 else random_click)(logits, gt, rng)
        low_res = step(points=points, boxes=None, masks=low_res)
        logits = upsample(low_res, cfg)
        pred = (torch.sigmoid(logits) > 0.5).squeeze(1).cpu().numpy()
        dice[:, t] = [dice_score(p, g) for p, g in zip(pred, target)]
    return dice, logits


@torch.no_grad()
def evaluate_box(
    step: Step, gt: torch.Tensor, rng: np.random.Generator, cfg: SamConfig, jitter: int = 0
) -> tuple[np.ndarray, torch.Tensor]:
    """One step with the (jittered) ground-truth box and an all-zero mask prompt.

    Returns:
        dice (B,), logits (B, 1, I, I, I).
    """
    low_res = step(points=None, boxes=box_from_mask(gt, rng, jitter=jitter), masks=_zeros_low_res(gt, cfg))
    logits = upsample(low_res, cfg)
    pred = (torch.sigmoid(logits) > 0.5).squeeze(1).cpu().numpy()
    target = gt.squeeze(1).cpu().numpy() > 0
    return np.array([dice_score(p, g) for p, g in zip(pred, target)]), logits


class InteractiveSam(torch.nn.Module):
    """A SAM-Med3D run through `train_interaction` in one forward call (so DDP sees one call per step).

    Args:
        sam: the model; its `mask_decoder` is the decoder being trained (general model or task expert).
        encode: callable image -> embedding (e.g. the compiled image encoder); default `sam.image_encoder`.
        frozen_encoder: compute the image embedding without gradients (task-expert fine-tuning).
    """

    def __init__(self, sam, encode: Callable | None = None, frozen_encoder: bool = False) -> None:
        super().__init__()
        self.sam = sam
        fn = encode or sam.image_encoder
        self.encode = lambda x: fn(x)  # a plain callable, so a compiled encoder is not registered a second time
        self.frozen_encoder = frozen_encoder

    def forward(self, image: torch.Tensor, gt: torch.Tensor, rng: np.random.Generator, **protocol):
        """Args: image, gt (B, 1, I, I, I); protocol: keyword arguments of `train_interaction`.
        Returns: (summed loss, last logits)."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen_encoder):
            emb = self.encode(image)

        def step(points=None, boxes=None, masks=None):
            return self.sam.decode(emb, points=points, boxes=boxes, masks=masks)

        return train_interaction(step, gt, rng, self.sam.cfg, **protocol)
