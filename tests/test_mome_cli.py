"""Bad input to every mome CLI: exit 2, one line on stderr naming the problem, no traceback, nothing left behind.

Run: .venv/bin/python -m pytest -q tests/test_mome_cli.py
"""

import argparse
import json
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from mome import convert_checkpoint, evaluate, predict, train, train_expert
from shared.checkpoint import load_checkpoint
from shared.cli import run_cli
from shared.phantom import write_phantom_datasets

TINY = ["--features", "4", "8", "--patch", "16", "16", "16", "--batch-size", "2", "--steps-per-epoch", "1",
        "--epochs", "1", "--fold", "0", "--folds", "3", "--modalities", "DWI", "--device", "cpu", "--no-compile",
        "--workers", "0"]  # fmt: skip


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A tiny DWI dataset, a trained expert run, and broken files of every kind."""
    root = tmp_path_factory.mktemp("cli")
    (data,) = write_phantom_datasets(root / "data", ["stroke_acute"], cases=3, shape=(16, 16, 16), seed=3)
    cache = root / "cache"
    expert = root / "expert"
    train_expert.main(["--modality", "DWI", "--data", str(data), "--out", str(expert), "--cache", str(cache), *TINY])
    files = root / "files"
    files.mkdir()
    (files / "truncated.pt").write_bytes((expert / "checkpoint.pt").read_bytes()[:2000])
    torch.save({"encoder.weight": torch.zeros(1)}, files / "plain.pt")
    torch.save({"kind": "moe_missing", "model": {}, "config": {}}, files / "other.pt")
    torch.save({"model": {}, "args": argparse.Namespace(a=1)}, files / "pickled.pt")
    (files / "bad.json").write_text("{not json")
    image = nib.load(data / "imagesTr" / "PhantomStrokeAcute_000_0000.nii.gz")
    nan = np.asarray(image.dataobj).copy()
    nan[3, 3, 3] = np.nan
    nib.save(nib.Nifti1Image(nan, image.affine), files / "nan_0000.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16, 2), np.float32), image.affine), files / "four_d_0000.nii.gz")
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 20), np.float32), image.affine), files / "shape_0000.nii.gz")
    (files / "not_nifti_0000.nii.gz").write_bytes(b"garbage")
    (files / "afile").write_text("x")
    pred = root / "pred" / data.name
    pred.mkdir(parents=True)
    for case in ("PhantomStrokeAcute_000", "PhantomStrokeAcute_001", "PhantomStrokeAcute_002"):
        nib.save(nib.Nifti1Image(np.zeros((16, 16, 20), np.uint8), image.affine), pred / f"{case}_0000.nii.gz")
    return {"data": str(data), "expert": str(expert), "ckpt": str(expert / "checkpoint.pt"), "files": files,
            "cache": str(cache), "root": root, "pred": str(root / "pred")}  # fmt: skip


def T(env, *extra):
    return ["--modality", "DWI", "--data", env["data"], "--cache", env["cache"], *TINY, *extra]


def P(env, model, inp, *extra):
    return ["--model", model, "--input", inp, "--split", "Tr", "--output", str(env["root"] / "out"), "--device",
            "cpu", *extra]  # fmt: skip


F = lambda env, name: str(env["files"] / name)  # noqa: E731
OUT = lambda env: ["--out", str(env["root"] / "out")]  # noqa: E731

ROWS = [
    # (name, CLI, argv, fragment of the one-line message)
    ("train_expert missing data", train_expert, lambda e: ["--modality", "DWI", "--data", "/nope", *TINY, *OUT(e)],
     "--data /nope: no dataset.json found"),
    ("train_expert features 0", train_expert, lambda e: T(e, "--features", "0", "8", *OUT(e)),
     "--features: must be a positive integer, got 0"),
    ("train_expert lr 0", train_expert, lambda e: T(e, "--lr", "0", *OUT(e)), "--lr: must be a positive number, got 0"),
    ("train_expert weight decay -1", train_expert, lambda e: T(e, "--weight-decay", "-1", *OUT(e)),
     "--weight-decay: must be a non-negative number, got -1"),
    ("train_expert oversample 2", train_expert, lambda e: T(e, "--oversample", "2", *OUT(e)),
     "--oversample: must be a probability in [0, 1], got 2"),
    ("train_expert workers -1", train_expert, lambda e: T(e, "--workers", "-1", *OUT(e)),
     "--workers: must be a non-negative integer, got -1."),
    ("train_expert patch not divisible", train_expert, lambda e: T(e, "--patch", "17", "16", "16", *OUT(e)),
     "must be divisible by 2^1"),
    ("train_expert fold >= folds", train_expert, lambda e: T(e, "--fold", "3", *OUT(e)), "--fold 3 must be below"),
    ("train_expert unknown modality", train_expert,
     lambda e: ["--modality", "PD", "--data", e["data"], *TINY, *OUT(e)], "--modality PD is not one of"),
    ("train_expert keep-labels with rule", train_expert, lambda e: T(e, "--keep-labels", "--label-rule", "DWI=1",
     *OUT(e)), "--keep-labels keeps every label value"),  # fmt: skip
    ("train_expert out is a file", train_expert, lambda e: T(e, "--out", F(e, "afile")),
     "is a file, expected a folder"),
    ("train_expert existing checkpoint", train_expert, lambda e: T(e, "--out", e["expert"]),
     "already holds checkpoint.pt; pass --resume"),
    ("train_expert split file malformed", train_expert, lambda e: T(e, "--split-file", F(e, "bad.json"), *OUT(e)),
     "bad.json: not a readable JSON split"),
    ("train experts count", train, lambda e: ["--data", e["data"], "--experts", e["ckpt"], *TINY, "--modalities",
     "DWI", "T1", *OUT(e)], "--experts lists 1 files but --modalities has 2"),  # fmt: skip
    ("train gate-lr -1", train, lambda e: ["--data", e["data"], "--experts", e["ckpt"], "--gate-lr", "-1", *TINY,
     *OUT(e)], "--gate-lr: must be a positive number, got -1"),  # fmt: skip
    ("train plain state_dict expert", train, lambda e: ["--data", e["data"], "--experts", F(e, "plain.pt"), *TINY,
     "--cache", e["cache"], *OUT(e)], "neither a mome.train_expert run nor an nnU-Net PlainConvUNet; pass the "
     "checkpoint.pt of mome.train_expert --modality DWI"),  # fmt: skip
    ("train truncated expert", train, lambda e: ["--data", e["data"], "--experts", F(e, "truncated.pt"), *TINY,
     "--cache", e["cache"], *OUT(e)], "truncated.pt"),  # fmt: skip
    ("predict missing model", predict, lambda e: P(e, "/nope.pt", e["data"]), "/nope.pt: checkpoint file not found"),
    ("predict truncated checkpoint", predict, lambda e: P(e, F(e, "truncated.pt"), e["data"]),
     "not a readable checkpoint"),
    ("predict plain state_dict", predict, lambda e: P(e, F(e, "plain.pt"), e["data"]),
     "plain state_dict; pass the checkpoint.pt of mome.train or mome.train_expert, or convert"),
    ("predict other package", predict, lambda e: P(e, F(e, "other.pt"), e["data"]), "is a moe_missing checkpoint"),
    ("predict pickled object", predict, lambda e: P(e, F(e, "pickled.pt"), e["data"]), "not a readable checkpoint"),
    ("predict NaN voxels", predict, lambda e: P(e, e["ckpt"], F(e, "nan_0000.nii.gz")), "1 voxels are NaN or Inf"),
    ("predict 4-D image", predict, lambda e: P(e, e["ckpt"], F(e, "four_d_0000.nii.gz")), "expected a 3D volume"),
    ("predict other grid", predict, lambda e: P(e, e["ckpt"], F(e, "shape_0000.nii.gz")),
     "shape 16x16x20 is not the 16x16x16 grid"),
    ("predict not NIfTI", predict, lambda e: P(e, e["ckpt"], F(e, "not_nifti_0000.nii.gz")), "not a readable NIfTI"),
    ("predict output is a file", predict, lambda e: P(e, e["ckpt"], e["data"], "--output", F(e, "afile")),
     "--output"),
    ("predict patch not divisible", predict, lambda e: P(e, e["ckpt"], e["data"], "--patch", "15", "16", "16"),
     "every side must be a positive multiple of [2, 2, 2]"),
    ("predict overlap 1", predict, lambda e: P(e, e["ckpt"], e["data"], "--overlap", "1"), "--overlap: must be"),
    ("predict unknown case", predict, lambda e: P(e, e["ckpt"], e["data"], "--cases", "zz"),
     "--cases zz: not among"),
    ("evaluate missing pred", evaluate, lambda e: ["--data", e["data"], "--pred", "/nope", *OUT(e)],
     "--pred /nope is not a folder"),
    ("evaluate names count", evaluate, lambda e: ["--data", e["data"], "--pred", e["pred"], "--names", "a", "b",
     *OUT(e)], "--names gives 2 names for 1 --pred"),  # fmt: skip
    ("evaluate unknown unseen", evaluate, lambda e: ["--data", e["data"], "--pred", e["pred"], "--unseen", "X",
     *OUT(e)], "--unseen ['X'] are not among"),  # fmt: skip
    ("evaluate malformed split", evaluate, lambda e: ["--data", e["data"], "--pred", e["pred"], "--split-file",
     F(e, "bad.json"), *OUT(e)], "not a readable JSON split"),  # fmt: skip
    ("evaluate unknown label name", evaluate, lambda e: ["--data", e["data"], "--pred", e["pred"], "--label-rule",
     "DWI=core", *OUT(e)], "has no label 'core'"),  # fmt: skip
    ("evaluate shape mismatch", evaluate, lambda e: ["--data", e["data"], "--pred", e["pred"], *OUT(e)],
     "shape (16, 16, 20) differs from its reference (16, 16, 16)"),
    ("convert output not .pt", convert_checkpoint, lambda e: ["--gate", e["ckpt"], "--experts", e["ckpt"],
     "--modalities", "DWI", "--output", str(e["root"] / "out.txt")], "file name must end in .pt"),  # fmt: skip
    ("convert missing release", convert_checkpoint, lambda e: ["--release", "/nope", "--output",
     str(e["root"] / "out.pt")], "--release /nope is not a folder"),  # fmt: skip
    ("convert truncated", convert_checkpoint, lambda e: ["--gate", F(e, "truncated.pt"), "--experts",
     F(e, "truncated.pt"), "--modalities", "DWI", "--output", str(e["root"] / "out.pt")],
     "truncated.pt: not a readable checkpoint"),
]  # fmt: skip


@pytest.mark.parametrize("name,cli,argv,message", ROWS, ids=[r[0] for r in ROWS])
def test_bad_input_exit_2_one_line_nothing_written(env, capsys, name, cli, argv, message):
    for leftover in ("out", "out.pt", "out.txt"):  # a failed row must not fail the next ones
        shutil.rmtree(env["root"] / leftover, ignore_errors=True)
        (env["root"] / leftover).unlink(missing_ok=True)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: cli.main(argv(env)))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert message in err, err
    for leftover in ("out", "out.pt", "out.txt"):
        assert not (env["root"] / leftover).exists(), f"{name} left {leftover} behind"


def test_resume_refuses_other_flags_and_keeps_the_checkpoint(env, capsys, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(env["expert"], run)
    before = (run / "checkpoint.pt").read_bytes()
    args = ["--modality", "T1", "--data", env["data"], "--cache", env["cache"], *TINY, "--modalities", "DWI", "T1",
            "--out", str(run), "--resume"]  # fmt: skip
    with pytest.raises(SystemExit):
        run_cli(lambda: train_expert.main(args))
    err = capsys.readouterr().err
    assert "only continues the same run: --modalities: DWI -> DWI T1, --modality: DWI -> T1" in err, err
    assert (run / "checkpoint.pt").read_bytes() == before
    # the flags that may change, and a longer schedule, are accepted
    stale = run / ".tmp_checkpoint.pt.k1l2m3n4.pt"
    stale.write_bytes(b"left by a killed save")
    train_expert.main(T(env, "--epochs", "2", "--workers", "1", "--out", str(run), "--resume"))
    assert load_checkpoint(run / "checkpoint.pt")["epoch"] == 2 and not stale.exists()
    assert json.loads((run / "split.json").read_text())
