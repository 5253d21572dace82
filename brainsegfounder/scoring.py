"""Validation Dice of fine-tuning, few-shot tables and evaluate: what is scored and how empty references count.

What is scored: the sigmoid channels thresholded at 0.5 and then passed through the label map that `predict`
writes (WT -> edema, TC -> necrosis, ET -> enhancing) and back to regions, as `evaluate` rebuilds them, so a
model gets the same Dice in validation as from predict + evaluate (`predicted_regions`). This differs from
scoring the channels directly where they are not nested: an ET voxel outside TC is enhancing in the label map,
hence also TC and WT.

Empty references (`--empty-reference`):
- "skip" (default; BrainSegFounder's and MONAI's `DiceMetric(include_background=True)`, whose Dice is NaN
  when the reference region is empty): the case is left out of that region's mean, whatever was predicted,
  and the number of skipped cases is reported. A region with no reference in any case has mean NaN; the
  mean over regions is then taken over the regions that have one.
- "score" (the project's `shared.metrics.dice`): empty prediction and reference score 1, a prediction on an
  empty reference 0, and every case counts.
On real BraTS (cases without enhancing tumour) the two give different ET and mean Dice. The paper states no
convention; "skip" is what BrainSegFounder's code computes (MONAI DiceMetric), so it is the one to compare
with the paper's tables.
"""

import numpy as np

from brainsegfounder.regions import region_targets, regions_to_labels
from shared.metrics import dice

EMPTY_REFERENCE = ("skip", "score")


def add_empty_reference_arg(parser) -> None:
    parser.add_argument("--empty-reference", choices=EMPTY_REFERENCE, default="skip",
                        help="a case whose reference region is empty: left out of that region's mean (BSF, "
                        "MONAI DiceMetric; the count is reported) or scored 1 / 0 (empty / non-empty "
                        "prediction)")  # fmt: skip


def predicted_regions(probs: np.ndarray, target: str, values=None) -> np.ndarray:
    """(K, X, Y, Z) probabilities -> (K, X, Y, Z) bool regions as predict + evaluate score them (module docstring).

    `values`: the (necrosis, edema, enhancing) label values of a "brats" target.
    """
    masks = probs > 0.5
    if target == "binary":
        return masks
    return region_targets(regions_to_labels(masks, values), values) > 0.5


def soft_dice(probs: np.ndarray, truth: np.ndarray) -> float:
    """Soft Dice 2 sum(p g) / (sum p + sum g) of probabilities against a binary mask (MONAI DiceMetric on
    unthresholded input, BSF's validation); both empty -> 1.0."""
    p, g = probs.astype(np.float64), truth.astype(np.float64)
    total = p.sum() + g.sum()
    return float(2.0 * (p * g).sum() / total) if total > 0 else 1.0


def case_scores(pred: np.ndarray, truth: np.ndarray, names, probs: np.ndarray | None = None) -> dict:
    """Dice per region of one case with the "score" convention, and which regions have an empty reference.

    Args:
        pred, truth: (K, X, Y, Z) boolean region masks; names: the K region names.
        probs: (K, X, Y, Z) sigmoid probabilities, for the soft Dice of each channel (None: not computed).
    Returns:
        {"dice": {name: float}, "empty": [names whose reference is empty]}, and "soft": {name: float} with probs.
    """
    scores = {"dice": {name: float(dice(pred[k], truth[k])) for k, name in enumerate(names)},
              "empty": [name for k, name in enumerate(names) if not truth[k].any()]}  # fmt: skip
    if probs is not None:
        scores["soft"] = {name: soft_dice(probs[k], truth[k]) for k, name in enumerate(names)}
    return scores


def region_means(per_case: dict, names, empty_reference: str, key: str = "dice") -> dict:
    """Mean Dice per region over the cases, the mean over regions and the skipped counts.

    Args:
        per_case: {case id: `case_scores` result}.
        names: region names, in output order.
        empty_reference: "skip" or "score" (module docstring).
        key: "dice" (hard) or "soft" (needs `case_scores(probs=...)`).
    Returns:
        {name: mean (NaN if every case was skipped), "mean": mean over the regions with a value (NaN if none),
         "skipped": {name: cases left out}, "n_cases": number of cases}
    """
    if empty_reference not in EMPTY_REFERENCE:
        raise ValueError(f"empty_reference must be one of {EMPTY_REFERENCE}, got {empty_reference!r}.")
    means, skipped = {}, {}
    for name in names:
        kept = [s[key][name] for s in per_case.values() if empty_reference == "score" or name not in s["empty"]]
        skipped[name] = len(per_case) - len(kept)
        means[name] = float(np.mean(kept)) if kept else float("nan")
    defined = [v for v in means.values() if not np.isnan(v)]
    overall = float(np.mean(defined)) if defined else float("nan")
    return {**means, "mean": overall, "skipped": skipped, "n_cases": len(per_case)}


def describe_skipped(skipped: dict, n_cases: int) -> str:
    """'empty references skipped: ET 2 of 5 cases' (or 'none')."""
    parts = [f"{name} {n}" for name, n in skipped.items() if n]
    return f"empty references skipped: {', '.join(parts) + f' of {n_cases} cases' if parts else 'none'}"
