"""moe_missing end to end on tiny MS phantoms: train, exact resume, predict with a missing file, evaluate.

Run: .venv/bin/python -m pytest -q tests/test_moe_missing_pipeline.py
"""

import csv
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from moe_missing import evaluate, predict, train
from moe_missing.model import build_model
from shared.checkpoint import load_checkpoint
from shared.errors import InputError
from shared.phantom import write_phantom_datasets

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--features", "4", "8", "--patch", "16", "16", "16", "--batch-size", "2", "--folds", "2", "--device", "cpu",
        "--no-compile", "--log-every", "1", "--save-every", "100"]  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny convs: a second OpenMP thread only adds spin-waiting on a shared CPU (weight gradients 10x slower)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """4 MS phantoms (T1, T2, FLAIR) of 20^3 voxels; case 001 has no T1 file."""
    root = tmp_path_factory.mktemp("phantoms")
    (folder,) = write_phantom_datasets(root, datasets=["ms"], cases=4, shape=(20, 20, 20), seed=1)
    (folder / "imagesTr" / "PhantomMS_001_0000.nii.gz").unlink()
    return str(folder)


def _weights(path):
    return load_checkpoint(path)["model"]


def test_resume_is_exact_then_predict_and_evaluate(data, tmp_path):
    common = ["--data", data, "--steps", "4", *TINY]
    train.main([*common, "--out", str(tmp_path / "straight")])
    train.main([*common, "--out", str(tmp_path / "resumed"), "--stop-after", "2"])
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["step"] == 2
    train.main([*common, "--out", str(tmp_path / "resumed"), "--resume"])
    straight, resumed = (
        _weights(tmp_path / "straight" / "checkpoint.pt"),
        _weights(tmp_path / "resumed" / "checkpoint.pt"),
    )
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
    with open(tmp_path / "straight" / "log.csv") as f:
        log = list(csv.DictReader(f))
    assert [int(r["step"]) for r in log] == [1, 2, 3, 4]
    assert float(log[0]["reg"]) < 0 and float(log[0]["sd"]) > 0  # both terms of Eq. 7 are active

    model = str(tmp_path / "straight" / "checkpoint.pt")
    predict.main(["--model", model, "--input", data, "--output", str(tmp_path / "pred"), "--device", "cpu",
                  "--cases", "PhantomMS_000", "PhantomMS_001"])  # fmt: skip
    for case in ("PhantomMS_000", "PhantomMS_001"):  # 001 is predicted from T2 and FLAIR only
        image = nib.load(f"{data}/imagesTr/{case}_0001.nii.gz")
        out = nib.load(str(tmp_path / "pred" / f"{case}.nii.gz"))
        assert out.shape == image.shape and set(np.unique(np.asarray(out.dataobj))) <= {0, 1}
        np.testing.assert_allclose(out.affine, image.affine)

    md = tmp_path / "md"
    train.main(["--data", data, "--steps", "2", *TINY, "--out", str(md), "--no-moe", "--no-sd"])
    assert _weights(md / "checkpoint.pt").keys().isdisjoint({"stem.gate.weight"})
    evaluate.main(["--data", data, "--models", model, str(md / "checkpoint.pt"), "--names", "ours", "MD",
                   "--split", str(tmp_path / "straight" / "split.json"), "--out", str(tmp_path / "eval")])  # fmt: skip
    with open(tmp_path / "eval" / "table.csv") as f:
        table = list(csv.DictReader(f))
    val_cases = 2
    assert [r["config"] for r in table[:8]] == ["T1", "T2", "FLAIR", "T1+T2", "T1+FLAIR", "T2+FLAIR",
                                                "T1+T2+FLAIR", "all"]  # fmt: skip
    assert {r["model"] for r in table} == {"ours", "MD"} and int(table[7]["n"]) == 7 * val_cases
    with open(tmp_path / "eval" / "tests.csv") as f:
        tests = list(csv.DictReader(f))
    assert [(r["other"], r["metric"]) for r in tests] == [("MD", "dice"), ("MD", "cscore")]
    with open(tmp_path / "eval" / "gates.csv") as f:
        assert {r["model"] for r in csv.DictReader(f)} == {"ours"}  # MD has no MoE layer
    with open(tmp_path / "eval" / "per_case.csv") as f:
        per_case = list(csv.DictReader(f))
    assert list(per_case[0])[:3] == ["model", "config", "case"]
    assert {"hd95", "lesion_f1", "n_gt_lesions", "n_pred_lesions", "cscore"} <= set(per_case[0])


def test_anisotropic_input_and_plain_folder_come_back_in_the_native_grid(data, tmp_path):
    model_dir = tmp_path / "dm"
    train.main(["--data", data, "--steps", "1", *TINY, "--out", str(model_dir), "--dedicated", "011"])
    ckpt = load_checkpoint(model_dir / "checkpoint.pt")
    assert ckpt["dedicated"] == "011" and not any("gate" in k for k in ckpt["model"])  # the plain UNet
    (aniso,) = write_phantom_datasets(tmp_path / "aniso", datasets=["ms"], cases=1, shape=(16, 16, 16), seed=2,
                                      spacing=(1.5, 1.5, 2.5))  # fmt: skip
    folder = tmp_path / "scans"
    folder.mkdir()
    for channel in (1, 2):  # a plain folder without dataset.json and without the T1 file
        src = aniso / "imagesTr" / f"PhantomMS_000_{channel:04d}.nii.gz"
        (folder / src.name).write_bytes(src.read_bytes())
    predict.main(["--model", str(model_dir / "checkpoint.pt"), "--input", str(folder), "--output",
                  str(tmp_path / "out"), "--device", "cpu"])  # fmt: skip
    image = nib.load(str(folder / "PhantomMS_000_0001.nii.gz"))
    out = nib.load(str(tmp_path / "out" / "PhantomMS_000.nii.gz"))
    assert out.shape == (16, 16, 16)
    np.testing.assert_allclose(out.affine, image.affine)


def test_bad_arguments_are_refused_with_one_sentence(data, tmp_path):
    with pytest.raises(InputError, match="--dedicated 12 must be 3 digits 0/1"):
        train.parse_args(["--data", data, "--out", str(tmp_path), "--dedicated", "12"])
    with pytest.raises(InputError, match="--fixed-code was removed.*use --dedicated CODE"):
        train.parse_args(["--data", data, "--out", str(tmp_path), "--fixed-code", "101"])
    with pytest.raises(InputError, match="must be divisible by 2"):
        train.parse_args(["--data", data, "--out", str(tmp_path), "--features", "4", "8", "--patch", "15", "16", "16"])
    with pytest.raises(InputError, match="must name distinct channels"):
        train.parse_args(["--data", data, "--out", str(tmp_path), "--modalities", "T1", "DWI"])
    with pytest.raises(InputError, match="no dataset.json found"):
        train.parse_args(["--data", str(tmp_path), "--out", str(tmp_path)])


def test_cli_exit_code_and_message_on_broken_checkpoint(data, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    result = subprocess.run([sys.executable, "-m", "moe_missing.predict", "--model", str(broken), "--input", data,
                             "--output", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and str(broken) in result.stderr
    assert not (tmp_path / "out").exists()


def test_dedicated_model_has_exactly_the_parameters_of_no_moe(data, tmp_path):
    common = ["--data", data, "--out", str(tmp_path), "--features", "4", "8"]
    dedicated = train.parse_args([*common, "--dedicated", "101"])
    plain = train.parse_args([*common, "--no-moe"])
    assert train.config_from_args(dedicated) == train.config_from_args(plain)
    assert dedicated.no_sd and dedicated.no_reg  # one view, no MoE layer: neither L_sd nor L_reg
    shapes = {k: v.shape for k, v in build_model(train.config_from_args(dedicated)).state_dict().items()}
    assert shapes == {k: v.shape for k, v in build_model(train.config_from_args(plain)).state_dict().items()}
    assert build_model(train.config_from_args(dedicated)).moe_layers() == []
