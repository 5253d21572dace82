"""Checks mean +- SE/std, the Wilcoxon signed-rank test (against an exact enumeration) and Holm's correction:
pytest -q tests/test_shared_stats.py"""

import itertools
import math

import numpy as np
import pytest

from shared.errors import InputError
from shared.stats import holm, mean_se, mean_std, wilcoxon_signed_rank


def exact_signed_rank_p(diff):
    """Two-sided exact p of the signed-rank statistic by enumerating all 2^n sign patterns (no ties, no zeros)."""
    ranks = np.argsort(np.argsort(np.abs(diff))) + 1
    w_plus = ranks[diff > 0].sum()
    total = ranks.sum()
    observed = min(w_plus, total - w_plus)
    hits = 0
    for signs in itertools.product([0, 1], repeat=len(diff)):
        w = (ranks * np.array(signs)).sum()
        hits += min(w, total - w) <= observed
    return hits / 2 ** len(diff), observed


def test_wilcoxon_matches_exact_enumeration():
    a = np.array([0.81, 0.62, 0.93, 0.55, 0.70, 0.88, 0.49, 0.77])
    b = np.array([0.78, 0.66, 0.85, 0.44, 0.69, 0.81, 0.37, 0.72])  # distinct |a - b|
    result = wilcoxon_signed_rank(a, b)
    p, w = exact_signed_rank_p(a - b)
    assert result["statistic"] == w == 3  # |d| sorted 0.01 0.03 0.04 ...: the one negative (-0.04) has rank 3
    assert result["p"] == pytest.approx(p, abs=1e-12)
    assert result["n"] == result["nonzero"] == 8


def test_wilcoxon_drops_zero_differences_and_all_equal_is_p_one():
    a = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]
    b = [1.0, 1.0, 4.0, 2.0, 2.0, 1.0]  # one zero difference
    result = wilcoxon_signed_rank(a, b)
    p, _ = exact_signed_rank_p(np.array(a[1:]) - np.array(b[1:]))
    assert result["nonzero"] == 5 and result["p"] == pytest.approx(p, abs=1e-12)
    assert wilcoxon_signed_rank([0.5, 0.5], [0.5, 0.5])["p"] == 1.0
    with pytest.raises(InputError, match="equal length"):
        wilcoxon_signed_rank([1.0, 2.0], [1.0])


def test_holm_by_hand():
    # sorted 0.01, 0.03, 0.04 -> 3 * 0.01 = 0.03, 2 * 0.03 = 0.06, max(0.06, 1 * 0.04) = 0.06
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.9]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm([]) == []
    with pytest.raises(InputError, match="p-values"):
        holm([1.5])


def test_mean_se_and_std_by_hand():
    mean, se = mean_se([1.0, 2.0, 3.0, 6.0])  # sample std = sqrt(14/3)
    assert mean == 3.0 and se == pytest.approx(math.sqrt(14 / 3) / 2)
    assert mean_std([1.0, 2.0, 3.0, 6.0]) == pytest.approx((3.0, math.sqrt(14 / 3)))
    assert mean_se([0.4]) == (0.4, 0.0) and mean_std([0.4]) == (0.4, 0.0)
