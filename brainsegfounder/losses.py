"""Losses of BrainSegFounder: the three self-supervised proxy tasks and the segmentation loss.

The BrainSegFounder paper adopts the pretraining objective of Tang et al., "Self-supervised pre-training of
Swin transformers for 3D medical image analysis" (CVPR 2022) without restating it; the equation numbers
below are Tang et al.'s. Weights are 1 each, as in the official code.
"""

import torch
import torch.nn.functional as F


def inpainting_loss(reconstruction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Masked volume inpainting, Tang et al. Eq. (1): L_inpaint = mean |X - X_hat| over all voxels.

    As the official code, the target is the rotated but not cut-out view and the loss covers the whole
    volume, not only the cut-out boxes.

    Args:
        reconstruction, target: (B, C, D, H, W).
    Returns:
        scalar.
    """
    return (reconstruction - target).abs().mean()


def rotation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Rotation prediction, Tang et al. Eq. (2): cross-entropy over the 4 classes 0/90/180/270 degrees.

    Args:
        logits: (B, 4).
        labels: (B,) int64 in 0..3.
    Returns:
        scalar, mean over the batch.
    """
    return F.cross_entropy(logits, labels)


def contrastive_loss(z_i: torch.Tensor, z_j: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """Contrastive coding, Tang et al. Eq. (3) (NT-Xent): for each of the 2B views v,
    -log( exp(sim(v, v+)/t) / sum_{k != v} exp(sim(v, k)/t) ), averaged over the 2B views.

    sim is the cosine similarity; v+ is the other view of the same crop; the denominator includes the
    positive, as the official code (only self-similarity is removed). Negatives come from this batch only.

    Args:
        z_i, z_j: (B, F) projections of the two views of B crops (row b of both is the same crop).
        temperature: t, 0.5 in the official code.
    Returns:
        scalar.
    """
    if z_i.shape != z_j.shape or z_i.ndim != 2:
        raise ValueError(f"z_i and z_j must both be (B, F), got {tuple(z_i.shape)} and {tuple(z_j.shape)}.")
    B = z_i.shape[0]
    z = F.normalize(torch.cat([z_i, z_j]), dim=1)  # (2B, F)
    logits = z @ z.T / temperature  # (2B, 2B)
    logits = logits.masked_fill(torch.eye(2 * B, dtype=torch.bool, device=z.device), float("-inf"))
    positive = torch.cat([torch.arange(B, 2 * B), torch.arange(0, B)]).to(z.device)  # view b pairs with b +- B
    return F.cross_entropy(logits, positive)


def ssl_loss(rot_logits, rot_labels, z_i, z_j, reconstruction, target, temperature: float = 0.5,
             weights=(1.0, 1.0, 1.0)) -> dict:  # fmt: skip
    """Total pretraining loss, Tang et al. Eq. (4): L = a1 L_inpaint + a2 L_contrast + a3 L_rot.

    Args:
        rot_logits (2B, 4), rot_labels (2B,): both views concatenated along the batch.
        z_i, z_j: (B, F) contrastive projections of view 1 and view 2.
        reconstruction, target: (2B, C, D, H, W).
        temperature: NT-Xent temperature.
        weights: (a1, a2, a3) for inpainting, contrastive, rotation.
    Returns:
        {"loss", "inpaint", "contrast", "rotation"} scalars.
    """
    parts = {
        "inpaint": inpainting_loss(reconstruction, target),
        "contrast": contrastive_loss(z_i, z_j, temperature=temperature),
        "rotation": rotation_loss(rot_logits, rot_labels),
    }
    parts["loss"] = sum(w * parts[k] for w, k in zip(weights, ("inpaint", "contrast", "rotation")))
    return parts


def dice_loss(logits: torch.Tensor, target: torch.Tensor, smooth_nr: float = 1e-5, smooth_dr: float = 1e-5):
    """Soft Dice loss on sigmoid channels (MONAI `DiceLoss(sigmoid=True)`, the BrainSegFounder fine-tuning loss):
    1 - (2 sum(p g) + smooth_nr) / (sum p + sum g + smooth_dr) per image and channel, averaged.

    Args:
        logits: (B, K, D, H, W).
        target: (B, K, D, H, W) in {0, 1} (multi-label: BraTS TC/WT/ET overlap).
    Returns:
        scalar.
    """
    p = torch.sigmoid(logits.float())
    g = target.float()
    intersection = (p * g).sum(dim=(2, 3, 4))
    denominator = p.sum(dim=(2, 3, 4)) + g.sum(dim=(2, 3, 4))
    return (1.0 - (2.0 * intersection + smooth_nr) / (denominator + smooth_dr)).mean()


def dice_bce_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Option: Dice loss plus binary cross-entropy per voxel and channel (sigmoid channels), weights 1 each."""
    return dice_loss(logits, target) + F.binary_cross_entropy_with_logits(logits.float(), target.float())
