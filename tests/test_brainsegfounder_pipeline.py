"""BrainSegFounder end to end on tiny phantoms: stage 1 -> stage 2 -> few-shot fine-tuning -> predict -> evaluate.

Run: .venv/bin/python -m pytest -q tests/test_brainsegfounder_pipeline.py (add -m slow for the resume test)
"""

import csv
import json

import nibabel as nib
import numpy as np
import pytest
import torch

from brainsegfounder import evaluate, finetune, predict, pretrain
from shared.checkpoint import load_checkpoint
from shared.errors import InputError
from shared.phantom import write_phantom_datasets

SMALL = ["--feature-size", "12", "--window-size", "4", "--device", "cpu", "--log-every", "1"]
SSL = ["--patch", "64", "32", "32", "--batch-size", "1", "--crops", "2", "--steps", "1", "--warmup", "0", *SMALL]


@pytest.fixture(scope="module")
def tumour(tmp_path_factory):
    root = tmp_path_factory.mktemp("bsf_data")
    return str(write_phantom_datasets(root, datasets=["tumour"], cases=5, shape=(64, 32, 32), seed=3)[0])


def test_stages_finetune_predict_evaluate(tumour, tmp_path, capsys):
    stage1, stage2, tuned = tmp_path / "s1", tmp_path / "s2", tmp_path / "ft"
    pretrain.main(["--data", tumour, "--channels", "T1", "FLAIR", "--out", str(stage1), *SSL])
    pretrain.main(["--data", tumour, "--channels", "FLAIR", "T1ce", "T1", "T2", "--init",
                   str(stage1 / "checkpoint.pt"), "--out", str(stage2), *SSL])  # fmt: skip
    printed = capsys.readouterr().out
    assert "T1ce <- new (kaiming init)" in printed and "FLAIR <- FLAIR" in printed
    s1 = load_checkpoint(stage1 / "checkpoint.pt")["model"]
    s2 = load_checkpoint(stage2 / "checkpoint.pt")
    assert s2["step"] == 1 and s2["channels"] == ["FLAIR", "T1ce", "T1", "T2"]
    assert s2["model"]["swinViT.patch_embed.proj.weight"].shape[1] == 4
    assert not torch.equal(
        s1["swinViT.layers1.0.blocks.0.attn.qkv.weight"], s2["model"]["swinViT.layers1.0.blocks.0.attn.qkv.weight"]
    )

    finetune.main(["--data", tumour, "--channels", "FLAIR", "T1ce", "T1", "T2", "--init", str(stage2 / "checkpoint.pt"),
                   "--patch", "64", "32", "32", "--batch-size", "1", "--steps", "1", "--warmup", "0",
                   "--train-fraction", "0.5", "--repeats", "2", "--out", str(tuned), *SMALL])  # fmt: skip
    summary = json.loads((tuned / "summary.json").read_text())
    assert len(summary["mean"]["repeats"]) == 2
    assert summary["mean"]["mean"] == pytest.approx(np.mean(summary["mean"]["repeats"]))
    subsets = [load_checkpoint(tuned / f"repeat_{r}" / "checkpoint.pt")["train_cases"] for r in range(2)]
    assert len(subsets[0]) == 2 and subsets[0] != subsets[1]  # ceil(0.5 * 4) cases, a different draw per repeat

    preds = tmp_path / "preds"
    cases = ["--cases", "PhantomTumour_000", "PhantomTumour_001"]
    predict.main(["--model", str(tuned / "repeat_0" / "checkpoint.pt"), "--data", tumour, "--split", "Tr", *cases,
                  "--output", str(preds), "--device", "cpu"])  # fmt: skip
    image = nib.load(f"{tumour}/imagesTr/PhantomTumour_000_0000.nii.gz")
    pred = nib.load(preds / "PhantomTumour_000.nii.gz")
    assert pred.shape == image.shape and np.allclose(pred.affine, image.affine)
    assert set(np.unique(np.asarray(pred.dataobj))) <= {0, 1, 2, 3}

    gt = tmp_path / "gt"
    gt.mkdir()
    for case in ("PhantomTumour_000", "PhantomTumour_001"):
        (gt / f"{case}.nii.gz").write_bytes(open(f"{tumour}/labelsTr/{case}.nii.gz", "rb").read())
    evaluate.main(["--pred", str(preds), "--gt", str(gt), "--task", "brats", "--out", str(tmp_path / "eval.csv")])
    rows = list(csv.DictReader(open(tmp_path / "eval.csv")))
    assert {r["class"] for r in rows} == {"TC", "WT", "ET"} and len(rows) == 6


def test_bad_flags_are_refused(tumour, tmp_path):
    with pytest.raises(InputError, match="multiple of 32"):
        pretrain.main(["--data", tumour, "--channels", "T1", "--out", str(tmp_path), "--patch", "64", "40", "40"])
    with pytest.raises(InputError, match="no case with all channels"):
        pretrain.main(["--data", tumour, "--channels", "DWI", "--out", str(tmp_path / "x"), *SSL])
    with pytest.raises(InputError, match="--train-fraction"):
        finetune.main(["--data", tumour, "--channels", "T1", "--patch", "64", "32", "32", "--train-fraction", "0",
                       "--out", str(tmp_path / "y"), *SMALL])  # fmt: skip


@pytest.mark.slow
def test_resume_continues_exactly(tumour, tmp_path):
    straight, split = tmp_path / "straight", tmp_path / "split"
    two = [*SSL, "--steps", "2"]  # later flags win
    pretrain.main(["--data", tumour, "--channels", "T1", "FLAIR", "--out", str(straight), *two])
    pretrain.main(["--data", tumour, "--channels", "T1", "FLAIR", "--out", str(split), "--stop-after", "1", *two])
    pretrain.main(["--data", tumour, "--channels", "T1", "FLAIR", "--out", str(split), "--resume", *two])
    a, b = (load_checkpoint(p / "checkpoint.pt")["model"] for p in (straight, split))
    for key in a:
        assert torch.equal(a[key], b[key]), key
