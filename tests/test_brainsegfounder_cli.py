"""Bad input to every brainsegfounder CLI: exit 2, one line on stderr, no traceback, nothing written (issue 15).

Run: .venv/bin/python -m pytest -q tests/test_brainsegfounder_cli.py
"""

import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from brainsegfounder import convert_checkpoint, demo, evaluate, fewshot, finetune, predict, pretrain
from shared.cli import run_cli
from shared.phantom import write_phantom_datasets

SMALL = ["--feature-size", "12", "--window-size", "4", "--device", "cpu", "--log-every", "1"]
SSL = ["--channels", "T1", "FLAIR", "--patch", "64", "32", "32", "--steps", "1", "--warmup", "0", *SMALL]
TR = ["--split", "Tr"]
TUNE = ["--channels", "T1", "FLAIR", "--patch", "64", "32", "32", "--steps", "1", "--warmup", "0", *SMALL]


pytestmark = pytest.mark.usefixtures("cache_root")  # tests/conftest.py: caches in a temporary folder


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Tiny datasets, an SSL run, and broken files, built once."""
    root = tmp_path_factory.mktemp("bsf_cli")
    tumour, wmh = (str(p) for p in write_phantom_datasets(root / "data", datasets=["tumour", "wmh"], cases=5,
                                                          shape=(64, 32, 32), seed=1))  # fmt: skip
    run_cli(lambda: pretrain.main(["--data", tumour, "--out", str(root / "ssl"), *SSL]))
    broken = root / "broken"
    broken.mkdir()
    (broken / "truncated.pt").write_bytes((root / "ssl" / "checkpoint.pt").read_bytes()[:2000])
    torch.save({"kind": "mome", "model": {}}, broken / "mome.pt")
    torch.save({"obj": torch.nn.Linear(2, 2)}, broken / "pickled.pt")
    torch.save({"weight": torch.zeros(2)}, broken / "plain.pt")
    (broken / "bad.json").write_text("{not json")
    (broken / "a_file").write_text("x")
    nan = root / "nan" / "Dataset901_PhantomTumour"
    shutil.copytree(tumour, nan)
    image = nib.load(nan / "imagesTr" / "PhantomTumour_000_0000.nii.gz")
    data = np.asarray(image.dataobj, dtype=np.float32)
    data[0, 0, 0] = np.nan
    nib.save(nib.Nifti1Image(data, image.affine), nan / "imagesTr" / "PhantomTumour_000_0000.nii.gz")
    bad_json = root / "badjson" / "Dataset901_PhantomTumour"
    shutil.copytree(tumour, bad_json)
    (bad_json / "dataset.json").write_text('{"channel_names": {"0": "T1"}}')
    return {"root": root, "tumour": tumour, "wmh": wmh, "ssl": str(root / "ssl" / "checkpoint.pt"),
            "broken": broken, "nan": str(nan), "bad_json": str(bad_json)}  # fmt: skip


def W(key, *parts):
    """A path of the world fixture, resolved when the row runs."""
    return ("W", key, parts)


ROWS = [
    # pretrain
    ("pretrain", ["--data", W("root", "missing"), "--out", W("out"), *SSL], "dataset.json not found"),
    ("pretrain", ["--data", W("bad_json"), "--out", W("out"), *SSL], "missing required key"),
    ("pretrain", ["--data", W("nan"), "--out", W("out"), *SSL], "NaN"),
    ("pretrain", ["--data", W("tumour"), "--out", W("out"), *SSL, "--feature-size", "10"], "--feature-size"),
    ("pretrain", ["--data", W("tumour"), "--out", W("out"), *SSL, "--window-size", "0"], "--window-size"),
    ("pretrain", ["--data", W("tumour"), "--out", W("out"), *SSL, "--lr", "0"], "--lr"),
    ("pretrain", ["--data", W("tumour"), "--out", W("out"), *SSL, "--weight-decay", "-1"], "--weight-decay"),
    ("pretrain", ["--data", W("tumour"), "--out", W("out"), *SSL, "--patch", "64", "40", "40"], "multiple of 32"),
    ("pretrain", ["--data", W("tumour"), "--out", W("out"), *SSL, "--warmup", "1"], "smaller than --steps"),
    ("pretrain", ["--data", W("tumour"), "--out", W("out"), *SSL, "--crops", "1"], "contrastive"),
    ("pretrain", ["--data", W("tumour"), "--out", W("out"), *SSL, "--workers", "-1"],
     "--workers: must be a non-negative integer, got -1."),
    ("pretrain", ["--data", W("tumour"), "--out", W("out"), *SSL, "--channels", "DWI"], "no training case"),
    ("pretrain", ["--data", W("tumour"), "--out", W("broken", "a_file"), *SSL], "is a file"),
    ("pretrain", ["--data", W("tumour"), "--out", W("out"), *SSL, "--init", W("broken", "truncated.pt")],
     "not a readable checkpoint"),
    ("pretrain", ["--data", W("tumour"), "--out", W("out"), *SSL, "--init", W("broken", "pickled.pt")],
     "pickled Python objects"),
    ("pretrain", ["--data", W("tumour"), "--out", W("out"), *SSL, "--init", W("broken", "mome.pt")],
     "is a mome checkpoint"),
    ("pretrain", ["--data", W("tumour"), "--out", W("out"), *SSL, "--init", W("broken", "plain.pt")],
     "no SwinUNETR encoder weights"),
    ("pretrain", ["--data", W("tumour"), "--out", W("root", "ssl"), *SSL], "pass --resume"),
    ("pretrain", ["--data", W("tumour"), "--out", W("root", "ssl"), *SSL, "--resume", "--lr", "1e-3"],
     "--lr: 0.0004 -> 0.001"),
    # finetune
    ("finetune", ["--data", W("tumour"), "--out", W("out"), *TUNE, "--dropout", "2"], "--dropout"),
    ("finetune", ["--data", W("tumour"), "--out", W("out"), *TUNE, "--train-fraction", "0"],
     "--train-fraction: must be a fraction in (0, 1], got 0."),
    ("finetune", ["--data", W("tumour"), "--out", W("out"), *TUNE, "--freeze-encoder"], "needs --init"),
    ("finetune", ["--data", W("tumour"), "--out", W("out"), *TUNE, "--brats-labels", "1", "2", "4"],
     "cannot be three of its tumour classes"),
    ("finetune", ["--data", W("wmh"), "--out", W("out"), *TUNE], "does not determine the BraTS regions"),
    ("finetune", ["--data", W("tumour"), "--out", W("out"), *TUNE, "--fold", "5"], "smaller than --folds"),
    ("finetune", ["--data", W("tumour"), "--out", W("out"), *TUNE, "--split-file", W("broken", "bad.json")],
     "not a readable JSON split file"),
    ("finetune", ["--data", W("tumour"), "--out", W("out"), *TUNE, "--holdout", "9"], "--holdout 9"),
    ("finetune", ["--data", W("tumour"), "--out", W("out"), *TUNE, "--init", W("ssl"), "--init-channels", "T1"],
     "--init-channels names 1 channel(s)"),
    ("finetune", ["--data", W("tumour"), "--out", W("out"), *TUNE, "--channels", "T1", "--init", W("ssl"),
                  "--channel-transfer", "position"], "has 2 input channel(s) (T1 FLAIR) but 1 are asked for"),
    # predict
    ("predict", ["--model", W("root", "missing.pt"), "--input", W("tumour"), *TR, "--output", W("out")], "not found"),
    ("predict", ["--model", W("ssl"), "--input", W("tumour"), *TR, "--output", W("out")], "holds an encoder only"),
    ("predict", ["--model", W("broken", "truncated.pt"), "--input", W("tumour"), *TR, "--output", W("out")],
     "not a readable checkpoint"),
    ("predict", ["--model", W("ssl"), "--input", W("root", "missing"), "--output", W("out")], "does not exist"),
    ("predict", ["--model", W("ssl"), "--input", W("tumour"), *TR, "--output", W("broken", "a_file")], "is a file"),
    ("predict", ["--model", W("ssl"), "--input", W("tumour"), "--output", W("out"), "--patch", "40", "32", "32"],
     "multiple of 32"),
    ("predict", ["--model", W("ssl"), "--input", W("tumour"), *TR, "--output", W("out"), "--overlap", "1"],
     "--overlap"),
    # evaluate
    ("evaluate", ["--pred", W("tumour", "labelsTr"), "--gt", W("root"), "--out", W("out.csv")], "--brats-labels"),
    ("evaluate", ["--pred", W("wmh", "labelsTr"), "--gt", W("wmh", "labelsTr"), "--out", W("out.csv")],
     "does not determine the BraTS regions"),
    ("evaluate", ["--pred", W("root", "missing"), "--gt", W("tumour", "labelsTr"), "--out", W("out.csv")],
     "not a folder"),
    ("evaluate", ["--pred", W("tumour", "labelsTr"), "--gt", W("tumour", "labelsTr"), "--out", W("broken")],
     "is a folder"),
    # convert_checkpoint
    ("convert", [W("broken", "pickled.pt"), "--out", W("out.pt")], "--trust-pickle"),
    ("convert", [W("ssl"), "--out", W("ssl")], "is the source file"),
    ("convert", [W("ssl"), "--out", W("out.csv")], "must end in .pt"),
    ("convert", [W("broken", "plain.pt"), "--out", W("out.pt")], "no SwinUNETR encoder weights"),
    # fewshot and demo
    ("fewshot", [W("root")], "at least two arms"),
    ("fewshot", [W("root"), W("root", "ssl")], "no summary.json"),
    ("demo", ["--ssl-steps", "0"], "--ssl-steps"),
]  # fmt: skip
MAINS = {"pretrain": pretrain.main, "finetune": finetune.main, "predict": predict.main, "evaluate": evaluate.main,
         "convert": convert_checkpoint.main, "fewshot": fewshot.main, "demo": demo.main}  # fmt: skip


def _files(root):
    return sorted(p.relative_to(root) for p in root.rglob("*") if "cache" not in p.parts)


@pytest.mark.parametrize(("cli", "argv", "message"), ROWS, ids=[f"{r[0]}-{i}" for i, r in enumerate(ROWS)])
def test_bad_input_is_one_sentence_and_writes_nothing(world, tmp_path, capsys, cli, argv, message):
    def resolve(arg):
        if not isinstance(arg, tuple):
            return arg
        _, key, parts = arg
        if key in ("out", "out.csv", "out.pt"):
            return str(tmp_path / key)
        return str(Path(world[key]).joinpath(*parts))

    argv = [resolve(a) for a in argv]
    before = _files(world["root"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: MAINS[cli](argv))
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip() and "it/s]" not in line and "%|" not in line]
    assert exit_info.value.code == 2, err
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in err, err
    assert message in lines[0], lines[0]
    assert list(tmp_path.iterdir()) == [] and _files(world["root"]) == before  # nothing written or left behind


def test_resume_with_the_same_flags_is_accepted(world, tmp_path):
    run_dir = tmp_path / "ssl"
    shutil.copytree(world["root"] / "ssl", run_dir)
    run_cli(lambda: pretrain.main(["--data", world["tumour"], "--out", str(run_dir), *SSL, "--resume",
                                   "--device", "cpu", "--stop-after", "1"]))  # fmt: skip
    assert json.loads((run_dir / "split.json").read_text())
