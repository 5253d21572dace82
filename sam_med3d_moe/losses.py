"""Losses of SAM-Med3D(-MoE): the segmentation DiceCE loss and the gate's cross-entropy (paper Sec. 3).

The paper numbers no equation; its one formula (the mask selector, Sec. 2.3) is in `selector.py`.
"""

import torch
import torch.nn.functional as F


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, ce: bool = True, smooth: float = 1e-5) -> torch.Tensor:
    """SAM-Med3D's `DiceCELoss(sigmoid=True, squared_pred=True, reduction="mean")` (MONAI >= 1.3 semantics).

    Dice = mean over (batch, channel) of 1 - (2 sum(p g) + smooth) / (sum(p^2) + sum(g^2) + smooth), p = sigmoid;
    CE = binary cross-entropy with logits, mean over voxels. Before MONAI 1.3 the CE term of a 1-channel input was
    exactly 0: `ce=False` mimics the original training (Dice only).

    Args:
        logits: (B, 1, ...) logits; target: (B, 1, ...) in {0, 1}.
    Returns:
        scalar loss.
    """
    target = target.to(logits.dtype)
    prob = torch.sigmoid(logits)
    dims = tuple(range(2, logits.dim()))
    inter = (prob * target).sum(dims)
    denom = (prob * prob).sum(dims) + (target * target).sum(dims)
    dice = (1 - (2 * inter + smooth) / (denom + smooth)).mean()
    if not ce:
        return dice
    return dice + F.binary_cross_entropy_with_logits(logits, target)


def gate_loss(gate_logits: torch.Tensor, task: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the gate on the task identity (paper Sec. 3: "CrossEntropy Loss ... to supervise the
    outputs of the gating mechanism").

    Args:
        gate_logits: (B, m) logits over [general, expert 1, ..., expert m-1].
        task: (B,) long target class (0 for a task that has no specific expert).
    Returns:
        scalar loss, mean over the batch.
    """
    return F.cross_entropy(gate_logits, task)
