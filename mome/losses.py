"""MoME losses: nnU-Net Dice + CE, deep supervision (Eq. 3, 4) and the dynamic curriculum loss (Eq. 2).

Tensor layouts: logits (B, K, D, H, W); integer label maps (B, 1, D, H, W) or (B, D, H, W).
"""

import torch
import torch.nn.functional as F


def _labels(target: torch.Tensor) -> torch.Tensor:
    """(B, 1, D, H, W) or (B, D, H, W) integer labels -> (B, D, H, W) int64."""
    if target.ndim == 5:
        if target.shape[1] != 1:
            raise ValueError(f"target must be a label map (B, 1, D, H, W), got {tuple(target.shape)}")
        target = target[:, 0]
    return target.long()


def dice_ce_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    *,
    batch_dice: bool = False,
    smooth: float = 1e-5,
    do_bg: bool = False,
    reduction: str = "mean",
) -> torch.Tensor:
    """L(sigma(o), Y) of Eq. 3/4: nnU-Net's DC_and_CE_loss = CE - soft Dice (weights 1 and 1).

    CE is the mean over voxels. Soft Dice on softmax probabilities p and one-hot y, per sample b and foreground
    class c (background dropped, do_bg=False): dc = (2 sum p*y + smooth) / max(sum y + sum p + smooth, 1e-8),
    averaged over classes and samples; with batch_dice the sums also run over the batch. The Dice term enters
    as -dc (nnU-Net), not 1 - dc, so a perfect prediction gives a loss of -1 (plus CE), never a constant shift.
    MoME's 3d_fullres plans give batch_dice=False (see ../shared/reference/mome.md, 9.1).

    Args:
        logits: (B, K, D, H, W) unnormalised scores.
        target: (B, 1, D, H, W) or (B, D, H, W) labels in 0..K-1.
        reduction: "mean" -> scalar; "none" -> (B,) per-sample losses whose mean is the "mean" value
            (not available with batch_dice, where samples are pooled).

    Returns:
        scalar, or (B,) with reduction="none".
    """
    labels = _labels(target)
    if reduction not in ("mean", "none") or (reduction == "none" and batch_dice):
        raise ValueError(f"reduction must be 'mean' or 'none' (not with batch_dice), got {reduction!r}")
    ce = F.cross_entropy(logits, labels, reduction="none").flatten(1).mean(dim=1)  # (B,)
    probs = torch.softmax(logits, dim=1)
    onehot = F.one_hot(labels, num_classes=logits.shape[1]).movedim(-1, 1).to(probs.dtype)  # (B, K, D, H, W)
    if not do_bg:
        probs, onehot = probs[:, 1:], onehot[:, 1:]
    axes = (2, 3, 4) if not batch_dice else (0, 2, 3, 4)
    intersect = (probs * onehot).sum(dim=axes)
    denom = (onehot.sum(dim=axes) + probs.sum(dim=axes) + smooth).clamp_min(1e-8)
    dc = (2 * intersect + smooth) / denom  # (B, C) per sample and class, or (C,) with batch_dice
    if batch_dice:
        return ce.mean() - dc.mean()
    per_sample = ce - dc.mean(dim=1)  # (B,)
    return per_sample if reduction == "none" else per_sample.mean()


def deep_supervision_weights(num_levels: int) -> torch.Tensor:
    """k_l of Eq. 3/4, nnU-Net's default: 1/2^l for l = 0..L-1, the lowest resolution set to 0, normalised.

    L = 5 -> [8/15, 4/15, 2/15, 1/15, 0]; L = 1 (no deep supervision) -> [1].
    """
    if num_levels < 1:
        raise ValueError(f"num_levels must be >= 1, got {num_levels}")
    w = torch.tensor([0.5**level for level in range(num_levels)], dtype=torch.float64)
    if num_levels > 1:
        w[-1] = 0.0  # nnU-Net ignores the coarsest head
    return (w / w.sum()).float()


def downsample_target(target: torch.Tensor, shapes) -> list[torch.Tensor]:
    """d^l(Y) of Eq. 3/4: nearest-neighbour label maps at each output level's spatial shape.

    Uses 'nearest-exact' (voxel centres), as nnU-Net v2's DownsampleSegForDSTransform does.

    Args:
        target: (B, 1, D, H, W) or (B, D, H, W) labels.
        shapes: spatial shapes (d_l, h_l, w_l), highest resolution first.

    Returns:
        list of (B, 1, d_l, h_l, w_l) int64 label maps.
    """
    labels = _labels(target)[:, None].float()  # interpolate needs a float (B, 1, D, H, W)
    return [
        labels.long()
        if tuple(s) == tuple(labels.shape[2:])
        else F.interpolate(labels, size=tuple(s), mode="nearest-exact").long()
        for s in shapes
    ]


def deep_supervised_loss(
    outputs: list[torch.Tensor], targets: list[torch.Tensor], weights: torch.Tensor, *, reduction: str = "mean"
) -> torch.Tensor:
    """MoME Eq. 3 (outputs = e_i^l) and Eq. 4 (outputs = o^l): sum_l k_l * L(sigma(outputs[l]), d^l(Y)).

    Levels with k_l = 0 are skipped, as in nnU-Net's DeepSupervisionWrapper.

    Args:
        outputs: L logits (B, K, d_l, h_l, w_l), highest resolution first.
        targets: L label maps from `downsample_target`.
        weights: (L,) k_l from `deep_supervision_weights`.
        reduction: "mean" -> scalar; "none" -> (B,) per-sample losses.
    """
    if not len(outputs) == len(targets) == len(weights):
        raise ValueError(f"got {len(outputs)} outputs, {len(targets)} targets and {len(weights)} weights")
    total = 0.0
    for out, tgt, k in zip(outputs, targets, weights.tolist()):
        if k != 0:
            total = total + k * dice_ce_loss(out, tgt, reduction=reduction)
    return total


def curriculum_weight(epoch: int, num_epochs: int) -> float:
    """f_epoch of Eq. 2: (1 - epoch / num_epochs)^2, from 1 at epoch 0 down to 0 at the end."""
    if num_epochs < 1 or not 0 <= epoch <= num_epochs:
        raise ValueError(f"need 0 <= epoch <= num_epochs and num_epochs >= 1, got {epoch} and {num_epochs}")
    return (1.0 - epoch / num_epochs) ** 2


def expert_specialisation_loss(
    expert_outputs: list[list[torch.Tensor]],
    targets: list[torch.Tensor],
    modality: torch.Tensor,
    weights: torch.Tensor,
    *,
    reduction: str = "sum",
) -> torch.Tensor:
    """sum_i 1[X in M_i] * L_i of Eq. 2, with L_i from Eq. 3, for a batch with one modality index per sample.

    Each sample supervises only the expert of its own modality. The official code applies the loss to every
    sample separately and sums over the batch ("sum", default); "mean" averages instead, matching the
    batch-mean scale of L_MoME.

    Args:
        expert_outputs: N lists of L logits e_i^l (B, K, d_l, h_l, w_l).
        targets: L label maps d^l(Y).
        modality: (B,) int expert index of each sample.
        weights: (L,) k_l.
    """
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    modality = modality.tolist()
    if not all(0 <= m < len(expert_outputs) for m in modality):
        raise ValueError(f"modality indices {modality} must lie in 0..{len(expert_outputs) - 1}")
    # (B, K, ...) per level, sample b taken from expert modality[b]; gradients reach only the matching experts
    matched = [
        torch.stack([expert_outputs[m][level][b] for b, m in enumerate(modality)]) for level in range(len(targets))
    ]
    per_sample = deep_supervised_loss(matched, targets, weights, reduction="none")  # (B,)
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def curriculum_loss(
    fused: list[torch.Tensor],
    expert_outputs: list[list[torch.Tensor]],
    target: torch.Tensor,
    modality: torch.Tensor,
    *,
    epoch: int,
    num_epochs: int,
    curriculum: bool = True,
    expert_reduction: str = "sum",
) -> dict[str, torch.Tensor]:
    """MoME Eq. 2: L_cl = f_epoch * sum_i 1[X in M_i] L_i + (1 - f_epoch) * L_MoME; Eq. 4 alone without curriculum.

    Args:
        fused: L fused logits o^l from `MoME(x)`, highest resolution first.
        expert_outputs: N lists of L expert logits e_i^l (`MoME(x, return_all=True)["experts"]`).
        target: (B, 1, D, H, W) or (B, D, H, W) full-resolution labels Y.
        modality: (B,) expert index of each sample (only read here, never by the model).
        epoch, num_epochs: for f_epoch = (1 - epoch / num_epochs)^2.
        curriculum: False gives the ablation of Table 3: L_MoME (Eq. 4) only.
        expert_reduction: see `expert_specialisation_loss`.

    Returns:
        dict with "loss" (to back-propagate), "mome" (L_MoME), "experts" (the indicator sum) and "f_epoch".
    """
    weights = deep_supervision_weights(len(fused))
    targets = downsample_target(target, [o.shape[2:] for o in fused])
    mome = deep_supervised_loss(fused, targets, weights)
    if not curriculum:
        zero = torch.zeros((), device=mome.device)
        return {"loss": mome, "mome": mome.detach(), "experts": zero, "f_epoch": zero}
    f = curriculum_weight(epoch, num_epochs)
    experts = expert_specialisation_loss(expert_outputs, targets, modality, weights, reduction=expert_reduction)
    loss = f * experts + (1.0 - f) * mome
    return {
        "loss": loss,
        "mome": mome.detach(),
        "experts": experts.detach(),
        "f_epoch": torch.tensor(f, device=mome.device),
    }
