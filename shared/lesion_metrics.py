"""Lesion-wise metrics from connected components: lesion counts, LTPR, LFPR, lesion F1, count and volume differences.

A lesion is a connected component of a binary mask. Which voxels touch is set by `connectivity`: 6 (faces),
18 (faces and edges) or 26 (faces, edges and corners). Published evaluation code disagrees here (scipy default 6,
skimage connectivity=2 is 18, cc3d / MATLAB bwconncomp 26), so it is a parameter with default 26.

Lesions at or under a minimum volume can be left out of the lesion-wise counts (`min_volume_mm3`, default 0 =
every lesion counts), as the MSSEG challenges' evaluation (Anima's animaSegPerfAnalyzer, MinLesionVolume; MSSEG-2016
ignored lesions under 3 mm^3) does: such components are removed from both masks before lesions are matched.

Every function returns a finite number for empty masks; the conventions are written next to each one.
"""

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from shared.errors import InputError

# connectivity (number of neighbours) -> rank argument of scipy.ndimage.generate_binary_structure in 3D
_RANK_OF_CONNECTIVITY = {6: 1, 18: 2, 26: 3}


def binary_pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    """Return `pred` and `gt` as boolean arrays (non-zero = foreground) after checking that their shapes agree."""
    pred, gt = np.asarray(pred), np.asarray(gt)
    if pred.shape != gt.shape:
        raise InputError(f"pred shape {pred.shape} differs from gt shape {gt.shape}.")
    return pred.astype(bool, copy=False), gt.astype(bool, copy=False)


def label_lesions(mask: np.ndarray, connectivity: int = 26) -> tuple[np.ndarray, int]:
    """Connected components of a 3D binary mask.

    Args:
        mask: (X, Y, Z) array, non-zero = lesion.
        connectivity: 6, 18 or 26 neighbours.

    Returns:
        labels: (X, Y, Z) int32, 0 = background, 1..n = lesion index.
        n: number of lesions.
    """
    if connectivity not in _RANK_OF_CONNECTIVITY:
        raise InputError(f"connectivity must be 6, 18 or 26, got {connectivity!r}.")
    mask = np.asarray(mask)
    if mask.ndim != 3:
        raise InputError(f"lesion metrics need a 3D mask, got shape {mask.shape}.")
    structure = ndimage.generate_binary_structure(3, _RANK_OF_CONNECTIVITY[connectivity])
    labels, n = ndimage.label(mask.astype(bool, copy=False), structure=structure)
    return labels, int(n)


@dataclass(frozen=True)
class LesionCounts:
    """Lesion detection counts of one case (Carass et al. 2017 definitions, overlap of at least one voxel).

    tp: gt lesions with at least one voxel in pred; fn: the other gt lesions;
    fp: pred lesions with no voxel in gt; n_gt / n_pred: number of lesions in gt / pred.
    """

    tp: int
    fn: int
    fp: int
    n_gt: int
    n_pred: int

    @property
    def ltpr(self) -> float:
        """Lesion true positive rate tp / n_gt; no gt lesion -> 1.0 (nothing to miss)."""
        return 1.0 if self.n_gt == 0 else self.tp / self.n_gt

    @property
    def lfpr(self) -> float:
        """Lesion false positive rate fp / n_pred; no pred lesion -> 0.0 (nothing false)."""
        return 0.0 if self.n_pred == 0 else self.fp / self.n_pred

    @property
    def f1(self) -> float:
        """Lesion-wise F1 as in ATLAS: tp / (tp + (fp + fn) / 2); both masks empty -> 1.0.

        tp counts gt lesions and fp counts pred lesions, so this is not the F1 of one matching.
        """
        denominator = self.tp + (self.fp + self.fn) / 2
        return 1.0 if denominator == 0 else self.tp / denominator

    @property
    def count_difference(self) -> int:
        """Simple lesion count difference |n_pred - n_gt|."""
        return abs(self.n_pred - self.n_gt)


def drop_small_lesions(labels: np.ndarray, n: int, min_voxels: int) -> tuple[np.ndarray, int]:
    """Remove the lesions of fewer than `min_voxels` voxels from a label map and number the rest 1..n' again.

    Args:
        labels: (X, Y, Z) int, 0 = background, 1..n = lesion index (from `label_lesions`).
        n: number of lesions in `labels`.
        min_voxels: smallest lesion kept, in voxels (<= 1 keeps every lesion).

    Returns:
        (labels', n') with the kept lesions in their original order.
    """
    if min_voxels <= 1 or n == 0:
        return labels, n
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_voxels
    keep[0] = False
    new_index = np.where(keep, np.cumsum(keep), 0).astype(labels.dtype)  # old index -> new index, 0 = removed
    return new_index[labels], int(keep.sum())


def min_lesion_voxels(min_volume_mm3: float, spacing) -> int:
    """Voxels a lesion needs to be counted: it must be larger than `min_volume_mm3`.

    Anima's rule (animaSegPerfCAnalyzer): floor(min_volume / voxel_volume) + 1 voxels, so with 3 mm^3 at 1 mm
    a 3-voxel lesion is left out and a 4-voxel one counts; 0 mm^3 keeps every lesion (1 voxel).
    """
    if not np.isfinite(min_volume_mm3) or min_volume_mm3 < 0:
        raise InputError(f"the minimum lesion volume must be a finite number of mm^3 >= 0, got {min_volume_mm3!r}.")
    voxel_mm3 = float(np.prod(check_spacing(spacing, ndim=3)))
    return int(np.floor(min_volume_mm3 / voxel_mm3)) + 1


def lesion_counts(
    pred, gt, connectivity: int = 26, *, min_volume_mm3: float = 0.0, spacing=(1.0, 1.0, 1.0)
) -> LesionCounts:
    """Count detected, missed and false lesions of one case.

    Args:
        pred, gt: (X, Y, Z) binary masks (non-zero = lesion), same shape.
        connectivity: 6, 18 or 26 neighbours for the connected components.
        min_volume_mm3: lesions of at most this volume are removed from both masks before counting (see
            `min_lesion_voxels`); 0 counts every lesion.
        spacing: voxel size in mm, for `min_volume_mm3`.

    Returns:
        LesionCounts with tp, fn, fp, n_gt, n_pred (of the lesions kept).
    """
    pred, gt = binary_pair(pred, gt)
    min_voxels = min_lesion_voxels(min_volume_mm3, spacing)
    gt_labels, n_gt = drop_small_lesions(*label_lesions(gt, connectivity=connectivity), min_voxels)
    pred_labels, n_pred = drop_small_lesions(*label_lesions(pred, connectivity=connectivity), min_voxels)
    pred, gt = pred_labels > 0, gt_labels > 0  # a removed lesion neither detects nor is detected
    # a gt lesion is detected when any of its voxels is predicted: collect the gt ids seen under pred
    tp = int(np.count_nonzero(np.unique(gt_labels[pred & gt])))
    # a pred lesion is true when any of its voxels lies in gt; the rest are false positives
    n_pred_touching_gt = int(np.count_nonzero(np.unique(pred_labels[pred & gt])))
    return LesionCounts(tp=tp, fn=n_gt - tp, fp=n_pred - n_pred_touching_gt, n_gt=n_gt, n_pred=n_pred)


def ltpr(pred, gt, connectivity: int = 26) -> float:
    """Lesion true positive rate: share of gt lesions overlapped by pred; no gt lesion -> 1.0."""
    return lesion_counts(pred, gt, connectivity=connectivity).ltpr


def lfpr(pred, gt, connectivity: int = 26) -> float:
    """Lesion false positive rate: share of pred lesions with no voxel in gt; no pred lesion -> 0.0."""
    return lesion_counts(pred, gt, connectivity=connectivity).lfpr


def lesion_f1(pred, gt, connectivity: int = 26) -> float:
    """Lesion-wise F1 (ATLAS): tp / (tp + (fp + fn) / 2); both masks empty -> 1.0."""
    return lesion_counts(pred, gt, connectivity=connectivity).f1


def lesion_count_difference(pred, gt, connectivity: int = 26) -> int:
    """Simple lesion count difference |#pred lesions - #gt lesions|."""
    return lesion_counts(pred, gt, connectivity=connectivity).count_difference


def volume_difference(pred, gt, spacing=(1.0, 1.0, 1.0)) -> tuple[int, float]:
    """Absolute volume difference |V_pred - V_gt|.

    Args:
        pred, gt: binary masks (non-zero = lesion), same shape.
        spacing: voxel size in mm, one value per axis.

    Returns:
        (difference in voxels, difference in mm^3).
    """
    pred, gt = binary_pair(pred, gt)
    voxel_mm3 = float(np.prod(check_spacing(spacing, ndim=pred.ndim)))
    difference = abs(int(np.count_nonzero(pred)) - int(np.count_nonzero(gt)))
    return difference, difference * voxel_mm3


def check_spacing(spacing, ndim: int) -> tuple[float, ...]:
    """Return `spacing` as a tuple of `ndim` positive floats, or raise InputError naming the argument."""
    values = tuple(float(s) for s in np.atleast_1d(np.asarray(spacing, dtype=np.float64)))
    if len(values) != ndim or not all(np.isfinite(s) and s > 0 for s in values):
        raise InputError(f"spacing must be {ndim} positive finite numbers, got {spacing!r}.")
    return values
