"""The few-shot study: Table 9 / Fig. 5 aggregation and paired tests on hand-made runs; --freeze-encoder.

Run: .venv/bin/python -m pytest -q tests/test_brainsegfounder_study.py
"""

import csv
import json

import pytest
import torch

from brainsegfounder import crossval, fewshot
from brainsegfounder.finetune import freeze_encoder
from brainsegfounder.model import SwinUNETR
from shared.errors import InputError

# (fraction, repeat) -> Dice of two arms; two-stage wins every pair by +0.01 .. +0.04
SCRATCH = {(0.1, 0): 0.50, (0.1, 1): 0.60, (0.4, 0): 0.70, (0.4, 1): 0.80}
TWO_STAGE = {(0.1, 0): 0.51, (0.1, 1): 0.62, (0.4, 0): 0.73, (0.4, 1): 0.84}


def write_arm(folder, arm, dice, cases=None):
    runs = [{"fraction": f, "repeat": r, "train_cases": (cases or {}).get((f, r), [f"c{f}{r}"]),
             "final": {"TC": d, "WT": d, "ET": d, "mean": d, "empty_reference": "skip"},
             "best": {**{k: d + 0.1 for k in ("TC", "WT", "ET", "mean")}, "step": 5, "empty_reference": "skip"}}
            for (f, r), d in dice.items()]  # fmt: skip
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps({"arm": arm, "data": "/d", "target": "brats", "seed": 0,
                                                     "runs": runs}))  # fmt: skip
    return str(folder)


def test_table_and_paired_tests_by_hand(tmp_path, capsys):
    a = write_arm(tmp_path / "a", "scratch", SCRATCH)
    b = write_arm(tmp_path / "b", "two-stage", TWO_STAGE)
    fewshot.main([b, a, "--out", str(tmp_path / "t.csv")])
    printed = capsys.readouterr().out
    # mean +- std (ddof 1) at 10 %: scratch 0.55 +- 0.0707, two-stage 0.565 +- 0.0778
    assert "0.5650 +- 0.0778" in printed and "0.5500 +- 0.0707" in printed and "10%" in printed
    tests = {t["fraction"]: t for t in csv.DictReader(open(tmp_path / "t_tests.csv"))}
    # 4 positive differences: exact two-sided p = 2 / 2^4; 2 per fraction: p = 2 / 2^2, Holm x2 -> 1
    assert float(tests["all"]["p"]) == pytest.approx(0.125) and float(tests["all"]["p_holm"]) == pytest.approx(0.125)
    assert float(tests["0.1"]["p"]) == pytest.approx(0.5) and float(tests["0.1"]["p_holm"]) == pytest.approx(1.0)
    assert float(tests["all"]["median_difference"]) == pytest.approx(0.025)
    assert tests["all"]["baseline"] == "scratch"  # the default baseline, though given second
    summary = {(r["arm"], r["fraction"]): float(r["mean"]) for r in csv.DictReader(open(tmp_path / "t_summary.csv"))}
    assert summary[("two-stage", "0.4")] == pytest.approx(0.785)
    fewshot.main([a, b, "--score", "best", "--out", str(tmp_path / "best.csv")])
    rows = list(csv.DictReader(open(tmp_path / "best.csv")))
    assert float(rows[0]["dice"]) == pytest.approx(0.60)


def test_unpaired_arms_are_refused(tmp_path):
    a = write_arm(tmp_path / "a", "scratch", SCRATCH)
    b = write_arm(tmp_path / "b", "two-stage", TWO_STAGE, cases={(0.4, 1): ["other"]})
    with pytest.raises(InputError, match="fraction 0.4 repeat 1 trained on other cases"):
        fewshot.main([a, b])
    c = write_arm(tmp_path / "c", "scratch", SCRATCH)
    with pytest.raises(InputError, match="arm name 'scratch' is used twice"):
        fewshot.main([a, c])
    with pytest.raises(InputError, match="no summary.json"):
        fewshot.main([a, str(tmp_path)])


def test_freeze_encoder_trains_only_the_patch_embedding_and_the_decoder():
    torch.manual_seed(0)
    model = SwinUNETR(1, 1, feature_size=12, window_size=4)
    frozen = freeze_encoder(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(torch.randn(1, 1, 64, 32, 32)).square().mean().backward()
    optimizer.step()
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    encoder = {k for k in before if k.startswith("swinViT.") and not k.startswith("swinViT.patch_embed.")}
    assert not changed & encoder and "swinViT.patch_embed.proj.weight" in changed
    assert "decoder1.transp_conv.conv.weight" in changed and "out.conv.conv.weight" in changed
    assert frozen == sum(p.numel() for n, p in model.swinViT.named_parameters() if not n.startswith("patch_embed."))


def write_fold(root, fold, dice, val_cases, **changes):
    """A finetune --out folder of one run on fold `fold`, final validation Dice `dice` = (TC, WT, ET)."""
    final = {"TC": dice[0], "WT": dice[1], "ET": dice[2], "mean": sum(dice) / 3, "empty_reference": "skip",
             "skipped": {"TC": 0, "WT": 0, "ET": 0}, "n_cases": len(val_cases)}  # fmt: skip
    summary = {"arm": "two-stage", "data": "/d", "target": "brats", "seed": 0, "regions": ["TC", "WT", "ET"],
               "fold": fold, "folds": 5, "split_file": None, "holdout": 0, "val_cases": val_cases,
               "runs": [{"fraction": 1.0, "repeat": 0, "train_cases": ["t"], "final": final, "best": final}],
               **changes}  # fmt: skip
    folder = root / f"fold{fold}"
    folder.mkdir()
    (folder / "summary.json").write_text(json.dumps(summary))
    return str(folder)


def test_crossval_table_by_hand(tmp_path, capsys):
    folds = [write_fold(tmp_path, 2, (0.8, 0.9, 0.7), ["c", "d"]), write_fold(tmp_path, 0, (0.6, 0.7, 0.5), ["a"]),
             write_fold(tmp_path, 1, (0.7, 0.8, 0.9), ["b"])]  # fmt: skip
    crossval.main([*folds, "--out", str(tmp_path / "cv.csv")])
    printed = capsys.readouterr().out
    assert "3 of 5 folds" in printed
    rows = list(csv.DictReader(open(tmp_path / "cv.csv")))
    assert [r["fold"] for r in rows] == ["0", "1", "2", "average"]  # sorted by fold
    average = rows[-1]
    # TC (0.6 + 0.7 + 0.8) / 3 = 0.7, WT 0.8, ET (0.5 + 0.9 + 0.7) / 3 = 0.7; mean of the fold means 0.7333
    assert [float(average[k]) for k in ("TC", "WT", "ET", "mean")] == pytest.approx([0.7, 0.8, 0.7, 2.2 / 3])
    assert float(rows[1]["mean"]) == pytest.approx(0.8) and rows[2]["n_val"] == "2"
    assert " average   0.7000   0.8000   0.7000   0.7333      4" in printed
    assert "       1   0.7000   0.8000   0.9000   0.8000      1" in printed


def test_crossval_refuses_what_is_not_one_cross_validation(tmp_path):
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    a = write_fold(tmp_path / "x", 0, (0.6, 0.7, 0.5), ["a"])
    b = write_fold(tmp_path / "y", 0, (0.6, 0.7, 0.5), ["b"])
    with pytest.raises(InputError, match="fold 0 is also"):
        crossval.main([a, b])
    c = write_fold(tmp_path / "y", 1, (0.6, 0.7, 0.5), ["a"])
    with pytest.raises(InputError, match="validation cases \\['a'\\] are also validated"):
        crossval.main([a, c])
    d = write_fold(tmp_path / "y", 2, (0.6, 0.7, 0.5), ["d"], folds=4)
    with pytest.raises(InputError, match="folds 4 differs from 5"):
        crossval.main([a, d])
    e = write_fold(tmp_path / "y", 3, (0.6, 0.7, 0.5), ["e"], holdout=100)
    with pytest.raises(InputError, match="--holdout"):
        crossval.main([a, e])
