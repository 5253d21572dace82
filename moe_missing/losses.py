"""Every numbered equation of Novosad et al. (MICCAI 2024) except the MoE layer itself (Eq. 3, `moe_layer.py`).

Eq. (1) modality dropout, (2) its objective, (4) the gate regulariser, (5) the two-view segmentation loss,
(6) online self-distillation, (7) the total loss, plus the DiceCE loss L they all use and the ramp-up w(t).
"""

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F

SMOOTH = 1e-5  # MONAI DiceLoss smooth_nr = smooth_dr = 1e-5


def all_codes(num_modalities: int) -> torch.Tensor:
    """The 2^K - 1 non-empty modality codes, by the number present, then in channel order.

    The order only fixes which code an index of `sample_codes` picks; the tables put rows in the paper's order
    (`tables.config_order`).

    Returns:
        (2^K - 1, K) float tensor of 0/1; e.g. K = 3: 100, 010, 001, 110, 101, 011, 111.
    """
    if num_modalities < 1:
        raise ValueError(f"num_modalities must be >= 1, got {num_modalities}")
    rows = []
    for size in range(1, num_modalities + 1):
        for present in itertools.combinations(range(num_modalities), size):
            rows.append([1.0 if k in present else 0.0 for k in range(num_modalities)])
    return torch.tensor(rows)


def sample_codes(available: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """One code per sample, uniform over the non-empty subsets of that sample's available modalities.

    With every modality on disk this is the uniform draw from all 2^K - 1 codes of Eq. (2); a training case
    that lacks a channel only draws codes without it.

    Args:
        available: (B, K) 0/1, the channels each sample actually has (at least one).
        rng: the data pipeline's generator.

    Returns:
        (B, K) float 0/1 codes.
    """
    codes = all_codes(available.shape[1])
    out = []
    for avail in available:
        allowed = codes[(codes <= avail).all(dim=1)]  # subsets of the available set
        if len(allowed) == 0:
            raise ValueError("every sample needs at least one available modality")
        out.append(allowed[int(rng.integers(len(allowed)))])
    return torch.stack(out)


def drop_modalities(x: torch.Tensor, code: torch.Tensor) -> torch.Tensor:
    """Novosad Eq. (1): x~(x, m) = [x^1 m^1, ..., x^K m^K]; missing channels become zeros.

    Args:
        x: (B, K, D, H, W) image; code: (B, K) 0/1.
    """
    return x * code.to(x.dtype)[:, :, None, None, None]


def dice_ce_loss(logits: torch.Tensor, target: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """The segmentation loss L: unweighted soft Dice + cross-entropy on softmax outputs (MONAI DiceCELoss).

    As `DiceCELoss(softmax=True, to_onehot_y=True)` for label maps and `DiceCELoss(softmax=True)` for soft
    targets (probabilities): Dice per sample and class including background, sums over space only,
    1 - (2I + 1e-5) / (sum p + sum t + 1e-5), mean over classes; CE mean over voxels.

    An open choice: the paper names MONAI's DiceCELoss (whose default is this non-squared form), but its footnote 4
    says "this exact formulation" is V-Net's, whose denominator is sum p^2 + sum t^2 (MONAI squared_pred=True).
    The two agree for hard 0/1 predictions and differ for soft ones; this code uses MONAI's default.

    Args:
        logits: (B, C, D, H, W).
        target: (B, D, H, W) or (B, 1, D, H, W) integer labels, or (B, C, D, H, W) float probabilities.
        reduction: "mean" over the batch, or "none" for one value per sample (B,).
    """
    log_p = torch.log_softmax(logits, dim=1)
    if target.dtype.is_floating_point and target.shape == logits.shape:
        soft = target
    else:
        labels = target[:, 0] if target.ndim == logits.ndim else target
        soft = F.one_hot(labels.long(), logits.shape[1]).movedim(-1, 1).to(logits.dtype)  # (B, C, D, H, W)
    p = log_p.exp()
    dims = tuple(range(2, logits.ndim))
    intersection = (p * soft).sum(dims)  # (B, C)
    dice = 1 - (2 * intersection + SMOOTH) / (p.sum(dims) + soft.sum(dims) + SMOOTH)
    ce = -(soft * log_p).sum(1).flatten(1).mean(1)  # (B,)
    per_sample = dice.mean(1) + ce
    if reduction == "none":
        return per_sample
    if reduction != "mean":
        raise ValueError(f"reduction must be 'mean' or 'none', got {reduction!r}")
    return per_sample.mean()


def modality_dropout_objective(model, x: torch.Tensor, y: torch.Tensor, codes: torch.Tensor | None = None,
                               loss_fn=dice_ce_loss) -> torch.Tensor:  # fmt: skip
    """Novosad Eq. (2) evaluated exactly: E_{m ~ M} E_{(x, y)} L(y, f(x~(x, m))) over the codes M.

    Training uses its one-code-per-sample Monte-Carlo estimate (the second term of Eq. 5); this exact form is
    for checks and for validation.

    Args:
        model: callable (x (B, K, ...), code (B, K)) -> logits.
        x: (B, K, D, H, W) full-modality batch; y: its labels.
        codes: (M, K) codes to average over; default all 2^K - 1.
    """
    codes = all_codes(x.shape[1]) if codes is None else codes
    total = 0.0
    for code in codes.to(x.device):
        batch_code = code.expand(x.shape[0], -1)
        total = total + loss_fn(model(drop_modalities(x, batch_code), batch_code), y)
    return total / len(codes)


def coefficient_of_variation(v: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """cv(v) = std(v) / mean(v) along `dim`, population std (divisor N, as tensor2tensor's cv_squared).

    For N experts a one-hot v gives sqrt(N - 1), a uniform v gives 0.

    The gradient is finite everywhere: sqrt has an infinite slope at 0, so at exactly equal entries (a uniform
    gate, e.g. a zero-initialised gate Linear, or a single expert) autograd would give 0 * inf = NaN. There cv
    has its minimum 0, and the gradient used is 0, a valid subgradient.
    """
    mean = v.mean(dim)
    var = (v - mean.unsqueeze(dim)).pow(2).mean(dim)
    spread = var > 0
    # the inner where keeps sqrt away from 0, so its backward never sees the infinite slope
    std = torch.where(spread, torch.where(spread, var, 1.0).sqrt(), 0.0)
    return std / mean


def gate_regulariser(phi: torch.Tensor, sign: float = -1.0) -> torch.Tensor:
    """Novosad Eq. (4) for one MoE layer: cv(E_m[phi(m)]) - E_m[cv(phi(m))].

    The paper prints "+" before the second term, but its text says that term must *promote* per-task
    variance, and with "+" uniform gates are the global minimum; DESIGN.md fixes "-" (sign=-1). sign=+1 is the
    printed form, kept as an ablation.

    Args:
        phi: (M, N) gate weights of this layer for the M codes (all 2^K - 1 of them in training).
    """
    balance = coefficient_of_variation(phi.mean(0))  # small when every expert is used equally on average
    specialisation = coefficient_of_variation(phi, dim=1).mean()  # large when each code picks few experts
    return balance + sign * specialisation


def moe_regulariser(layers, codes: torch.Tensor, sign: float = -1.0) -> torch.Tensor:
    """L_reg = sum over MoE layers l of Eq. (4), on the noise-free gates of all `codes` (M, K).

    Returns a zero tensor for a model without MoE layers.
    """
    total = codes.new_zeros(())
    for layer in layers:
        phi = layer.gate_weights(codes.to(layer.gate.weight.device), noise=False)
        total = total + gate_regulariser(phi, sign=sign)
    return total


def segmentation_loss(logits_full: torch.Tensor, logits_dropped: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Novosad Eq. (5): (1/B) sum_b L(y_b, f(x_b)) + (1/B) sum_b L(y_b, f(x~_b)), both views supervised."""
    return dice_ce_loss(logits_full, y) + dice_ce_loss(logits_dropped, y)


def self_distillation_loss(logits_dropped: torch.Tensor, logits_full: torch.Tensor, tau: float = 2.0,
                           form: str = "dicece") -> torch.Tensor:  # fmt: skip
    """Novosad Eq. (6): (1/B) sum_b L_tau(sg(f(x_b)), f(x~_b)), the full view teaching the dropped view.

    The teacher's logits are detached (stop-gradient) and both sides are softened at temperature tau.
    form "dicece" (paper: "the same" DiceCE loss, no tau^2 factor): DiceCE of softmax(student / tau) against
    the soft target softmax(teacher / tau). form "kl" (ablation, Hinton et al.): voxel-wise
    KL(p_teacher || p_student) * tau^2, mean over voxels and batch.

    Args:
        logits_dropped: (B, C, D, H, W) student logits f(x~).
        logits_full: (B, C, D, H, W) teacher logits f(x), same model, full modalities.
    """
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    teacher = torch.softmax(logits_full.detach() / tau, dim=1)
    if form == "dicece":
        return dice_ce_loss(logits_dropped / tau, teacher)
    if form == "kl":
        log_student = torch.log_softmax(logits_dropped / tau, dim=1)
        kl = (teacher * (torch.log(teacher.clamp_min(1e-12)) - log_student)).sum(1)
        return kl.mean() * tau**2
    raise ValueError(f"form must be 'dicece' or 'kl', got {form!r}")


def sigmoid_rampup(step: int, total_steps: int) -> float:
    """w(t) of Eq. (7): exp(-5 (1 - t/L)^2) with L = total_steps / 3, then 1 (Laine & Aila; Mean Teacher).

    Counted in optimiser steps: w(0) = exp(-5) ~ 0.0067, w = 1 from step L on.
    """
    length = total_steps / 3
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(step, 0), length) / length
    return float(math.exp(-5.0 * phase * phase))


def total_loss(seg: torch.Tensor, reg: torch.Tensor, sd: torch.Tensor, *, step: int, total_steps: int,
               alpha: float = 0.1, beta: float = 1.0) -> torch.Tensor:  # fmt: skip
    """Novosad Eq. (7): L = L_seg + alpha L_reg + w(t) beta L_sd (paper: alpha 0.1, beta 1)."""
    return seg + alpha * reg + sigmoid_rampup(step, total_steps) * beta * sd
