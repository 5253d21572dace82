"""The evaluation options moe_missing adds to shared metrics: minimum lesion volume and the CScore Corr weight.

Run: .venv/bin/python -m pytest -q tests/test_moe_missing_metrics.py
"""

import numpy as np
import pytest

from shared.errors import InputError
from shared.lesion_metrics import lesion_counts, min_lesion_voxels
from shared.metrics import case_metrics, cscore


def lesions():
    """10^3 masks worked by hand.

    gt: A = 1 voxel, B = 3 voxels, C = 4 voxels. pred: P1 = 4 voxels over B, P2 = 1 voxel inside C,
    P3 = 5 voxels far from every gt lesion.
    """
    gt, pred = np.zeros((10, 10, 10), bool), np.zeros((10, 10, 10), bool)
    gt[0, 0, 0] = True  # A
    gt[2, 0, 0:3] = True  # B
    gt[5, 5, 5:9] = True  # C
    pred[2, 0, 0:4] = True  # P1 covers B and one voxel more
    pred[5, 5, 5] = True  # P2 inside C
    pred[9, 9, 0:5] = True  # P3
    return pred, gt


def test_min_lesion_voxels_follows_anima():
    assert min_lesion_voxels(0.0, (1, 1, 1)) == 1  # every lesion counts
    assert min_lesion_voxels(3.0, (1, 1, 1)) == 4  # 3 mm^3 is left out, 4 mm^3 counts
    assert min_lesion_voxels(3.0, (0.5, 1, 1)) == 7  # voxel 0.5 mm^3: 6 voxels = 3 mm^3 left out
    assert min_lesion_voxels(3.0, (2, 2, 2)) == 1  # one voxel is already 8 mm^3
    with pytest.raises(InputError, match="minimum lesion volume"):
        min_lesion_voxels(-1.0, (1, 1, 1))


def test_lesion_counts_without_and_with_a_minimum_volume():
    pred, gt = lesions()
    every = lesion_counts(pred, gt)
    # A missed, B hit by P1, C hit by P2; P3 is false
    assert (every.n_gt, every.n_pred, every.tp, every.fn, every.fp) == (3, 3, 2, 1, 1)
    big = lesion_counts(pred, gt, min_volume_mm3=3.0)
    # gt keeps C only, pred keeps P1 and P3 (P2 is 1 voxel): C is no longer hit, and P1 now overlaps only the
    # removed B, so it is false too (Anima matches the filtered masks)
    assert (big.n_gt, big.n_pred, big.tp, big.fn, big.fp) == (1, 2, 0, 1, 2)
    assert (big.ltpr, big.lfpr) == (0.0, 1.0)
    tiny_voxels = lesion_counts(pred, gt, min_volume_mm3=3.0, spacing=(0.5, 1, 1))  # 7 voxels needed: none left
    assert (tiny_voxels.n_gt, tiny_voxels.n_pred, tiny_voxels.ltpr, tiny_voxels.lfpr) == (0, 0, 1.0, 0.0)
    assert lesion_counts(pred, gt, min_volume_mm3=3.0, spacing=(2, 2, 2)) == every


def test_case_metrics_leaves_voxel_metrics_alone():
    pred, gt = lesions()
    every = case_metrics(pred, gt)
    big = case_metrics(pred, gt, min_lesion_volume_mm3=3.0)
    assert big["dice"] == every["dice"] == pytest.approx(2 * 4 / (10 + 8))  # overlap: 3 voxels of B, 1 of C
    assert big["ltpr"] == 0.0 and every["ltpr"] == pytest.approx(2 / 3)
    assert big["n_gt_lesions"] == 1 and big["n_pred_lesions"] == 2


def test_cscore_corr_weight_printed_or_carass():
    assert cscore(0.8, 0.6, 0.5, 0.25, 0.4) == pytest.approx(0.1 + 0.075 + 0.125 + 0.1875 + 0.1)
    assert cscore(0.8, 0.6, 0.5, 0.25, 0.4, corr_weight=1 / 8) == pytest.approx(0.1 + 0.075 + 0.125 + 0.1875 + 0.05)
    assert cscore(1.0, 1.0, 1.0, 0.0, 1.0, corr_weight=1 / 8) == pytest.approx(7 / 8)  # the printed weights
    with pytest.raises(InputError, match="corr_weight"):
        cscore(1.0, 1.0, 1.0, 0.0, 1.0, corr_weight=4)
