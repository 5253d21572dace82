"""Tables 1-3 of Novosad et al.: CScore with per-configuration Corr, mean +- SE, Wilcoxon, by hand.

Run: .venv/bin/python -m pytest -q tests/test_moe_missing_evaluate.py
"""

import math

import pytest

from moe_missing.evaluate import add_cscore, config_name, mean_se, summary_table, wilcoxon_rows


def row(model, config, case, dice, ppv=1.0, ltpr=1.0, lfpr=0.0, volume_pred=1.0, volume_gt=1.0):
    return dict(model=model, config=config, case=case, dice=dice, ppv=ppv, ltpr=ltpr, lfpr=lfpr,
                volume_pred=volume_pred, volume_gt=volume_gt)  # fmt: skip


def test_config_name():
    assert config_name([1, 0, 1], ["T1", "T2", "FLAIR"]) == "T1+FLAIR"


def test_cscore_uses_the_volume_correlation_of_its_configuration():
    rows = [
        row("A", "T1", "c0", 0.8, ppv=0.6, ltpr=0.5, lfpr=0.25, volume_pred=1, volume_gt=1),
        row("A", "T1", "c1", 0.4, volume_pred=2, volume_gt=3),
        row("A", "T1", "c2", 0.6, volume_pred=3, volume_gt=2),
        row("A", "FLAIR", "c0", 0.5, volume_pred=1, volume_gt=1),
        row("A", "FLAIR", "c1", 0.5, volume_pred=2, volume_gt=2),
    ]
    add_cscore(rows)
    # pred (1, 2, 3) vs gt (1, 3, 2): centred (-1, 0, 1) and (-1, 1, 0) -> r = 1 / 2
    assert rows[0]["corr"] == pytest.approx(0.5)
    assert rows[0]["cscore"] == pytest.approx(0.8 / 8 + 0.6 / 8 + 0.5 / 4 + 0.75 / 4 + 0.5 / 4)
    assert rows[3]["corr"] == pytest.approx(1.0)  # the FLAIR rows have their own correlation
    assert rows[3]["cscore"] == pytest.approx(0.5 / 8 + 1 / 8 + 1 / 4 + 1 / 4 + 1 / 4)


def test_mean_and_standard_error_per_configuration_and_pooled():
    mean, se = mean_se([1.0, 2.0, 3.0, 4.0])
    assert mean == 2.5 and se == pytest.approx(math.sqrt(5 / 3) / 2)  # sample var 5/3, n = 4
    assert mean_se([0.7]) == (0.7, 0.0)
    rows = [row("A", "T1", "c0", 0.2), row("A", "T1", "c1", 0.4), row("A", "T2", "c0", 0.9)]
    for r in rows:
        r["cscore"], r["corr"] = r["dice"], 0.0
    table = {t["config"]: t for t in summary_table(rows, ["T1", "T2"])}
    assert table["T1"]["dice"] == pytest.approx(0.3) and table["T1"]["dice_se"] == pytest.approx(0.1)
    assert table["T2"]["n"] == 1 and table["all"]["n"] == 3
    assert table["all"]["dice"] == pytest.approx(0.5)
    assert table["all"]["dice_se"] == pytest.approx(math.sqrt(((0.3**2 + 0.1**2 + 0.4**2) / 2) / 3))


def test_wilcoxon_signed_rank_exact_p_by_hand():
    # differences 0.01 .. 0.05, all in favour of A: W- = 0, exact two-sided p = 2 / 2^5
    rows = []
    for i in range(5):
        rows += [row("A", "T1", f"c{i}", 0.5 + 0.01 * (i + 1)), row("B", "T1", f"c{i}", 0.5)]
    for r in rows:
        r["cscore"] = r["dice"]
    dice, cscore = wilcoxon_rows(rows, "A", "B")
    assert dice["pairs"] == 5 and dice["statistic"] == 0.0
    assert dice["p"] == pytest.approx(2 / 32)
    assert dice["mean_diff"] == pytest.approx(0.03)
    same = wilcoxon_rows(rows, "A", "A")
    assert same[0]["p"] == 1.0
