"""Segmentation metrics shared by the four methods: overlap, HD95, NSD, CScore, BraTS regions, MoME averaging.

Masks are numpy arrays, non-zero = foreground; `pred` and `gt` must have the same shape. Lesion-wise metrics
(connected components) live in `shared.lesion_metrics`; `case_metrics` gathers both for one case.

Empty masks never give NaN: each function states what it returns when pred and/or gt is empty, so that tables
of per-case numbers can always be averaged.
"""

import re
from collections import defaultdict

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree

from shared.errors import InputError
from shared.lesion_metrics import binary_pair, check_spacing, lesion_counts


def dice(pred, gt) -> float:
    """Dice similarity coefficient 2|P∩G| / (|P| + |G|).

    Args:
        pred, gt: binary masks of any shape (non-zero = foreground).

    Returns:
        Dice in [0, 1]; both empty -> 1.0, exactly one empty -> 0.0.
    """
    pred, gt = binary_pair(pred, gt)
    total = np.count_nonzero(pred) + np.count_nonzero(gt)
    if total == 0:
        return 1.0
    return 2.0 * np.count_nonzero(pred & gt) / total


def dice_per_class(pred_labels, gt_labels, classes) -> dict:
    """Dice of each label value: {c: dice(pred_labels == c, gt_labels == c) for c in classes}."""
    pred_labels, gt_labels = np.asarray(pred_labels), np.asarray(gt_labels)
    return {c: dice(pred_labels == c, gt_labels == c) for c in classes}


def ppv(pred, gt) -> float:
    """Positive predictive value (precision) |P∩G| / |P|; empty pred -> 1.0 if gt is empty too, else 0.0."""
    pred, gt = binary_pair(pred, gt)
    n_pred = np.count_nonzero(pred)
    if n_pred == 0:
        return float(not gt.any())
    return np.count_nonzero(pred & gt) / n_pred


def sensitivity(pred, gt) -> float:
    """Sensitivity (recall, voxel TPR) |P∩G| / |G|; empty gt -> 1.0 if pred is empty too, else 0.0."""
    pred, gt = binary_pair(pred, gt)
    n_gt = np.count_nonzero(gt)
    if n_gt == 0:
        return float(not pred.any())
    return np.count_nonzero(pred & gt) / n_gt


def surface_voxels(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with at least one face neighbour in the background (mask minus its 6-neighbour erosion).

    Voxels on the array border count as surface: outside the array is background.
    """
    return mask & ~ndimage.binary_erosion(mask, structure=ndimage.generate_binary_structure(mask.ndim, 1))


def hd95(pred, gt, spacing=(1.0, 1.0, 1.0)) -> float:
    """95th percentile symmetric Hausdorff distance between the surfaces of pred and gt, in mm.

    Surfaces are the voxels removed by a 6-neighbour erosion. For each surface voxel of one mask, the distance to
    the nearest surface voxel of the other (voxel centres, scaled by `spacing`) gives two directed distance sets;
    the result is the larger of their two 95th percentiles (linear interpolation), as MONAI's
    `compute_hausdorff_distance(percentile=95)` does (not the percentile of the pooled set).

    Args:
        pred, gt: (X, Y, Z) binary masks, same shape.
        spacing: voxel size in mm along each axis.

    Returns:
        HD95 in mm. Both empty -> 0.0. Exactly one empty -> the diagonal of the volume, |shape * spacing|, a
        finite stand-in for "infinitely far" that is larger than any distance between two voxels of the volume.
    """
    pred, gt = binary_pair(pred, gt)
    spacing = check_spacing(spacing, ndim=pred.ndim)
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return 0.0
    if not (has_pred and has_gt):
        return float(np.linalg.norm(np.array(pred.shape) * np.array(spacing)))
    # erosion only needs the bounding box of both masks plus one background voxel on each side
    box = _bounding_box(pred | gt, margin=1)
    scale = np.array(spacing)
    pred_points = np.argwhere(surface_voxels(pred[box])) * scale  # (N_pred, 3) in mm
    gt_points = np.argwhere(surface_voxels(gt[box])) * scale  # (N_gt, 3) in mm
    # surfaces are sparse, so nearest-neighbour search beats a dense distance transform of the whole volume
    pred_to_gt = cKDTree(gt_points).query(pred_points, k=1)[0]
    gt_to_pred = cKDTree(pred_points).query(gt_points, k=1)[0]
    return float(max(np.percentile(pred_to_gt, 95), np.percentile(gt_to_pred, 95)))


def normalized_surface_dice(pred, gt, spacing=(1.0, 1.0, 1.0), tolerance: float = 1.0) -> float:
    """Normalised surface Dice (NSD, Nikolov et al. 2021): the share of both surfaces lying within `tolerance` mm
    of the other surface,

        NSD = (|{p in S_P : d(p, S_G) <= tol}| + |{g in S_G : d(g, S_P) <= tol}|) / (|S_P| + |S_G|),

    with S the surface voxels of `surface_voxels` (6-neighbour border, volume edge = background) and d the
    Euclidean distance between voxel centres scaled by `spacing`. Every surface voxel weighs 1, as MONAI's
    `compute_surface_dice` (default `use_subvoxels=False`); DeepMind's `surface-distance` package, which
    SAM-Med3D's MedIM evaluation calls at 1 mm, weighs each surface element by its area instead, so the two
    agree closely but not exactly.

    Args:
        pred, gt: (X, Y, Z) binary masks, same shape.
        spacing: voxel size in mm along each axis.
        tolerance: largest distance (mm) that still counts as agreement (SAM-Med3D: 1 mm); >= 0.

    Returns:
        NSD in [0, 1]. Both empty -> 1.0; exactly one empty -> 0.0 (MONAI and MedIM give NaN for both empty).
    """
    pred, gt = binary_pair(pred, gt)
    spacing = check_spacing(spacing, ndim=pred.ndim)
    if not np.isfinite(tolerance) or tolerance < 0:
        raise InputError(f"tolerance must be a finite distance >= 0 mm, got {tolerance}.")
    has_pred, has_gt = bool(pred.any()), bool(gt.any())
    if not has_pred and not has_gt:
        return 1.0
    if not (has_pred and has_gt):
        return 0.0
    # both surfaces lie inside this box, so distances to the nearest surface voxel are exact within it
    box = _bounding_box(pred | gt, margin=1)
    pred_surface, gt_surface = surface_voxels(pred[box]), surface_voxels(gt[box])
    to_gt = ndimage.distance_transform_edt(~gt_surface, sampling=spacing)  # mm to the nearest gt surface voxel
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=spacing)
    agree = np.count_nonzero(to_gt[pred_surface] <= tolerance) + np.count_nonzero(to_pred[gt_surface] <= tolerance)
    return float(agree / (np.count_nonzero(pred_surface) + np.count_nonzero(gt_surface)))


def _bounding_box(mask: np.ndarray, margin: int) -> tuple:
    """Slices of the smallest box holding all foreground voxels, grown by `margin` and clipped to the array."""
    box = []
    for axis in range(mask.ndim):
        other_axes = tuple(a for a in range(mask.ndim) if a != axis)
        hits = np.flatnonzero(mask.any(axis=other_axes))
        box.append(slice(max(hits[0] - margin, 0), min(hits[-1] + 1 + margin, mask.shape[axis])))
    return tuple(box)


def volume_correlation(pred_volumes, gt_volumes) -> float:
    """Pearson correlation of predicted vs reference lesion volumes across subjects (the Corr of the CScore).

    Args:
        pred_volumes, gt_volumes: one volume per subject, same length.

    Returns:
        Pearson r in [-1, 1]; fewer than 2 subjects, or no variance in either list -> 0.0 (undefined, and 0.0
        means "no linear relation" rather than a NaN in the table).
    """
    x = np.asarray(pred_volumes, dtype=np.float64).ravel()
    y = np.asarray(gt_volumes, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise InputError(f"pred_volumes has {x.size} values but gt_volumes has {y.size}.")
    if x.size < 2:
        return 0.0
    x, y = x - x.mean(), y - y.mean()
    norm = np.sqrt(np.dot(x, x) * np.dot(y, y))
    if norm == 0:
        return 0.0
    return float(np.clip(np.dot(x, y) / norm, -1.0, 1.0))


def cscore(dsc, ppv, ltpr, lfpr, corr, corr_weight: float = 1 / 4):
    """ISBI 2015 MS challenge score: DSC/8 + PPV/8 + LTPR/4 + (1 - LFPR)/4 + Corr/4 (Carass et al. 2017).

    Corr is the volume correlation across subjects (`volume_correlation`), the same for every case. The
    moe_missing paper prints Corr/8, but weights must sum to 1 for its tables to hold and public ports use /4,
    so DESIGN.md fixes Corr/4; `corr_weight=1/8` gives the printed formula. Accepts floats or numpy arrays
    (element-wise).
    """
    if corr_weight not in (1 / 4, 1 / 8):
        raise InputError(f"corr_weight must be 1/4 (Carass et al.) or 1/8 (as printed), got {corr_weight!r}.")
    return dsc / 8 + ppv / 8 + ltpr / 4 + (1 - lfpr) / 4 + corr * corr_weight


def brats_regions(label, necrosis: int = 1, edema: int = 2, enhancing: int = 3) -> dict:
    """BraTS evaluation regions from a label map.

    The label values differ between distributions, and no default fits them all: the BraTS 2021 files use
    necrosis=1, edema=2, enhancing=4; nnU-Net's conversion of them (Dataset137_BraTS2021, and the MSD Task01
    brain tumours) uses edema=1, necrosis=2, enhancing=3. The defaults (1, 2, 3) are the order of the demo
    phantoms only. Derive the values from the dataset.json label names with `brats_labels_from_names`.

    Args:
        label: integer label map of any shape.
        necrosis, edema, enhancing: label values of the necrotic / non-enhancing core, the edema and the
            enhancing tumour.

    Returns:
        {"TC": necrosis|enhancing, "WT": necrosis|edema|enhancing, "ET": enhancing} boolean masks.
    """
    label = np.asarray(label)
    return {
        "TC": np.isin(label, (necrosis, enhancing)),
        "WT": np.isin(label, (necrosis, edema, enhancing)),
        "ET": label == enhancing,
    }


def _brats_name_kind(name: str) -> str | None:
    """What a dataset.json label name denotes: a tumour class, a BraTS region, or None (background, other)."""
    words = " " + re.sub(r"[^a-z0-9]+", " ", str(name).lower()).strip() + " "
    if any(key in words for key in (" whole tumo", " wt ")):
        return "WT"
    if any(key in words for key in (" tumor core ", " tumour core ", " tc ")):
        return "TC"
    # "non-enhancing" contains "enhancing": test the necrotic core first
    if any(key in words for key in ("non enhanc", "nonenhanc", "necro", " ncr ", " net ")):
        return "necrosis"
    if "enhanc" in words or " et " in words:
        return "enhancing"
    if any(key in words for key in ("edema", "oedema", " ed ")):
        return "edema"
    return None


def brats_labels_from_names(labels: dict) -> tuple[tuple[int, int, int] | None, str]:
    """(necrosis, edema, enhancing) label values from the `labels` of a dataset.json, or None and why not.

    Two layouts are understood:
    - one name per tumour class, e.g. {"edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3} (nnU-Net's
      MSD Task01) or {"necrosis": 1, "edema": 2, "enhancing": 3}. Spellings: edema/oedema/ED; necrosis/necrotic/
      non-enhancing/NCR/NET; enhancing/ET.
    - nnU-Net region labels, e.g. {"whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}
      (Dataset137_BraTS2021): enhancing = ET, necrosis = TC minus ET, edema = WT minus TC.

    Returns:
        ((necrosis, edema, enhancing), "") when the names determine three distinct positive values, else
        (None, a clause saying what is missing or ambiguous), for the caller's one-sentence refusal.
    """
    found: dict = {}
    for name, value in labels.items():
        kind = _brats_name_kind(name)
        if kind is None:
            continue
        values = tuple(sorted({int(v) for v in value})) if isinstance(value, (list, tuple)) else (int(value),)
        if kind == "enhancing" and len(values) > 1:
            return None, f"label {name!r} = {list(values)} is a region of several values, expected one"
        if kind in found and found[kind] != values:
            return None, f"two labels name the {kind} ({list(found[kind])} and {list(values)})"
        found[kind] = values
    single = {k: v[0] for k, v in found.items() if k in ("necrosis", "edema", "enhancing") and len(v) == 1}
    if "enhancing" not in single and "ET" in found and len(found["ET"]) == 1:
        single["enhancing"] = found["ET"][0]
    if "necrosis" not in single and "TC" in found and "enhancing" in single:
        rest = sorted(set(found["TC"]) - {single["enhancing"]})
        if len(rest) == 1:
            single["necrosis"] = rest[0]
    if "edema" not in single and "WT" in found and "TC" in found:
        rest = sorted(set(found["WT"]) - set(found["TC"]))
        if len(rest) == 1:
            single["edema"] = rest[0]
    missing = [k for k in ("necrosis", "edema", "enhancing") if k not in single]
    if missing:
        return None, f"no label names the {' and the '.join(missing)} (labels: {dict(labels)})"
    values = (single["necrosis"], single["edema"], single["enhancing"])
    if len(set(values)) != 3 or min(values) < 1:
        return None, f"the names give necrosis, edema, enhancing = {values}, not three distinct positive values"
    return values, ""


def aggregate_levels(rows, value: str = "dice") -> dict:
    """MoME Table 1 averaging levels of a per-image metric.

    MoME (Zhang et al. 2024, Sec. 3.3) averages "across 1,230 test images (image-level)", "across the 14 seen
    tasks (task-level)" and "across 6 seen datasets (dataset-level)", a task being one modality of one dataset.
    Here: image = mean over all rows; task = mean over (dataset, modality) groups of each group's mean; dataset =
    mean over datasets of each dataset's mean over its rows. Within a MoME dataset every case has all modalities,
    so a dataset's row mean equals the mean of its task means, and the Supple. Table I task scores reproduce Table
    1's three rows both ways; with missing images the row mean weights tasks by their number of images.

    Args:
        rows: iterable of dicts with keys "dataset", "modality" and `value` (other keys, e.g. "case", ignored).
        value: key of the metric to average.

    Returns:
        {"image": float, "task": float, "dataset": float, "n_images": int, "n_tasks": int, "n_datasets": int}.
    """
    rows = list(rows)
    if not rows:
        raise InputError("rows is empty: nothing to average.")
    by_task, by_dataset, all_values = defaultdict(list), defaultdict(list), []
    for i, row in enumerate(rows):
        for key in ("dataset", "modality", value):
            if key not in row:
                raise InputError(f"row {i} has no {key!r} key.")
        x = float(row[value])
        by_task[(row["dataset"], row["modality"])].append(x)
        by_dataset[row["dataset"]].append(x)
        all_values.append(x)
    return {
        "image": float(np.mean(all_values)),
        "task": float(np.mean([np.mean(v) for v in by_task.values()])),
        "dataset": float(np.mean([np.mean(v) for v in by_dataset.values()])),
        "n_images": len(all_values),
        "n_tasks": len(by_task),
        "n_datasets": len(by_dataset),
    }


def case_metrics(pred, gt, spacing=(1.0, 1.0, 1.0), connectivity: int = 26, min_lesion_volume_mm3: float = 0.0) -> dict:
    """All per-case numbers of one binary lesion mask, with the empty-mask conventions of each metric.

    Args:
        pred, gt: (X, Y, Z) binary masks (non-zero = lesion), same shape.
        spacing: voxel size in mm along each axis.
        connectivity: 6, 18 or 26 neighbours for the lesion-wise metrics.
        min_lesion_volume_mm3: lesions of at most this volume are left out of the lesion-wise numbers (ltpr, lfpr,
            lesion_f1, the lesion counts), not of the voxel-wise ones (`shared.lesion_metrics.lesion_counts`).

    Returns:
        dict of floats/ints: dice, hd95 (mm), ppv, sensitivity, ltpr, lfpr, lesion_f1, lesion_tp, lesion_fn,
        lesion_fp, n_gt_lesions, n_pred_lesions, lesion_count_diff, volume_{gt,pred,diff}_vox and
        volume_{gt,pred,diff}_mm3 (diff = |pred - gt|).
    """
    pred, gt = binary_pair(pred, gt)
    spacing = check_spacing(spacing, ndim=pred.ndim)
    voxel_mm3 = float(np.prod(spacing))
    counts = lesion_counts(pred, gt, connectivity=connectivity, min_volume_mm3=min_lesion_volume_mm3, spacing=spacing)
    volume_gt, volume_pred = int(np.count_nonzero(gt)), int(np.count_nonzero(pred))
    return {
        "dice": dice(pred, gt),
        "hd95": hd95(pred, gt, spacing=spacing),
        "ppv": ppv(pred, gt),
        "sensitivity": sensitivity(pred, gt),
        "ltpr": counts.ltpr,
        "lfpr": counts.lfpr,
        "lesion_f1": counts.f1,
        "lesion_tp": counts.tp,
        "lesion_fn": counts.fn,
        "lesion_fp": counts.fp,
        "n_gt_lesions": counts.n_gt,
        "n_pred_lesions": counts.n_pred,
        "lesion_count_diff": counts.count_difference,
        "volume_gt_vox": volume_gt,
        "volume_pred_vox": volume_pred,
        "volume_diff_vox": abs(volume_pred - volume_gt),
        "volume_gt_mm3": volume_gt * voxel_mm3,
        "volume_pred_mm3": volume_pred * voxel_mm3,
        "volume_diff_mm3": abs(volume_pred - volume_gt) * voxel_mm3,
    }
