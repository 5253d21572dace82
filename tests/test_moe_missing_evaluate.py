"""Tables 1-3 of Novosad et al. by hand: pooled Corr and CScore, mean +- SE, Wilcoxon + Holm, gate statistics, and
which (configuration, case) each model scores.

Run: .venv/bin/python -m pytest -q tests/test_moe_missing_evaluate.py
"""

import math
from pathlib import Path

import pytest

from moe_missing.evaluate import Run, column_order, plan_jobs
from moe_missing.tables import (
    add_cscore,
    config_name,
    config_order,
    gate_specialisation,
    paired_tests,
    paper_table,
    summary_table,
)
from shared.errors import InputError
from shared.phantom import write_phantom_datasets
from shared.stats import holm

MODALITIES = ("T1", "T2", "FLAIR")


def row(model, config, case, dice, ppv=1.0, ltpr=1.0, lfpr=0.0, volume_pred=1.0, volume_gt=1.0):
    return dict(model=model, config=config, case=case, dataset="D", dice=dice, ppv=ppv, ltpr=ltpr, lfpr=lfpr,
                lesion_f1=1.0, hd95=0.0, volume_pred=volume_pred, volume_gt=volume_gt)  # fmt: skip


def test_config_names_in_table_order():
    assert config_name([1, 0, 1], MODALITIES) == "T1+FLAIR"
    # the rows of the paper's Tables 1-3, whatever the channel order of the dataset
    assert config_order(MODALITIES) == ["T1", "T2", "FLAIR", "T1+T2", "T2+FLAIR", "T1+FLAIR", "T1+T2+FLAIR"]
    assert config_order(("FLAIR", "T1", "T2")) == ["T1", "T2", "FLAIR", "T1+T2", "FLAIR+T2", "FLAIR+T1",
                                                   "FLAIR+T1+T2"]  # fmt: skip
    assert config_order(("T1", "FLAIR")) == ["T1", "FLAIR", "T1+FLAIR"]  # other channels: by count, channel order


def test_cscore_uses_the_volume_correlation_of_its_model_and_configuration():
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
    add_cscore(rows, corr_weight=1 / 8)  # the paper's printed weight
    assert rows[0]["cscore"] == pytest.approx(0.8 / 8 + 0.6 / 8 + 0.5 / 4 + 0.75 / 4 + 0.5 / 8)


def test_corr_is_computed_on_the_pooled_folds_not_averaged():
    # two folds of one model: within each fold two cases always correlate perfectly (r = 1), pooled they do not
    rows = [row("A", "T1", "f0c0", 0.5, volume_pred=1, volume_gt=1), row("A", "T1", "f0c1", 0.5, volume_pred=2,
            volume_gt=3), row("A", "T1", "f1c0", 0.5, volume_pred=3, volume_gt=2),
            row("A", "T1", "f1c1", 0.5, volume_pred=4, volume_gt=4)]  # fmt: skip
    other = [row("B", "T1", "f0c0", 0.5, volume_pred=9, volume_gt=1), row("B", "T1", "f0c1", 0.5, volume_gt=3)]
    add_cscore(rows + other)
    # centred (-1.5, -0.5, 0.5, 1.5) and (-1.5, 0.5, -0.5, 1.5): r = (2.25 - 0.25 - 0.25 + 2.25) / 5 = 0.8
    assert all(r["corr"] == pytest.approx(0.8) for r in rows)
    assert all(r["corr"] == pytest.approx(-1.0) for r in other)  # another model: its own correlation


def test_mean_and_standard_error_per_configuration_and_pooled():
    rows = [row("A", "T1", "c0", 0.2), row("A", "T1", "c1", 0.4), row("A", "T2", "c0", 0.9)]
    for r in rows:
        r["cscore"], r["corr"] = r["dice"], 0.0
    table = {t["config"]: t for t in summary_table(rows, ["T1", "T2"])}
    assert table["T1"]["dice"] == pytest.approx(0.3) and table["T1"]["dice_se"] == pytest.approx(0.1)
    assert table["T2"]["n"] == 1 and table["T2"]["dice_se"] == 0.0 and table["all"]["n"] == 3
    assert table["all"]["dice"] == pytest.approx(0.5)
    assert table["all"]["dice_se"] == pytest.approx(math.sqrt(((0.3**2 + 0.1**2 + 0.4**2) / 2) / 3))


def test_paper_layout_pools_only_configurations_every_model_in_a_row_serves():
    rows = [row("DM", "T1", "c0", 0.8), row("DM", "T1", "c1", 0.6), row("ours", "T1", "c0", 0.7),
            row("ours", "T1", "c1", 0.7), row("ours", "T2", "c0", 0.5), row("ours", "T2", "c1", 0.3)]  # fmt: skip
    add_cscore(rows)
    table = summary_table(rows, ["T1", "T2"])
    assert {(t["model"], t["config"]): t["over"] for t in table if t["config"] in ("all", "shared")} == {
        ("ours", "all"): "T1 T2", ("ours", "shared"): "T1", ("DM", "shared"): "T1"}  # fmt: skip
    lines = paper_table(table, ["DM", "ours"], ["T1", "T2"]).splitlines()
    assert lines[0].split() == ["configuration", "DSC", "DM", "DSC", "ours", "CScore", "DM", "CScore", "ours"]
    assert lines[1].split()[:3] == ["T1", "70.00+-10.00", "70.00+-0.00"]
    assert lines[2].split()[:3] == ["T2", "-", "40.00+-10.00"]
    # DM serves T1 only: no DM mean over T1 and T2 next to ours; both over T1 alone
    assert lines[3].split()[:3] == ["all", "-", "55.00+-9.57"]  # ours: (0.7, 0.7, 0.5, 0.3)
    assert lines[4].split()[:3] == ["shared", "70.00+-10.00", "70.00+-0.00"]
    assert lines[5] == "all: pooled over T1, T2 (only the models that serve all of them)"
    assert lines[6] == "shared: pooled over T1 (the configurations every model serves)"
    one_model = paper_table(summary_table(rows[2:], ["T1", "T2"]), ["ours"], ["T1", "T2"]).splitlines()
    assert [line.split()[0] for line in one_model[1:]] == ["T1", "T2", "all", "all:"]  # no "shared" row


def test_wilcoxon_exact_p_by_hand_and_holm_over_every_test():
    rows = []
    for i in range(5):  # ours beats B by 0.01 .. 0.05 on T1: W = 0, exact two-sided p = 2 / 2^5
        rows += [row("ours", "T1", f"c{i}", 0.5 + 0.01 * (i + 1)), row("B", "T1", f"c{i}", 0.5)]
        rows += [row("ours", "T2", f"c{i}", 0.5), row("B", "T2", f"c{i}", 0.5)]  # ties: dropped by Wilcoxon
    rows += [row("DM", "T1", f"c{i}", 0.5 + 0.01 * (i + 1) - (0.1 if i < 2 else -0.1)) for i in range(5)]
    for r in rows:
        r["cscore"] = r["dice"]
    tests = paired_tests(rows, "ours", ["DM", "B"])
    by = {(t["other"], t["metric"]): t for t in tests}
    b = by[("B", "dice")]
    assert b["pairs"] == 10 and b["statistic"] == 0.0 and b["p"] == pytest.approx(2 / 32)
    assert b["mean_diff"] == pytest.approx(0.015)  # 0.15 over 10 pairs
    dm = by[("DM", "dice")]
    assert dm["pairs"] == 5  # the dedicated T1 model pairs with ours on T1 only
    # differences +0.1, +0.1, -0.1, -0.1, -0.1: ranks all tied at 3; W = min(6, 9) = 6, exact p = 1.0 (scipy)
    assert dm["statistic"] == 6.0
    assert [t["p_holm"] for t in tests] == pytest.approx(holm([t["p"] for t in tests]))
    # Holm over 4 tests: p_B = 1/16 is the smallest twice -> 4 * 1/16 = 0.25, then max(0.25, 3 * 1/16) = 0.25
    assert by[("B", "dice")]["p_holm"] == pytest.approx(0.25) and by[("B", "cscore")]["p_holm"] == pytest.approx(0.25)
    with pytest.raises(InputError, match="--ours C"):
        paired_tests(rows, "C", ["B"])


def test_gate_specialisation_by_hand():
    one_hot = [{"layer": "stem", "config": c, **{f"expert_{n}": float(n == i % 2) for n in range(4)}}
               for i, c in enumerate(["T1", "T2", "T1+T2"])]  # fmt: skip
    uniform = [{"layer": "enc", "config": c, **{f"expert_{n}": 0.25 for n in range(4)}} for c in ["T1", "T2"]]
    stem, enc = gate_specialisation(one_hot + uniform)
    assert stem["specialisation"] == pytest.approx(math.sqrt(3)) and stem["max"] == pytest.approx(math.sqrt(3))
    # mean usage (2/3, 1/3, 0, 0): mean 1/4, population std sqrt(((5/12)^2 + (1/12)^2 + 2 (1/4)^2) / 4)
    assert stem["balance"] == pytest.approx(math.sqrt((25 / 144 + 1 / 144 + 2 / 16) / 4) * 4)
    assert stem["argmax"] == "T1:0 T2:1 T1+T2:0"
    assert enc["specialisation"] == 0.0 and enc["balance"] == 0.0


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """3 MS phantoms; case 001 has no T1 file."""
    (folder,) = write_phantom_datasets(tmp_path_factory.mktemp("d"), datasets=["ms"], cases=3, shape=(16, 16, 16))
    (folder / "imagesTr" / "PhantomMS_001_0000.nii.gz").unlink()
    return str(folder)


def fake_run(name, dedicated=None, folder="runs/x"):
    return Run(name=name, checkpoint=Path(folder, "checkpoint.pt"), folder=Path(folder), modalities=MODALITIES,
               dedicated=dedicated, patch=(8, 8, 8))  # fmt: skip


def test_each_model_scores_the_configurations_it_serves_as_the_case_has_them(dataset):
    jobs = plan_jobs([fake_run("ours"), fake_run("DM", dedicated="110")], [dataset])
    scored = {(run.name, case.case_id, code) for run, _, case, code in jobs}
    ours_001 = sorted(code for name, case, code in scored if name == "ours" and case == "PhantomMS_001")
    assert ours_001 == [(0, 0, 1), (0, 1, 0), (0, 1, 1)]  # without T1: T2, FLAIR, T2+FLAIR, each once
    assert sum(1 for name, case, _ in scored if name == "ours" and case != "PhantomMS_001") == 2 * 7
    dm = sorted(case for name, case, code in scored if name == "DM")
    assert dm == ["PhantomMS_000", "PhantomMS_002"]  # T1+T2 only, and not the case that has no T1
    assert all(code == (1, 1, 0) for name, _, code in scored if name == "DM")


def test_pooled_runs_must_score_different_cases(dataset, tmp_path):
    with pytest.raises(InputError, match="ours would score case PhantomMS_000 under T1 twice"):
        plan_jobs([fake_run("ours", folder="a"), fake_run("ours", folder="b")], [dataset])
    for fold, cases in (("f0", ["PhantomMS_000"]), ("f1", ["PhantomMS_001", "PhantomMS_002"])):
        (tmp_path / fold).mkdir()
        split = {"train": [], "val": cases}
        (tmp_path / fold / "split.json").write_text(f'{{"{Path(dataset).name}": {split}}}'.replace("'", '"'))
    runs = [fake_run("ours", folder=tmp_path / "f0"), fake_run("ours", folder=tmp_path / "f1")]
    jobs = plan_jobs(runs, [dataset], held_out=True)
    assert {(run.folder.name, case.case_id) for run, _, case, _ in jobs} == {
        ("f0", "PhantomMS_000"), ("f1", "PhantomMS_001"), ("f1", "PhantomMS_002")}  # fmt: skip
    (tmp_path / "all").mkdir()  # a run trained on every case (--fold -1) has no held-out fold to score
    (tmp_path / "all" / "split.json").write_text(f'{{"{Path(dataset).name}": {{"train": [], "val": []}}}}')
    with pytest.raises(InputError, match="holds out no case"):
        plan_jobs([fake_run("ours", folder=tmp_path / "all")], [dataset], held_out=True)


def test_columns_follow_the_paper_baselines_then_ours_then_dedicated():
    runs = [fake_run("DM", "100"), fake_run("ours"), fake_run("MD"), fake_run("DM", "111")]
    assert column_order(runs, "ours") == ["MD", "ours", "DM"]  # Tables 2-3: MD | Ours | DM
