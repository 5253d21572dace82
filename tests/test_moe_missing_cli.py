"""Bad input to every moe_missing CLI (train, predict, evaluate, demo): one line on stderr, exit 2, no traceback,
nothing written. A table of (CLI, bad input, what the sentence must name), run in-process through run_cli.

Run: .venv/bin/python -m pytest -q tests/test_moe_missing_cli.py
"""

import re
import shutil

import nibabel as nib
import numpy as np
import pytest
import torch

from moe_missing import demo, evaluate, predict, train
from shared.checkpoint import save_checkpoint
from shared.cli import run_cli
from shared.phantom import write_phantom_datasets

TINY = ["--features", "4", "8", "--patch", "16", "16", "16", "--batch-size", "2", "--folds", "2", "--device", "cpu",
        "--no-compile", "--val-every", "0", "--workers", "0"]  # fmt: skip


class Pickled:
    """Not a tensor, number or string: torch.load(weights_only=True) refuses it."""


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    (data,) = write_phantom_datasets(root / "raw", datasets=["ms"], cases=2, shape=(16, 16, 16), seed=4)
    p = {"data": str(data), "cache": str(root / "cache"), "root": root, "run": str(root / "run")}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    train.main(["--data", p["data"], "--steps", "1", *TINY, "--cache", p["cache"], "--out", p["run"]])
    torch.set_num_threads(threads)
    p["ckpt"] = p["run"] + "/checkpoint.pt"
    for name, change in (("bad_json", "json"), ("truncated", "nifti"), ("nan", "nan")):
        copy = root / name / data.name
        shutil.copytree(data, copy)
        image = copy / "imagesTr" / "PhantomMS_000_0000.nii.gz"
        if change == "json":
            (copy / "dataset.json").write_text("{not json")
        elif change == "nifti":
            image.write_bytes(image.read_bytes()[:200])
        else:
            vol = nib.load(str(image))
            values = np.asarray(vol.dataobj, dtype=np.float32)
            values[3, 3, 3] = np.nan
            nib.save(nib.Nifti1Image(values, vol.affine), str(image))
        p[name] = str(copy)
    blob = open(p["ckpt"], "rb").read()
    (root / "truncated.pt").write_bytes(blob[: len(blob) // 2])
    torch.save(torch.load(p["ckpt"], weights_only=True)["model"], root / "plain.pt")  # a bare state_dict
    save_checkpoint(root / "mome.pt", kind="mome", model={}, config={})
    torch.save({"object": Pickled()}, root / "pickled.pt")
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 8, 2), np.float32), np.eye(4)), str(root / "four_d.nii.gz"))
    (root / "a_file.txt").write_text("not a folder")
    (root / "broken_split.json").write_text("[1, 2")
    return p


TRAIN = ["--data", "{data}", *TINY, "--cache", "{cache}", "--out", "{out}"]
PREDICT = ["--model", "{ckpt}", "--input", "{data}", "--split", "Tr", "--device", "cpu", "--output", "{out}"]
EVALUATE = ["--data", "{data}", "--models", "{run}", "--device", "cpu", "--out", "{out}"]
DEMO = ["--data", "{root}/demo_data", "--runs", "{out}", "--device", "cpu"]

ROWS = [  # (CLI, what is wrong, argv, what the one sentence must say)
    (train, "missing --data", ["--data", "{root}/nope", *TRAIN[2:]], "no dataset.json found"),
    (train, "malformed dataset.json", ["--data", "{bad_json}", *TRAIN[2:]], "is not valid JSON"),
    (train, "truncated NIfTI", ["--data", "{truncated}", *TRAIN[2:]], "not a readable NIfTI file"),
    (train, "NaN voxels", ["--data", "{nan}", *TRAIN[2:]], "voxels are NaN or Inf"),
    (train, "--features 0", [*TRAIN, "--features", "0", "8"], "--features: must be a positive integer"),
    (train, "one UNet level", [*TRAIN, "--features", "8"], "at least 2 widths"),
    (train, "--gate-noise -1", [*TRAIN, "--gate-noise", "-1"], "--gate-noise: must be a non-negative number"),
    (train, "--lr 0", [*TRAIN, "--lr", "0"], "--lr: must be a positive number"),
    (train, "--experts 0", [*TRAIN, "--experts", "0"], "--experts: must be a positive integer"),
    (train, "--tau 0", [*TRAIN, "--tau", "0"], "--tau: must be a positive number"),
    (train, "--fg-prob 2", [*TRAIN, "--fg-prob", "2"], "--fg-prob: must be a probability"),
    (train, "--batch-size 0", [*TRAIN, "--batch-size", "0"], "--batch-size: must be a positive integer"),
    (train, "--steps 0", [*TRAIN, "--steps", "0"], "--steps: must be a positive integer"),
    (train, "--steps 1.5", [*TRAIN, "--steps", "1.5"], "--steps: expected an integer"),
    (train, "--val-every -1", [*TRAIN, "--val-every", "-1"], "--val-every: must be a non-negative integer"),
    (train, "--val-overlap 1", [*TRAIN, "--val-overlap", "1"], "--val-overlap: must be a fraction in"),
    (train, "--workers -1", [*TRAIN, "--workers", "-1"], "--workers: must be a non-negative integer"),
    (train, "--fold out of range", [*TRAIN, "--fold", "5"], "--fold must be -1 or in"),
    (train, "patch not divisible", [*TRAIN, "--patch", "15", "16", "16"], "must be divisible by 2"),
    (train, "--dedicated 12", [*TRAIN, "--dedicated", "12"], "--dedicated 12 must be 3 digits"),
    (train, "--fixed-code", [*TRAIN, "--fixed-code", "101"], "--fixed-code was removed"),
    (train, "unknown modality", [*TRAIN, "--modalities", "DWI"], "has no channel \\['DWI'\\]"),
    (train, "--out is a file", [*TRAIN[:-1], "{root}/a_file.txt"], "is a file, expected a folder"),
    (
        train,
        "--resume, other flags",
        [*TRAIN[:-1], "{run}", "--steps", "1", "--resume", "--lr", "0.5"],
        "only continues the same run: --lr: 0.0001 -> 0.5",
    ),
    (train, "checkpoint without --resume", [*TRAIN[:-1], "{run}", "--steps", "1"], "already holds checkpoint.pt"),
    (predict, "missing checkpoint", ["--model", "{root}/none.pt", *PREDICT[2:]], "checkpoint file not found"),
    (predict, "truncated checkpoint", ["--model", "{root}/truncated.pt", *PREDICT[2:]], "not a readable checkpoint"),
    (predict, "bare state_dict", ["--model", "{root}/plain.pt", *PREDICT[2:]], "plain state_dict.*pass the checkpoint"),
    (
        predict,
        "other package",
        ["--model", "{root}/mome.pt", *PREDICT[2:]],
        "is a mome checkpoint, expected moe_missing",
    ),
    (predict, "pickled object", ["--model", "{root}/pickled.pt", *PREDICT[2:]], "not a readable checkpoint"),
    (predict, "missing --input", [*PREDICT[:2], "--input", "{root}/nope", *PREDICT[4:]], "does not exist"),
    (predict, "4-D image", [*PREDICT[:2], "--input", "{root}/four_d.nii.gz", *PREDICT[4:]], "expected a 3D volume"),
    (predict, "truncated NIfTI", [*PREDICT[:2], "--input", "{truncated}", *PREDICT[4:]], "not a readable NIfTI"),
    (predict, "--output is a file", [*PREDICT[:-1], "{root}/a_file.txt"], "is a file, expected a folder"),
    (predict, "--patch not divisible", [*PREDICT, "--patch", "15", "16", "16"], "must be divisible by 2"),
    (predict, "--overlap 1", [*PREDICT, "--overlap", "1"], "--overlap: must be a fraction in"),
    (predict, "--tiles-per-batch 0", [*PREDICT, "--tiles-per-batch", "0"], "must be a positive integer"),
    (predict, "--use DWI", [*PREDICT, "--use", "DWI"], "--use \\['DWI'\\]"),
    (predict, "unknown case", [*PREDICT, "--cases", "nobody"], "--cases nobody: not among"),
    (evaluate, "missing run", ["--data", "{data}", "--models", "{root}/none", *EVALUATE[4:]], "not found"),
    (
        evaluate,
        "bare state_dict",
        ["--data", "{data}", "--models", "{root}/plain.pt", *EVALUATE[4:]],
        "plain state_dict",
    ),
    (evaluate, "missing --data", ["--data", "{root}/nope", *EVALUATE[2:]], "dataset.json not found"),
    (evaluate, "--names count", [*EVALUATE, "--names", "a", "b"], "--names gives 2 names for 1"),
    (evaluate, "--ours unknown", [*EVALUATE, "--ours", "x"], "--ours x is not one of"),
    (evaluate, "--held-out and --split", [*EVALUATE, "--held-out", "--split", "{run}/split.json"], "--held-out"),
    (evaluate, "--out is a file", [*EVALUATE[:-1], "{root}/a_file.txt"], "is a file, expected a folder"),
    (evaluate, "--min-lesion-volume -1", [*EVALUATE, "--min-lesion-volume", "-1"], "must be a non-negative"),
    (evaluate, "--overlap 1.5", [*EVALUATE, "--overlap", "1.5"], "--overlap: must be a fraction in"),
    (evaluate, "--connectivity 7", [*EVALUATE, "--connectivity", "7"], "invalid choice"),
    (evaluate, "malformed --split", [*EVALUATE, "--split", "{root}/broken_split.json"], "not a readable JSON"),
    (evaluate, "unknown case", [*EVALUATE, "--cases", "nobody"], "nobody of the selection are not labelled"),
    (demo, "--steps 0", [*DEMO, "--steps", "0"], "--steps: must be a positive integer"),
    (demo, "--threads 0", [*DEMO, "--threads", "0"], "--threads: must be a positive integer"),
    (demo, "--runs is a file", [*DEMO[:3], "{root}/a_file.txt", *DEMO[4:]], "is a file, expected a folder"),
]


@pytest.mark.parametrize(
    "cli, what, argv, message", ROWS, ids=[f"{r[0].__name__.split('.')[-1]}: {r[1]}" for r in ROWS]
)
def test_bad_input_is_one_sentence_exit_2_and_writes_nothing(paths, tmp_path, capsys, cli, what, argv, message):
    out = tmp_path / "out"
    ckpt_before = open(paths["ckpt"], "rb").read()
    argv = [a.format(**paths, out=out) for a in argv]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: cli.main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert re.search(message, err), f"{what}: {err}"
    assert not out.exists()  # nothing written where the output would have gone
    assert open(paths["ckpt"], "rb").read() == ckpt_before  # the trained run is untouched
    assert not (paths["root"] / "demo_data").exists()
