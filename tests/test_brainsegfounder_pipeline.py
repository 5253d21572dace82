"""BrainSegFounder end to end on tiny phantoms: stage 1 -> stage 2 -> few-shot fine-tuning -> predict -> evaluate,
the study table over two arms, and what stage 2 may not see.

Run: .venv/bin/python -m pytest -q tests/test_brainsegfounder_pipeline.py
"""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from brainsegfounder import evaluate, fewshot, finetune, predict, pretrain
from shared.checkpoint import load_checkpoint
from shared.errors import InputError
from shared.phantom import write_phantom_datasets

SMALL = ["--feature-size", "12", "--window-size", "4", "--device", "cpu", "--log-every", "1"]
SSL = ["--patch", "64", "32", "32", "--batch-size", "1", "--crops", "2", "--steps", "1", "--warmup", "0", *SMALL]
TUNE = ["--channels", "FLAIR", "T1ce", "T1", "T2", "--patch", "64", "32", "32", "--batch-size", "1", "--steps", "2",
        "--warmup", "0", "--train-fraction", "0.5", "1", "--repeats", "2", "--val-every", "1", *SMALL]  # fmt: skip


pytestmark = pytest.mark.usefixtures("cache_root")  # tests/conftest.py: caches in a temporary folder


@pytest.fixture(scope="module")
def tumour(tmp_path_factory):
    root = tmp_path_factory.mktemp("bsf_data")
    return str(write_phantom_datasets(root, datasets=["tumour"], cases=6, shape=(64, 32, 32), seed=3)[0])


def test_stages_finetune_predict_evaluate(tumour, tmp_path, capsys):
    stage1, stage2, tuned, scratch = tmp_path / "s1", tmp_path / "s2", tmp_path / "two_stage", tmp_path / "scratch"
    pretrain.main(["--data", tumour, "--channels", "T1", "FLAIR", "--out", str(stage1), *SSL])
    pretrain.main(["--data", tumour, "--channels", "FLAIR", "T1ce", "T1", "T2", "--init", str(stage1 / "best.pt"),
                   "--out", str(stage2), *SSL])  # fmt: skip
    printed = capsys.readouterr().out
    assert "T1ce <- new (kaiming init)" in printed and "FLAIR <- FLAIR" in printed
    s1 = load_checkpoint(stage1 / "checkpoint.pt")["model"]
    s2 = load_checkpoint(stage2 / "best.pt")
    assert s2["step"] == 1 and s2["channels"] == ["FLAIR", "T1ce", "T1", "T2"] and "inpaint" in s2["validation"]
    assert s2["model"]["swinViT.patch_embed.proj.weight"].shape[1] == 4
    assert not torch.equal(
        s1["swinViT.layers1.0.blocks.0.attn.qkv.weight"], s2["model"]["swinViT.layers1.0.blocks.0.attn.qkv.weight"]
    )
    log = list(csv.DictReader(open(stage2 / "log.csv")))
    assert log[-1]["val_loss"] != ""  # the SSL validation loss of paper Fig. 4

    finetune.main(["--data", tumour, "--init", str(stage2 / "best.pt"), "--arm", "two-stage", "--out", str(tuned),
                   *TUNE])  # fmt: skip
    finetune.main(["--data", tumour, "--out", str(scratch), "--select", "soft", *TUNE])
    summary = json.loads((tuned / "summary.json").read_text())
    assert summary["arm"] == "two-stage" and set(summary["fractions"]) == {"0.5", "1"}
    runs = {(r["fraction"], r["repeat"]): r for r in summary["runs"]}
    finals = [runs[(0.5, r)]["final"]["mean"] for r in range(2)]
    assert summary["fractions"]["0.5"]["mean"] == pytest.approx(np.mean(finals))
    assert summary["fractions"]["0.5"]["std"] == pytest.approx(np.std(finals, ddof=1))
    split = json.loads((tuned / "split.json").read_text())[tumour.split("/")[-1]]
    assert len(split["train"]) == 4 and len(split["val"]) == 2  # 6 cases, fold 0 of 5
    # ceil(0.5 * 4) = 2 cases, a different subset per repeat, the same subsets in both arms
    subsets = [runs[(0.5, r)]["train_cases"] for r in range(2)]
    assert len(subsets[0]) == 2 and subsets[0] != subsets[1] and set(subsets[0]) <= set(split["train"])
    other = {
        (r["fraction"], r["repeat"]): r["train_cases"]
        for r in json.loads((scratch / "summary.json").read_text())["runs"]
    }
    assert all(other[k] == v["train_cases"] for k, v in runs.items())
    best = load_checkpoint(tuned / "fraction_1" / "repeat_0" / "best.pt")
    assert best["validation"]["mean"] == pytest.approx(runs[(1.0, 0)]["best"]["mean"])
    log = list(csv.DictReader(open(tuned / "fraction_1" / "repeat_0" / "log.csv")))
    assert [row["val_mean"] != "" for row in log] == [True, True]  # --val-every 1
    assert max(float(row["val_mean"]) for row in log) == pytest.approx(best["validation"]["mean"])
    soft_best = load_checkpoint(scratch / "fraction_1" / "repeat_0" / "best.pt")["validation"]  # --select soft
    soft_log = list(csv.DictReader(open(scratch / "fraction_1" / "repeat_0" / "log.csv")))
    soft_means = [float(row["val_soft_mean"]) for row in soft_log]
    assert soft_best["select"] == "soft" and soft_best["selection"] == pytest.approx(max(soft_means))
    assert soft_best["step"] == int(soft_log[soft_means.index(max(soft_means))]["step"])

    fewshot.main([str(scratch), str(tuned), "--out", str(tmp_path / "table.csv")])
    printed = capsys.readouterr().out
    assert "mean +- std" in printed and "two-stage" in printed and "fraction   all: n   4" in printed
    rows = list(csv.DictReader(open(tmp_path / "table.csv")))
    assert len(rows) == 8 and {r["arm"] for r in rows} == {"scratch", "two-stage"}

    preds = tmp_path / "preds"
    val = split["val"]  # predict + evaluate the validation cases: the same Dice as best.pt's validation
    predict.main(["--model", str(tuned / "fraction_1" / "repeat_0" / "best.pt"), "--input", tumour, "--split", "Tr",
                  "--cases", *val, "--output", str(preds), "--device", "cpu"])  # fmt: skip
    image = nib.load(f"{tumour}/imagesTr/{val[0]}_0000.nii.gz")
    pred = nib.load(preds / f"{val[0]}.nii.gz")
    assert pred.shape == image.shape and np.allclose(pred.affine, image.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3}

    gt = tmp_path / "gt"
    gt.mkdir()
    for case in val:
        (gt / f"{case}.nii.gz").write_bytes(open(f"{tumour}/labelsTr/{case}.nii.gz", "rb").read())
    with pytest.raises(InputError, match="not the labelsTr/labelsTs folder of a dataset"):
        evaluate.main(["--pred", str(preds), "--gt", str(gt), "--task", "brats", "--out", str(tmp_path / "e.csv")])
    evaluate.main(["--pred", str(preds), "--gt", str(gt), "--task", "brats", "--brats-labels", "1", "2", "3",
                   "--out", str(tmp_path / "eval.csv")])  # fmt: skip
    scored = {r["class"]: float(r["mean_dice"]) for r in csv.DictReader(open(tmp_path / "eval_summary.csv"))}
    validation = best["validation"]
    assert validation["empty_reference"] == "skip" and validation["n_cases"] == 2
    assert {k: scored[k] for k in ("TC", "WT", "ET")} == pytest.approx({k: validation[k] for k in scored}, abs=1e-6)
    assert validation["mean"] > 0  # an all-zero prediction would score 0 (or be skipped), not this
    rows = list(csv.DictReader(open(tmp_path / "eval.csv")))
    assert {r["class"] for r in rows} == {"TC", "WT", "ET"} and len(rows) == 6


def test_stage2_sees_only_the_training_folds(tumour, tmp_path):
    fold = ["--fold", "1", "--folds", "3"]
    pretrain.main(["--data", tumour, "--channels", "T1", "--out", str(tmp_path / "ssl"), *fold, *SSL])
    name = tumour.split("/")[-1]
    used = json.loads((tmp_path / "ssl" / "split.json").read_text())[name]
    finetune.main(["--data", tumour, "--target", "binary", "--out", str(tmp_path / "ft"), *fold, *TUNE,
                   "--train-fraction", "1", "--repeats", "1", "--steps", "1"])  # fmt: skip
    tuned = json.loads((tmp_path / "ft" / "split.json").read_text())[name]
    assert sorted(used["train"]) == sorted(tuned["train"]) and used["val"] == tuned["val"] and tuned["val"]
    assert not set(used["train"]) & set(tuned["val"]) and used["imagesTs"] == []
    pretrain.main(["--data", tumour, "--channels", "T1", "--out", str(tmp_path / "trans"), "--transductive", *SSL])
    everything = json.loads((tmp_path / "trans" / "split.json").read_text())[name]
    assert len(everything["train"]) == 6 and everything["val"] == []


def test_resume_with_other_workers_continues_bit_identically(tumour, tmp_path):
    # the batch of step t is a function of (seed, rank, t): 0 workers straight == 2 workers, stop, resume with 1
    run = ["--data", tumour, *TUNE, "--train-fraction", "1", "--repeats", "1", "--steps", "3", "--fold", "-1",
           "--rotation", "0.5"]  # fmt: skip
    finetune.main([*run, "--out", str(tmp_path / "straight"), "--workers", "0"])
    finetune.main([*run, "--out", str(tmp_path / "split"), "--workers", "2", "--stop-after", "2"])
    finetune.main([*run, "--out", str(tmp_path / "split"), "--workers", "1", "--resume"])
    a, b = (load_checkpoint(tmp_path / p / "fraction_1" / "repeat_0" / "checkpoint.pt") for p in ("straight", "split"))
    assert a["step"] == b["step"] == 3
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_ssl_resume_continues_exactly(tumour, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    two = [*SSL, "--steps", "2"]  # later flags win
    pretrain.main(["--data", tumour, "--channels", "T1", "FLAIR", "--out", str(straight), "--workers", "0", *two])
    pretrain.main(["--data", tumour, "--channels", "T1", "FLAIR", "--out", str(split), "--stop-after", "1",
                   "--workers", "2", *two])  # fmt: skip
    pretrain.main(["--data", tumour, "--channels", "T1", "FLAIR", "--out", str(split), "--resume", *two])
    a, b = (load_checkpoint(p / "checkpoint.pt")["model"] for p in (straight, split))
    for key in a:
        assert torch.equal(a[key], b[key]), key
