"""Bad input to the sam_med3d_moe CLIs, table-driven: each row ends in exit status 2 with one line on stderr,
no traceback, and no output file or folder left behind.

Run: pytest tests/test_sam_med3d_moe_bad_input.py
"""

import argparse
import gzip
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sam_med3d_moe import convert_checkpoint, evaluate, finetune_expert, predict, train, train_gate
from sam_med3d_moe.config import config_by_name
from sam_med3d_moe.model import build_model
from shared.checkpoint import save_checkpoint
from shared.cli import run_cli
from shared.phantom import write_phantom_datasets

RUN = ["--config", "tiny", "--steps", "1", "--folds", "2", "--num-clicks", "2", "--batch-size", "1", "--device",
       "cpu", "--workers", "0", "--modalities", "T1"]  # fmt: skip


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 2-case 16^3 anatomy phantom, a model (plain state_dict of the tiny config) and broken copies of both."""
    root = tmp_path_factory.mktemp("bad_input")
    (good,) = write_phantom_datasets(root / "raw", datasets=["anatomy"], cases=2, shape=(16, 16, 16), seed=3)
    good = Path(good)
    image = sorted((good / "imagesTr").glob("*_0000.nii.gz"))[0]
    model = root / "tiny.pt"
    save_checkpoint(model, **build_model(config_by_name("tiny")).state_dict())
    w = {"root": root, "data": good, "image": image, "model": model, "cache": root / "cache"}

    def broken(name, edit):
        copy = root / name / good.name
        shutil.copytree(good, copy)
        edit(copy)
        return copy

    def rewrite(path, data, affine=None):
        img = nib.load(path)
        nib.save(nib.Nifti1Image(data, img.affine if affine is None else affine), path)

    def first_label(d):
        return sorted((d / "labelsTr").glob("*.nii.gz"))[0]

    def first_image(d):
        return sorted((d / "imagesTr").glob("*_0000.nii.gz"))[0]

    w["nan_data"] = broken("nan", lambda d: rewrite(first_image(d), np.full((16, 16, 16), np.nan, np.float32)))
    w["undeclared"] = broken("undeclared", lambda d: rewrite(first_label(d), np.full((16, 16, 16), 9, np.uint8)))
    w["shape_mismatch"] = broken("shape", lambda d: rewrite(first_label(d), np.zeros((16, 16, 15), np.uint8)))
    w["bad_json"] = broken("json", lambda d: (d / "dataset.json").write_text("{not json"))
    truncated = root / "truncated.nii.gz"
    truncated.write_bytes(gzip.compress(image.read_bytes())[:200])
    w["truncated_image"] = truncated
    four_d = root / "four_d.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((16, 16, 16, 2), np.float32), np.eye(4)), four_d)
    w["four_d"] = four_d
    nan_image = root / "nan_image.nii.gz"
    nib.save(nib.Nifti1Image(np.full((16, 16, 16), np.nan, np.float32), nib.load(image).affine), nan_image)
    w["nan_image"] = nan_image
    moved = root / "moved_label.nii.gz"
    nib.save(nib.Nifti1Image(np.ones((16, 16, 16), np.uint8), np.diag([2.0, 2.0, 2.0, 1.0])), moved)
    w["moved_label"] = moved
    w["truncated_ckpt"] = root / "truncated.pt"
    w["truncated_ckpt"].write_bytes(model.read_bytes()[:100])
    w["pickled"] = root / "pickled.pt"
    torch.save({"model_state_dict": {}, "args": argparse.Namespace(lr=1.0)}, w["pickled"])
    w["other_kind"] = root / "mome.pt"
    save_checkpoint(w["other_kind"], kind="mome", model={}, config={})
    w["malformed_prompts"] = root / "prompts.json"
    w["malformed_prompts"].write_text('{"case": [{"points": [[1, 2, 3]]}')
    w["run_dir"] = root / "existing_run"
    w["run_dir"].mkdir()
    save_checkpoint(w["run_dir"] / "checkpoint.pt", kind="sam_med3d", model={})
    w["split"] = root / "split.json"
    w["split"].write_text(json.dumps({good.name: {"train": ["x"]}}))
    w["a_file"] = root / "a_file.txt"
    w["a_file"].write_text("not a folder")
    return w


def _predict(w, out, *extra):
    return [predict.main, ["--model", str(w["model"]), "--config", "tiny", "--image", str(w["image"]), "--device",
                           "cpu", "--output", str(out), *extra]]  # fmt: skip


# name: (builder(world, out) -> [main, argv], a fragment of the one-line message)
ROWS = {
    "predict missing image": (lambda w, o: [predict.main, ["--model", str(w["model"]), "--image",
                              str(w["root"] / "nope.nii.gz"), "--point", "1", "1", "1", "--output", str(o)]],
                              "does not exist"),
    "predict missing model": (lambda w, o: [predict.main, ["--model", str(w["root"] / "nope.pt"), "--image",
                              str(w["image"]), "--point", "1", "1", "1", "--output", str(o)]], "not found"),
    "predict truncated NIfTI": (lambda w, o: [predict.main, ["--model", str(w["model"]), "--config", "tiny",
                                "--image", str(w["truncated_image"]), "--point", "1", "1", "1", "--output", str(o)]],
                                "not a readable NIfTI"),
    "predict 4-D image": (lambda w, o: [predict.main, ["--model", str(w["model"]), "--config", "tiny", "--image",
                          str(w["four_d"]), "--point", "1", "1", "1", "--device", "cpu", "--output", str(o)]],
                          "expected a 3D volume"),
    "predict NaN voxels": (lambda w, o: [predict.main, ["--model", str(w["model"]), "--config", "tiny", "--image",
                           str(w["nan_image"]), "--point", "1", "1", "1", "--device", "cpu", "--output", str(o)]],
                           "NaN or Inf"),
    "predict label affine mismatch": (lambda w, o: _predict(w, o, "--label", str(w["moved_label"])),
                                      "affine differs"),
    "predict truncated checkpoint": (lambda w, o: [predict.main, ["--model", str(w["truncated_ckpt"]), "--image",
                                     str(w["image"]), "--point", "1", "1", "1", "--output", str(o)]],
                                     "not a readable checkpoint"),
    "predict pickled object": (lambda w, o: [predict.main, ["--model", str(w["pickled"]), "--image", str(w["image"]),
                               "--point", "1", "1", "1", "--output", str(o)]], "not a readable checkpoint"),
    "predict wrong-package checkpoint": (lambda w, o: [predict.main, ["--model", str(w["other_kind"]), "--image",
                                         str(w["image"]), "--point", "1", "1", "1", "--output", str(o)]],
                                         "is a mome checkpoint"),
    "predict malformed prompts JSON": (lambda w, o: _predict(w, o.parent / "folder", "--prompts",
                                       str(w["malformed_prompts"])), "prompts.json: not a readable JSON prompt file"),
    "predict output is the images' folder": (lambda w, o: _predict(w, w["image"].parent, "--point", "1", "1", "1"),
                                             "is a folder of the input images"),
    "predict zero max crops": (lambda w, o: _predict(w, o, "--point", "1", "1", "1", "--max-crops", "0"),
                               "--max-crops: must be a positive integer"),
    "predict negative spacing": (lambda w, o: _predict(w, o, "--point", "1", "1", "1", "--spacing", "-1.5"),
                                 "--spacing: must be a positive number"),
    "train missing data": (lambda w, o: [train.main, ["--data", str(w["root"] / "nope"), "--out", str(o), *RUN]],
                           "no dataset.json"),
    "train malformed dataset.json": (lambda w, o: [train.main, ["--data", str(w["bad_json"]), "--out", str(o),
                                     *RUN]], "dataset.json"),
    "train NaN voxels": (lambda w, o: [train.main, ["--data", str(w["nan_data"]), "--out", str(o), "--cache",
                         str(w["cache"]), *RUN]], "NaN or Inf"),
    "train undeclared label": (lambda w, o: [train.main, ["--data", str(w["undeclared"]), "--out", str(o),
                               "--cache", str(w["cache"]), *RUN]], "label"),
    "train shape mismatch": (lambda w, o: [train.main, ["--data", str(w["shape_mismatch"]), "--out", str(o),
                             "--cache", str(w["cache"]), *RUN]], "shape"),
    "train existing run": (lambda w, o: [train.main, ["--data", str(w["data"]), "--out", str(w["run_dir"]), *RUN]],
                           "already holds checkpoint.pt"),
    "train zero lr": (lambda w, o: [train.main, ["--data", str(w["data"]), "--out", str(o), "--lr", "0", *RUN]],
                      "--lr: must be a positive number"),
    "train negative weight decay": (lambda w, o: [train.main, ["--data", str(w["data"]), "--out", str(o),
                                    "--weight-decay", "-1", *RUN]], "--weight-decay: must be a non-negative"),
    "finetune_expert general of another package": (lambda w, o: [finetune_expert.main, [
        "--general", str(w["other_kind"]), "--data", str(w["data"]), "--out", str(o), *RUN]],
        "is a mome checkpoint"),
    "train_gate expert is a plain state_dict": (lambda w, o: [train_gate.main, ["--general", str(w["model"]),
                                                "--experts", str(w["model"]), "--data", str(w["data"]), "--out",
                                                str(o), *RUN]], "is a plain state_dict"),
    "train_gate tau 1": (lambda w, o: [train_gate.main, ["--general", "g", "--experts", "e", "--data", str(w["data"]),
                         "--out", str(o), "--tau", "1", *RUN]], "--tau: must be a threshold in [0, 1)"),
    "evaluate malformed split": (lambda w, o: [evaluate.main, ["--model", str(w["model"]), "--config", "tiny",
                                 "--data", str(w["data"]), "--split", str(w["split"]), "--out", str(o)]],
                                 'expected {"train": [...], "val": [...]}'),
    "evaluate out is a file": (lambda w, o: [evaluate.main, ["--model", str(w["model"]), "--config", "tiny",
                               "--data", str(w["data"]), "--out", str(w["a_file"])]], "is a file"),
    "convert without trust": (lambda w, o: [convert_checkpoint.main, ["--input", str(w["pickled"]), "--output",
                              str(o)]], "--trust-pickle"),
    "convert output is the input": (lambda w, o: [convert_checkpoint.main, ["--input", str(w["model"]), "--output",
                                    str(w["model"]), "--force"]], "is the --input file"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(ROWS))
def test_bad_input_is_one_line_exit_2_and_leaves_nothing(world, tmp_path, capsys, name):
    build, fragment = ROWS[name]
    out = tmp_path / "out" / "result.nii.gz" if name.startswith("predict") else tmp_path / "out"
    main, argv = build(world, out)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    assert fragment in err, err
    assert not (tmp_path / "out").exists() and not (out.parent / "folder").exists()
