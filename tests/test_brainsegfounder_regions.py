"""BraTS regions from dataset.json label names (shared.metrics.brats_labels_from_names) and their use in scoring.

Run: .venv/bin/python -m pytest -q tests/test_brainsegfounder_regions.py
"""

import numpy as np
import pytest

from shared.metrics import brats_labels_from_names, brats_regions

NNUNET_MSD = {"background": 0, "edema": 1, "non-enhancing tumor": 2, "enhancing tumour": 3}
NNUNET_137 = {"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [3]}


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        (NNUNET_MSD, (2, 1, 3)),
        (NNUNET_137, (2, 1, 3)),
        ({"background": 0, "necrosis": 1, "edema": 2, "enhancing": 3}, (1, 2, 3)),  # the demo phantoms
        ({"background": 0, "NCR/NET": 1, "ED": 2, "ET": 4}, (1, 2, 4)),  # BraTS 2021 abbreviations
        ({"background": 0, "peritumoral_oedema": 2, "GD-enhancing tumour": 4, "necrotic core": 1}, (1, 2, 4)),
        ({"background": 0, "non_enhancing_and_necrosis": 2, "edema": 1, "enhancing_tumor": 3}, (2, 1, 3)),
    ],
)
def test_values_from_names(labels, expected):
    assert brats_labels_from_names(labels) == (expected, "")


@pytest.mark.parametrize(
    ("labels", "reason"),
    [
        ({"background": 0, "lesion": 1}, "no label names the necrosis and the edema and the enhancing"),
        ({"background": 0, "edema": 1, "enhancing": 3}, "no label names the necrosis"),
        ({"background": 0, "necrosis": 1, "non-enhancing": 2, "edema": 3, "enhancing": 4}, "two labels name"),
        ({"background": 0, "necrosis": 1, "edema": 1, "enhancing": 3}, "not three distinct"),
        ({"background": 0, "whole tumor": [1, 2, 3], "tumor core": [2, 3], "enhancing tumor": [2, 3]}, "several"),
    ],
)
def test_undetermined_names_say_why(labels, reason):
    values, why = brats_labels_from_names(labels)
    assert values is None and reason in why


def test_nnunet_labels_read_with_the_old_default_give_a_wrong_tumour_core():
    # the example: a prediction equal to the reference minus its edema has a perfect tumour core
    reference = np.array([0, 1, 1, 1, 2, 2, 3, 3, 3, 3]).reshape(1, 2, 5)  # nnU-Net: 1 edema, 2 necrosis, 3 ET
    prediction = np.where(reference == 1, 0, reference)
    necrosis, edema, enhancing = brats_labels_from_names(NNUNET_137)[0]
    right = brats_regions(reference, necrosis=necrosis, edema=edema, enhancing=enhancing)
    right_pred = brats_regions(prediction, necrosis=necrosis, edema=edema, enhancing=enhancing)
    assert np.array_equal(right["TC"], right_pred["TC"]) and right["TC"].sum() == 6
    wrong, wrong_pred = brats_regions(reference), brats_regions(prediction)  # 1 read as necrosis
    assert not np.array_equal(wrong["TC"], wrong_pred["TC"])
