"""Summary statistics and paired tests for the papers' tables: mean +- SE / std, Wilcoxon signed-rank, Holm.

moe_missing (Tables 2-3) tests its model against each baseline over paired (configuration, case) rows;
brainsegfounder (Table 9) compares arms over paired repeats. Both correct for several comparisons with Holm.
"""

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

from shared.errors import InputError


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """(mean, standard error of the mean = sample std (ddof 1) / sqrt(n)); SE is 0 for a single value."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise InputError("mean_se: no values to summarise.")
    se = float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else 0.0
    return float(x.mean()), se


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """(mean, sample standard deviation with ddof 1); the std is 0 for a single value."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise InputError("mean_std: no values to summarise.")
    return float(x.mean()), float(x.std(ddof=1)) if x.size > 1 else 0.0


def wilcoxon_signed_rank(a: Sequence[float], b: Sequence[float]) -> dict:
    """Two-sided Wilcoxon signed-rank test of the paired differences a - b.

    Zero differences are dropped (Wilcoxon's original rule, scipy's default); scipy chooses the exact null
    distribution for small samples without ties and the normal approximation otherwise. When every difference
    is zero there is nothing to test: p = 1.

    Returns:
        {"n": pairs, "nonzero": pairs with a difference, "statistic": W (smaller rank sum), "p": p-value,
        "median_difference": median of a - b}.
    """
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1:
        raise InputError(
            f"wilcoxon_signed_rank: paired samples must be 1-D of equal length, got {a.shape} and {b.shape}."
        )
    if a.size == 0:
        raise InputError("wilcoxon_signed_rank: no paired values.")
    diff = a - b
    nonzero = int(np.count_nonzero(diff))
    out = {"n": int(a.size), "nonzero": nonzero, "median_difference": float(np.median(diff))}
    if nonzero == 0:
        return {**out, "statistic": 0.0, "p": 1.0}
    result = stats.wilcoxon(a, b, zero_method="wilcox", alternative="two-sided")
    return {**out, "statistic": float(result.statistic), "p": float(result.pvalue)}


def holm(pvalues: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (family-wise error), in the input order.

    The k-th smallest p (k = 1..m) becomes max over j <= k of (m - j + 1) p_(j), capped at 1.
    """
    p = np.asarray(pvalues, dtype=np.float64)
    if p.size and (p.min() < 0 or p.max() > 1):
        raise InputError(f"holm: p-values must lie in [0, 1], got {p.tolist()}.")
    order = np.argsort(p, kind="stable")
    m = p.size
    adjusted = np.empty(m)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (m - rank) * p[index]))
        adjusted[index] = running
    return adjusted.tolist()
