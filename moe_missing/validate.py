"""Validation during training on the held-out fold: the exact Eq. (2) objective and the lesion Dice.

Each held-out case is read from the cache one at a time (memory maps, 1 mm grid) and predicted whole, with the
sliding window of `predict`, from every configuration the model serves and the case has (its missing
channels removed, each distinct configuration once). The objective is Novosad Eq. (2) evaluated exactly,
E_m E_(x,y) L(y, f(x~(x, m))) with L = DiceCE on the whole volume, the mean over those (case, configuration)
pairs; the Dice is the lesion Dice of the argmax, averaged the same way. Under DDP each rank scores every
world-th case and the sums are added up.
"""

import numpy as np
import torch

from moe_missing.data import case_codes
from moe_missing.losses import dice_ce_loss, drop_modalities
from moe_missing.predict import window_logits
from shared.metrics import dice

METRICS = {"objective": "min", "dice": "max"}  # what --val-metric may choose, and which way is better


@torch.no_grad()
def validation_score(model, cases, *, patch, device, dedicated: str | None = None, overlap: float = 0.5,
                     amp: bool = True, rank: int = 0, world_size: int = 1) -> dict:  # fmt: skip
    """Mean objective (Eq. 2, DiceCE) and lesion Dice over the (case, configuration) pairs of the held-out cases.

    Args:
        model: the un-wrapped model; it is put in eval mode for the pass and back in training mode after.
        cases: cached held-out cases (`shared.cache.CachedCase`), read one at a time.
        patch: sliding-window tile size.
        dedicated: a dedicated model's code (only that configuration is scored), or None for every one.

    Returns:
        {"objective": float, "dice": float, "pairs": int} over every rank's cases.
    """
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # objective sum, Dice sum, pairs
    for case in cases[rank::world_size]:
        image = torch.from_numpy(np.array(case.open_image(), dtype=np.float32))[None].to(device)  # (1, K, D, H, W)
        label = torch.from_numpy(np.array(case.open_label(), dtype=np.int64))[None].to(device)  # (1, D, H, W)
        for code in case_codes(case.available, dedicated):
            m = torch.tensor([code], dtype=torch.float32, device=device)  # (1, K)
            logits = window_logits(model, drop_modalities(image, m), m, patch_size=patch, overlap=overlap, amp=amp)
            totals[0] += dice_ce_loss(logits, label).double()
            pred = logits.argmax(1)
            totals[1] += dice((pred == 1).cpu().numpy(), (label == 1).cpu().numpy())
            totals[2] += 1
    if world_size > 1:
        torch.distributed.all_reduce(totals)
    model.train(was_training)
    pairs = int(totals[2].item())
    if pairs == 0:
        return {"objective": float("nan"), "dice": float("nan"), "pairs": 0}
    return {"objective": float(totals[0] / pairs), "dice": float(totals[1] / pairs), "pairs": pairs}


def improved(value: float, best: dict | None, metric: str) -> bool:
    """Whether a validation value beats the best so far (lower objective, higher Dice); NaN never does."""
    if not np.isfinite(value):
        return False
    if best is None or best["metric"] != metric:
        return True
    return value < best["value"] if METRICS[metric] == "min" else value > best["value"]
