"""The numbers SAM-Med3D-MoE reports beside Dice: normalised surface Dice (shared.metrics) against a brute-force
implementation, by hand and against MONAI; the gate's routing table and the Table 1 split by hand.

Run: pytest tests/test_sam_med3d_moe_metrics.py
"""

import itertools

import numpy as np
import pytest
import torch

from sam_med3d_moe.reports import routed_expert, routing_rows, table1_rows
from sam_med3d_moe.tasks import ExpertTask
from shared.errors import InputError
from shared.metrics import normalized_surface_dice


def _naive_surface(mask: np.ndarray) -> list:
    """Foreground voxels with a face neighbour that is background or outside the array."""
    out = []
    for idx in zip(*np.nonzero(mask)):
        for axis, step in itertools.product(range(3), (-1, 1)):
            n = list(idx)
            n[axis] += step
            if not 0 <= n[axis] < mask.shape[axis] or not mask[tuple(n)]:
                out.append(np.array(idx))
                break
    return out


def _naive_nsd(pred, gt, spacing, tolerance) -> float:
    s_p, s_g = _naive_surface(pred), _naive_surface(gt)
    scale = np.asarray(spacing)

    def within(points, others):
        return sum(min(np.sqrt((((p - q) * scale) ** 2).sum()) for q in others) <= tolerance for p in points)

    return (within(s_p, s_g) + within(s_g, s_p)) / (len(s_p) + len(s_g))


def test_nsd_by_hand():
    # two 1 x 3 x 3 plates one voxel apart: every surface voxel has its partner at exactly 1 mm
    pred, gt = np.zeros((5, 5, 5), bool), np.zeros((5, 5, 5), bool)
    pred[1, 1:4, 1:4], gt[2, 1:4, 1:4] = True, True
    assert normalized_surface_dice(pred, gt, tolerance=1.0) == 1.0
    assert normalized_surface_dice(pred, gt, tolerance=0.99) == 0.0
    # 2 mm apart along the first axis: spacing 0.5 there brings them within 1 mm
    gt2 = np.zeros((5, 5, 5), bool)
    gt2[3, 1:4, 1:4] = True
    assert normalized_surface_dice(pred, gt2, tolerance=1.0) == 0.0
    assert normalized_surface_dice(pred, gt2, spacing=(0.5, 1, 1), tolerance=1.0) == 1.0
    # a 3^3 cube (26 surface voxels) against the same cube plus one voxel on a face, which turns the face centre
    # below it into an interior voxel (26 surface voxels again): within 1 mm everything agrees; at tolerance 0
    # the added voxel and the former face centre find no partner -> (52 - 2) / 52
    cube = np.zeros((7, 7, 7), bool)
    cube[2:5, 2:5, 2:5] = True
    bump = cube.copy()
    bump[5, 3, 3] = True
    assert normalized_surface_dice(bump, cube, tolerance=1.0) == 1.0
    assert normalized_surface_dice(bump, cube, tolerance=0.0) == pytest.approx(50 / 52)


def test_nsd_matches_a_brute_force_implementation():
    rng = np.random.default_rng(0)
    for trial in range(8):
        shape = tuple(rng.integers(4, 8, size=3))
        pred = rng.random(shape) < 0.35
        gt = rng.random(shape) < 0.35
        spacing = (1.0, 1.0, 1.0) if trial % 2 else tuple(rng.uniform(0.6, 2.0, size=3))
        for tolerance in (0.0, 1.0, 1.7, 3.0):
            want = _naive_nsd(pred, gt, spacing, tolerance)
            assert normalized_surface_dice(pred, gt, spacing=spacing, tolerance=tolerance) == pytest.approx(want)


def test_nsd_empty_masks_and_bad_tolerance():
    empty, one = np.zeros((4, 4, 4), bool), np.zeros((4, 4, 4), bool)
    one[1, 1, 1] = True
    assert normalized_surface_dice(empty, empty) == 1.0
    assert normalized_surface_dice(one, empty) == 0.0 and normalized_surface_dice(empty, one) == 0.0
    with pytest.raises(InputError, match="tolerance"):
        normalized_surface_dice(one, one, tolerance=-1)


def test_nsd_equals_monai_compute_surface_dice():
    metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(3)
    for _ in range(4):
        pred, gt = rng.random((9, 8, 7)) < 0.4, rng.random((9, 8, 7)) < 0.4
        spacing = tuple(rng.uniform(0.7, 1.8, size=3))

        def onehot(m):
            return torch.from_numpy(np.stack([~m, m]))[None].float()  # (1, 2, X, Y, Z)

        ref = metrics.compute_surface_dice(onehot(pred), onehot(gt), class_thresholds=[1.0], spacing=spacing)
        got = normalized_surface_dice(pred, gt, spacing=spacing, tolerance=1.0)
        assert got == pytest.approx(ref.item(), abs=1e-6)


def test_routing_follows_the_selector_threshold_by_hand():
    scores = np.array([[0.2, 0.7, 0.1], [0.6, 0.3, 0.1], [0.1, 0.45, 0.45], [0.0, 0.2, 0.8]])
    dest, s_top = routed_expert(scores, tau=0.5)
    assert dest.tolist() == [1, 0, 0, 2] and np.allclose(s_top, [0.7, 0.3, 0.45, 0.8])  # s_top = tau: general
    assert routed_expert(scores, tau=0.5, mode="general")[0].tolist() == [0, 0, 0, 0]  # M_g only: nothing sent


def test_routing_rows_by_hand():
    tasks = [ExpertTask(datasets=("Tumour",)), ExpertTask(datasets=("Anatomy",), labels=(3,))]
    records = [  # two lesion targets (3 click prompts, 2 boxes), one anatomy label-3 target, one label-1 target
        {"dataset": "Tumour", "label": None, "prompt": "click", "scores": [[0.1, 0.8, 0.1], [0.1, 0.6, 0.3]]},
        {"dataset": "Tumour", "label": None, "prompt": "box", "scores": [[0.1, 0.2, 0.7]]},
        {"dataset": "Tumour", "label": None, "prompt": "click", "scores": [[0.5, 0.4, 0.1]]},
        {"dataset": "Tumour", "label": None, "prompt": "box", "scores": [[0.9, 0.05, 0.05]]},
        {"dataset": "Anatomy", "label": 3, "prompt": "click", "scores": [[0.1, 0.1, 0.8], [0.05, 0.9, 0.05]]},
        {"dataset": "Anatomy", "label": 1, "prompt": "click", "scores": [[0.9, 0.05, 0.05]]},
    ]
    table = routing_rows(records, tasks, ["lesion", "weak"], tau=0.5)
    assert [(r["dataset"], r["label"], r["prompt"]) for r in table] == [
        ("Anatomy", "1", "click"), ("Anatomy", "3", "click"), ("Tumour", "union", "click"), ("Tumour", "union", "box")
    ]  # fmt: skip
    rows = {(r["dataset"], r["label"], r["prompt"]): r for r in table}
    box = rows[("Tumour", "union", "box")]  # clicks and boxes counted apart
    assert box["prompts"] == 2 and box["share_weak"] == 0.5 and box["share_general"] == 0.5 and box["accuracy"] == 0
    lesion = rows[("Tumour", "union", "click")]
    assert lesion["prompts"] == 3 and lesion["expected"] == "lesion"
    assert lesion["share_lesion"] == pytest.approx(2 / 3, abs=1e-4) and lesion["share_general"] == pytest.approx(
        1 / 3, abs=1e-4
    )
    assert lesion["mean_s_top"] == pytest.approx((0.8 + 0.6 + 0.4) / 3, abs=1e-4)
    assert lesion["accuracy"] == pytest.approx(2 / 3, abs=1e-4)
    weak = rows[("Anatomy", "3", "click")]
    assert (
        weak["expected"] == "weak"
        and weak["share_weak"] == 0.5
        and weak["share_lesion"] == 0.5
        and weak["accuracy"] == 0.5
    )
    other = rows[("Anatomy", "1", "click")]
    assert other["expected"] == "general" and other["accuracy"] == 1.0 and other["mean_s_top"] == 0.05
    general = routing_rows(records, tasks, ["lesion", "weak"], tau=0.5, mode="general")
    assert all(r["share_general"] == 1 and r["share_lesion"] == 0 and r["share_weak"] == 0 for r in general)


def test_table1_split_into_fine_tuned_and_other_classes():
    tasks = [ExpertTask(datasets=("Anatomy",), labels=(3,))]
    rows = [
        {"dataset": "Anatomy", "label": "3", "dice": 0.5},
        {"dataset": "Anatomy", "label": "3", "dice": 0.7},
        {"dataset": "Anatomy", "label": "1", "dice": 0.9},
        {"dataset": "Anatomy", "label": "1", "dice": 0.3},
        {"dataset": "Tumour", "label": "union", "dice": 0.1},
    ]
    out = table1_rows(rows, tasks, ["dice"])
    assert out == [  # other: over targets (0.9 + 0.3 + 0.1) / 3, over classes ((0.9 + 0.3) / 2 + 0.1) / 2
        {"classes": "fine-tuned", "targets": 2, "class_count": 1, "dice": 0.6, "class_mean_dice": 0.6},
        {"classes": "other", "targets": 3, "class_count": 2, "dice": 0.4333, "class_mean_dice": 0.35},
    ]
