"""Metrics vs hand-worked values and naive implementations; run: pytest -q tests/test_shared_metrics.py"""

import itertools

import numpy as np
import pytest
from scipy import ndimage

from shared.errors import InputError
from shared.lesion_metrics import (
    label_lesions,
    lesion_count_difference,
    lesion_counts,
    lesion_f1,
    lfpr,
    ltpr,
    volume_difference,
)
from shared.metrics import (
    aggregate_levels,
    brats_regions,
    case_metrics,
    cscore,
    dice,
    dice_per_class,
    hd95,
    ppv,
    sensitivity,
    volume_correlation,
)


def mask_from(voxels, shape=(5, 5, 5)) -> np.ndarray:
    """Binary mask with the listed (x, y, z) voxels set."""
    mask = np.zeros(shape, dtype=bool)
    for voxel in voxels:
        mask[voxel] = True
    return mask


# 5x5x5 example used by several tests, worked out by hand:
# gt lesions: a = {(0,0,0), (0,0,1)}, b = {(2,2,2)}, c = {(4,4,4)}        -> 4 voxels, 3 lesions
# pred lesions: p1 = {(0,0,1), (0,1,1)} hits a, p2 = {(2,2,2)} hits b,
#               p3 = {(4,0,0)} and p4 = {(0,4,4)} hit nothing             -> 5 voxels, 4 lesions
# overlap voxels: (0,0,1), (2,2,2) -> 2
GT = mask_from([(0, 0, 0), (0, 0, 1), (2, 2, 2), (4, 4, 4)])
PRED = mask_from([(0, 0, 1), (0, 1, 1), (2, 2, 2), (4, 0, 0), (0, 4, 4)])
EMPTY = np.zeros((5, 5, 5), dtype=bool)


def test_voxel_overlap_metrics_by_hand():
    assert dice(PRED, GT) == pytest.approx(2 * 2 / (5 + 4))
    assert ppv(PRED, GT) == pytest.approx(2 / 5)
    assert sensitivity(PRED, GT) == pytest.approx(2 / 4)


def test_voxel_overlap_metrics_empty_conventions():
    assert dice(EMPTY, EMPTY) == 1.0
    assert dice(PRED, EMPTY) == 0.0 and dice(EMPTY, GT) == 0.0
    assert ppv(EMPTY, EMPTY) == 1.0 and ppv(EMPTY, GT) == 0.0 and ppv(PRED, EMPTY) == 0.0
    assert sensitivity(EMPTY, EMPTY) == 1.0 and sensitivity(PRED, EMPTY) == 0.0 and sensitivity(EMPTY, GT) == 0.0


def test_dice_per_class_by_hand():
    gt = np.array([0, 1, 1, 2, 2, 2]).reshape(1, 2, 3)
    pred = np.array([1, 1, 0, 2, 2, 0]).reshape(1, 2, 3)
    # class 1: pred {0,1}, gt {1,2}, overlap {1} -> 2/4; class 2: pred {3,4}, gt {3,4,5} -> 4/5; class 3 absent -> 1
    assert dice_per_class(pred, gt, classes=[1, 2, 3]) == pytest.approx({1: 0.5, 2: 0.8, 3: 1.0})


def test_shape_mismatch_is_refused():
    with pytest.raises(InputError, match="shape"):
        dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))


def naive_surface(mask: np.ndarray) -> np.ndarray:
    """Foreground voxels with a face neighbour outside the array or in the background, by looping."""
    surface = np.zeros_like(mask)
    steps = [(1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)]
    for x, y, z in zip(*np.nonzero(mask)):
        for dx, dy, dz in steps:
            n = (x + dx, y + dy, z + dz)
            if not all(0 <= n[i] < mask.shape[i] for i in range(3)) or not mask[n]:
                surface[x, y, z] = True
    return surface


def naive_hd95(pred, gt, spacing) -> float:
    """All pairwise distances between surface voxels; max of the two directed 95th percentiles."""
    a = np.argwhere(naive_surface(pred)) * np.array(spacing)
    b = np.argwhere(naive_surface(gt)) * np.array(spacing)
    pairwise = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))  # (N_a, N_b)
    return max(np.percentile(pairwise.min(axis=1), 95), np.percentile(pairwise.min(axis=0), 95))


def test_hd95_by_hand():
    one = mask_from([(2, 2, 2)])
    other = mask_from([(2, 2, 4)])
    assert hd95(one, other, spacing=(1.0, 1.0, 2.0)) == pytest.approx(4.0)
    assert hd95(GT, GT, spacing=(1.0, 1.0, 2.0)) == 0.0


def test_hd95_empty_conventions():
    assert hd95(EMPTY, EMPTY) == 0.0
    diagonal = np.sqrt(5**2 + 5**2 + 10**2)  # 5x5x5 voxels of 1x1x2 mm
    assert hd95(PRED, EMPTY, spacing=(1, 1, 2)) == pytest.approx(diagonal)
    assert hd95(EMPTY, GT, spacing=(1, 1, 2)) == pytest.approx(diagonal)


@pytest.mark.parametrize("seed", range(6))
def test_hd95_matches_brute_force_on_random_masks(seed):
    # smoothed noise gives blobs with interior voxels, some cut by the array border, so the surface rule matters
    rng = np.random.default_rng(seed)
    shape = (9, 10, 8)
    pred = ndimage.gaussian_filter(rng.random(shape), sigma=1.5) > 0.5
    gt = ndimage.gaussian_filter(rng.random(shape), sigma=1.5) > 0.5
    pred[0, 0, 0] = gt[8, 9, 7] = True  # never empty
    spacing = tuple(rng.uniform(0.5, 3.0, size=3))
    assert hd95(pred, gt, spacing=spacing) == pytest.approx(naive_hd95(pred, gt, spacing), rel=1e-9)


def test_hd95_is_max_of_directed_percentiles_not_pooled():
    # pred: one voxel at the origin; gt: a row of 20 voxels from x=0; gt->pred distances 0..19,
    # pred->gt distance 0: pooled 95th percentile over 21 values != max of the directed ones
    pred = mask_from([(0, 0, 0)], shape=(20, 3, 3))
    gt = mask_from([(x, 0, 0) for x in range(20)], shape=(20, 3, 3))
    directed = np.percentile(np.arange(20.0), 95)  # 18.05
    pooled = np.percentile(np.concatenate([np.arange(20.0), [0.0]]), 95)
    assert directed != pytest.approx(pooled)
    assert hd95(pred, gt) == pytest.approx(directed)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # MONAI's own deprecation notice, not ours
def test_hd95_matches_monai():
    torch = pytest.importorskip("torch")
    hausdorff = pytest.importorskip("monai.metrics").compute_hausdorff_distance
    rng = np.random.default_rng(7)
    pred, gt = rng.random((9, 10, 8)) < 0.2, rng.random((9, 10, 8)) < 0.2
    spacing = (0.8, 1.0, 2.5)
    expected = hausdorff(
        torch.from_numpy(pred)[None, None], torch.from_numpy(gt)[None, None], percentile=95, spacing=spacing
    ).item()
    assert hd95(pred, gt, spacing=spacing) == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(
    ("voxels", "expected"),
    [
        ([(1, 1, 1), (1, 2, 1)], {6: 1, 18: 1, 26: 1}),  # share a face
        ([(1, 1, 1), (1, 2, 2)], {6: 2, 18: 1, 26: 1}),  # share an edge
        ([(1, 1, 1), (2, 2, 2)], {6: 2, 18: 2, 26: 1}),  # share a corner
    ],
)
def test_connectivity_sets_what_touches(voxels, expected):
    for connectivity, n_lesions in expected.items():
        assert label_lesions(mask_from(voxels), connectivity=connectivity)[1] == n_lesions
        # pred = gt: every lesion is detected, none is false
        counts = lesion_counts(mask_from(voxels), mask_from(voxels), connectivity=connectivity)
        assert (counts.n_gt, counts.tp, counts.fp) == (n_lesions, n_lesions, 0)


@pytest.mark.parametrize("bad", [4, 8, 0, "26"])
def test_invalid_connectivity_names_the_argument(bad):
    with pytest.raises(InputError, match="connectivity"):
        lesion_counts(PRED, GT, connectivity=bad)


def test_lesion_counts_by_hand():
    counts = lesion_counts(PRED, GT)
    assert (counts.tp, counts.fn, counts.fp, counts.n_gt, counts.n_pred) == (2, 1, 2, 3, 4)
    assert ltpr(PRED, GT) == pytest.approx(2 / 3)
    assert lfpr(PRED, GT) == pytest.approx(2 / 4)
    assert lesion_f1(PRED, GT) == pytest.approx(2 / (2 + (2 + 1) / 2))
    assert lesion_count_difference(PRED, GT) == 1


def test_one_pred_lesion_bridging_two_gt_lesions():
    gt = mask_from([(0, 0, 0), (0, 0, 2)])
    pred = mask_from([(0, 0, 0), (0, 0, 1), (0, 0, 2)])
    counts = lesion_counts(pred, gt, connectivity=6)
    assert (counts.tp, counts.fn, counts.fp, counts.n_gt, counts.n_pred) == (2, 0, 0, 2, 1)
    assert counts.f1 == 1.0 and counts.count_difference == 1


def test_lesion_metrics_empty_conventions():
    both = lesion_counts(EMPTY, EMPTY)
    assert (both.ltpr, both.lfpr, both.f1, both.count_difference) == (1.0, 0.0, 1.0, 0)
    only_pred = lesion_counts(PRED, EMPTY)  # 4 pred lesions, no gt: all false
    assert (only_pred.ltpr, only_pred.lfpr, only_pred.f1, only_pred.count_difference) == (1.0, 1.0, 0.0, 4)
    only_gt = lesion_counts(EMPTY, GT)  # 3 gt lesions all missed
    assert (only_gt.ltpr, only_gt.lfpr, only_gt.f1, only_gt.count_difference) == (0.0, 0.0, 0.0, 3)


def test_volume_difference_by_hand():
    assert volume_difference(PRED, GT, spacing=(1.0, 1.0, 2.0)) == (1, pytest.approx(2.0))
    with pytest.raises(InputError, match="spacing"):
        volume_difference(PRED, GT, spacing=(1.0, 0.0, 1.0))


def test_volume_correlation_by_hand():
    # x = [1, 2, 3], y = [2, 4, 7]: sum dx*dy = 5, sum dx^2 = 2, sum dy^2 = 114/9
    assert volume_correlation([1, 2, 3], [2, 4, 7]) == pytest.approx(5 / np.sqrt(2 * 114 / 9))
    assert volume_correlation([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)
    assert volume_correlation([5.0], [4.0]) == 0.0
    assert volume_correlation([], []) == 0.0
    assert volume_correlation([1, 2, 3], [4, 4, 4]) == 0.0
    with pytest.raises(InputError, match="gt_volumes"):
        volume_correlation([1, 2], [1, 2, 3])


def test_cscore_by_hand():
    assert cscore(0.8, 0.6, 0.5, 0.25, 0.4) == pytest.approx(0.1 + 0.075 + 0.125 + 0.1875 + 0.1)
    assert cscore(1.0, 1.0, 1.0, 0.0, 1.0) == pytest.approx(1.0)  # weights sum to 1 (Corr/4)


def test_brats_regions():
    label = np.array([0, 1, 2, 3, 4]).reshape(1, 1, 5)
    regions = brats_regions(label)
    assert regions["TC"].ravel().tolist() == [False, True, False, True, False]
    assert regions["WT"].ravel().tolist() == [False, True, True, True, False]
    assert regions["ET"].ravel().tolist() == [False, False, False, True, False]
    brats2021 = brats_regions(label, enhancing=4)
    assert brats2021["TC"].ravel().tolist() == [False, True, False, False, True]
    assert brats2021["WT"].ravel().tolist() == [False, True, True, False, True]
    assert brats2021["ET"].ravel().tolist() == [False, False, False, False, True]


def test_aggregate_levels_by_hand():
    rows = [
        {"dataset": "A", "modality": "T1", "case": "a1", "dice": 1.0},
        {"dataset": "A", "modality": "T1", "case": "a2", "dice": 0.0},
        {"dataset": "A", "modality": "T2", "case": "a1", "dice": 1.0},
        {"dataset": "B", "modality": "T1", "case": "b1", "dice": 0.5},
    ]
    levels = aggregate_levels(rows)
    assert levels["image"] == pytest.approx(2.5 / 4)
    assert levels["task"] == pytest.approx((0.5 + 1.0 + 0.5) / 3)
    assert levels["dataset"] == pytest.approx((2 / 3 + 0.5) / 2)
    assert (levels["n_images"], levels["n_tasks"], levels["n_datasets"]) == (4, 3, 2)
    with pytest.raises(InputError, match="'dice'"):
        aggregate_levels([{"dataset": "A", "modality": "T1"}])
    with pytest.raises(InputError, match="empty"):
        aggregate_levels([])


def test_aggregate_levels_reproduces_mome_table1():
    # MoME Supple. Table I (MoME column, Dice per task) and Supple. Table II (test images per dataset, shared
    # equally by the dataset's modalities); Table 1 prints image 0.8204, task 0.7026, dataset 0.6938
    tasks = {
        "BraTS2021": {"T1": 0.8510, "T2": 0.8995, "T1ce": 0.8856, "FLAIR": 0.9220},
        "ATLAS2.0": {"T1": 0.6203},
        "WMH2017": {"FLAIR": 0.6909, "T1": 0.5773},
        "OASIS": {"T1": 0.5937, "FLAIR": 0.7737},
        "ISLES2022": {"DWI": 0.7723},
        "MSSEG": {"T1": 0.5044, "T2": 0.5384, "T1ce": 0.5099, "FLAIR": 0.6979},
    }
    test_images = {"BraTS2021": 836, "ATLAS2.0": 110, "WMH2017": 60, "OASIS": 100, "ISLES2022": 100, "MSSEG": 24}
    rows = []
    for dataset, scores in tasks.items():
        per_task = test_images[dataset] // len(scores)
        for (modality, score), case in itertools.product(scores.items(), range(per_task)):
            rows.append({"dataset": dataset, "modality": modality, "case": case, "dice": score})
    levels = aggregate_levels(rows)
    assert levels["n_images"] == 1230 and levels["n_tasks"] == 14 and levels["n_datasets"] == 6
    # table entries are rounded task means, hence the tolerance of 2e-4
    assert levels["image"] == pytest.approx(0.8204, abs=2e-4)
    assert levels["task"] == pytest.approx(0.7026, abs=1e-4)
    assert levels["dataset"] == pytest.approx(0.6938, abs=1e-4)


def test_case_metrics_by_hand():
    metrics = case_metrics(PRED, GT, spacing=(1.0, 1.0, 2.0), connectivity=26)
    expected = {
        "dice": 4 / 9,
        "ppv": 2 / 5,
        "sensitivity": 2 / 4,
        "ltpr": 2 / 3,
        "lfpr": 0.5,
        "lesion_f1": 2 / 3.5,
        "lesion_tp": 2,
        "lesion_fn": 1,
        "lesion_fp": 2,
        "n_gt_lesions": 3,
        "n_pred_lesions": 4,
        "lesion_count_diff": 1,
        "volume_gt_vox": 4,
        "volume_pred_vox": 5,
        "volume_diff_vox": 1,
        "volume_gt_mm3": 8.0,
        "volume_pred_mm3": 10.0,
        "volume_diff_mm3": 2.0,
        "hd95": naive_hd95(PRED, GT, (1.0, 1.0, 2.0)),
    }
    assert metrics == pytest.approx(expected)
    assert all(np.isfinite(v) for v in case_metrics(EMPTY, GT).values())
    assert all(np.isfinite(v) for v in case_metrics(PRED, EMPTY).values())
