"""Every user-facing CLI x every bad input of issue 15 item 7: exit 2, one line `error: ...` on stderr, no traceback,
no file or folder left behind. The per-package tables test more flags; this is the uniform matrix across packages.

Run: OMP_NUM_THREADS=1 .venv/bin/python -m pytest -q tests/test_cli_bad_input.py
"""

import argparse
import gzip
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import brainsegfounder.convert_checkpoint
import brainsegfounder.evaluate
import brainsegfounder.fewshot
import brainsegfounder.finetune
import brainsegfounder.predict
import brainsegfounder.pretrain
import moe_missing.evaluate
import moe_missing.predict
import moe_missing.train
import mome.convert_checkpoint
import mome.evaluate
import mome.predict
import mome.train
import mome.train_expert
import sam_med3d_moe.convert_checkpoint
import sam_med3d_moe.evaluate
import sam_med3d_moe.finetune_expert
import sam_med3d_moe.predict
import sam_med3d_moe.train
import sam_med3d_moe.train_gate
import shared.evaluate
import shared.phantom
from shared.cli import run_cli
from shared.phantom import write_phantom_datasets

LAST = "PhantomMS_002"  # the broken case of every broken dataset: the others may be read (and written) first
MOME = [
    "--modalities",
    "T1",
    "--features",
    "4",
    "8",
    "--patch",
    "16",
    "16",
    "16",
    "--batch-size",
    "1",
    "--steps-per-epoch",
    "1",
    "--epochs",
    "1",
    "--fold",
    "-1",
    "--device",
    "cpu",
    "--no-compile",
    "--workers",
    "0",
]
MOE = [
    "--features",
    "4",
    "8",
    "--patch",
    "16",
    "16",
    "16",
    "--experts",
    "2",
    "--batch-size",
    "1",
    "--steps",
    "1",
    "--fold",
    "-1",
    "--val-every",
    "0",
    "--device",
    "cpu",
    "--no-compile",
    "--workers",
    "0",
]
BSF = [
    "--channels",
    "T1",
    "T2",
    "FLAIR",
    "--patch",
    "64",
    "32",
    "32",
    "--batch-size",
    "1",
    "--steps",
    "1",
    "--warmup",
    "0",
    "--feature-size",
    "12",
    "--window-size",
    "4",
    "--log-every",
    "1",
    "--device",
    "cpu",
    "--workers",
    "0",
]
SAM = ["--modalities", "T1", "--steps", "1", "--fold", "-1", "--num-clicks", "2", "--batch-size", "1", "--device",
       "cpu", "--workers", "0"]  # fmt: skip

# CLI name -> (main, argv with {slots}, default slot values); a slot value names a key of the world fixture
CLIS = {
    "shared.evaluate": (shared.evaluate.main, ["--pred", "{pred}", "--gt", "{gt}", "--out", "{out}"],
                        {"pred": "{pred_good}", "gt": "{ms}/labelsTr", "out": "{out_csv}"}),
    "shared.phantom": (shared.phantom.main, ["--out", "{out}", "--datasets", "ms", "--cases", "1", "--shape", "16",
                       "16", "16"], {"out": "{out_dir}"}),
    "mome.train_expert": (mome.train_expert.main, ["--modality", "T1", "--data", "{data}", "--out", "{out}", *MOME],
                          {"data": "{ms}", "out": "{out_dir}"}),
    "mome.train": (mome.train.main, ["--data", "{data}", "--experts", "{model}", "--out", "{out}", *MOME],
                   {"data": "{ms}", "model": "{mome_ckpt}", "out": "{out_dir}"}),
    "mome.predict": (mome.predict.main, ["--model", "{model}", "--input", "{input}", "--split", "Tr", "--output",
                     "{out}", "--device", "cpu"], {"model": "{mome_ckpt}", "input": "{ms}", "out": "{out_dir}"}),
    "mome.evaluate": (mome.evaluate.main, ["--data", "{data}", "--pred", "{pred}", "--out", "{out}"],
                      {"data": "{ms}", "pred": "{mome_pred_good}", "out": "{out_dir}"}),
    "mome.convert_checkpoint": (mome.convert_checkpoint.main, ["--gate", "{model}", "--experts", "{model}",
                                "--modalities", "T1", "--patch", "16", "16", "16", "--output", "{out}"],
                                {"model": "{mome_ckpt}", "out": "{out_pt}"}),
    "moe_missing.train": (moe_missing.train.main, ["--data", "{data}", "--out", "{out}", *MOE],
                          {"data": "{ms}", "out": "{out_dir}"}),
    "moe_missing.predict": (moe_missing.predict.main, ["--model", "{model}", "--input", "{input}", "--split", "Tr",
                            "--output", "{out}", "--device", "cpu"],
                            {"model": "{moe_ckpt}", "input": "{ms}", "out": "{out_dir}"}),
    "moe_missing.evaluate": (moe_missing.evaluate.main, ["--data", "{data}", "--models", "{model}", "--device", "cpu",
                             "--out", "{out}"], {"data": "{ms}", "model": "{moe_ckpt}", "out": "{out_dir}"}),
    "brainsegfounder.pretrain": (brainsegfounder.pretrain.main, ["--data", "{data}", "--out", "{out}", "--fold", "-1",
                                 *BSF],
                                 {"data": "{ms}", "out": "{out_dir}"}),
    "brainsegfounder.finetune": (brainsegfounder.finetune.main, ["--data", "{data}", "--out", "{out}", "--target",
                                 "binary", "--fold", "-1", *BSF], {"data": "{ms}", "out": "{out_dir}"}),
    "brainsegfounder.fewshot": (brainsegfounder.fewshot.main, ["{arm}", "{arm2}", "--out", "{out}"],
                                {"arm": "{bsf_run}", "arm2": "{bsf_run}", "out": "{out_csv}"}),
    "brainsegfounder.predict": (brainsegfounder.predict.main, ["--model", "{model}", "--input", "{input}", "--split",
                                "Tr", "--output", "{out}", "--device", "cpu"],
                                {"model": "{bsf_ckpt}", "input": "{ms}", "out": "{out_dir}"}),
    "brainsegfounder.evaluate": (brainsegfounder.evaluate.main, ["--pred", "{pred}", "--gt", "{gt}", "--task", "atlas",
                                 "--out", "{out}"], {"pred": "{pred_good}", "gt": "{ms}/labelsTr", "out": "{out_csv}"}),
    "brainsegfounder.convert_checkpoint": (brainsegfounder.convert_checkpoint.main, ["{model}", "--out", "{out}"],
                                           {"model": "{bsf_ckpt}", "out": "{out_pt}"}),
    "sam_med3d_moe.train": (sam_med3d_moe.train.main, ["--data", "{data}", "--out", "{out}", "--config", "tiny", *SAM],
                            {"data": "{ms}", "out": "{out_dir}"}),
    "sam_med3d_moe.finetune_expert": (sam_med3d_moe.finetune_expert.main, ["--general", "{model}", "--data", "{data}",
                                      "--out", "{out}", *SAM], {"model": "{sam_ckpt}", "data": "{ms}",
                                      "out": "{out_dir}"}),
    "sam_med3d_moe.train_gate": (sam_med3d_moe.train_gate.main, ["--general", "{model}", "--experts", "{experts}",
                                 "--data", "{data}", "--out", "{out}", *SAM],
                                 {"model": "{sam_ckpt}", "experts": "{sam_expert_ckpt}", "data": "{ms}",
                                  "out": "{out_dir}"}),
    "sam_med3d_moe.predict": (sam_med3d_moe.predict.main, ["--model", "{model}", "--input", "{input}", "--output",
                              "{out}", "--device", "cpu"],
                              {"model": "{sam_ckpt}", "input": "{ms}/imagesTr/" + LAST + "_0000.nii.gz",
                               "out": "{out_nii}"}),
    "sam_med3d_moe.evaluate": (sam_med3d_moe.evaluate.main, ["--model", "{model}", "--data", "{data}",
                               "--modalities", "T1", "--clicks", "1", "--device", "cpu", "--out", "{out}"],
                               {"model": "{sam_ckpt}", "data": "{ms}", "out": "{out_dir}"}),
    "sam_med3d_moe.convert_checkpoint": (sam_med3d_moe.convert_checkpoint.main, ["--input", "{model}", "--output",
                                         "{out}", "--config", "tiny"], {"model": "{sam_ckpt}", "out": "{out_pt}"}),
}  # fmt: skip

IMAGE = "/imagesTr/" + LAST + "_0000.nii.gz"  # the broken image of a broken dataset, for single-file inputs
LABEL = "/labelsTr/" + LAST + ".nii.gz"
CLICK = ["--point", "8", "8", "8"]
NOT_JSON = r"not (valid|readable) JSON|not a readable JSON"
BAD_CKPT = r"not a readable checkpoint"


def row(cli, category, message, extra=(), **slots):
    """One row: `cli` run with its default slots replaced by `slots` and `extra` flags appended; the one line
    on stderr must match the regex `message`."""
    return pytest.param(cli, slots, list(extra), message, id=f"{cli}: {category}")


ROWS = [
    # shared.evaluate: --pred and --gt folders of label maps
    row("shared.evaluate", "missing path", r"--pred .*nope: not a folder", pred="{nope}"),
    row("shared.evaluate", "malformed split file", NOT_JSON, extra=["--split", "{bad_json}"]),
    row("shared.evaluate", "truncated NIfTI", r"not a readable NIfTI", pred="{pred_truncated}"),
    row("shared.evaluate", "4-D image", r"expected a 3D volume", pred="{pred_four_d}"),
    row("shared.evaluate", "NaN voxels", r"NaN or Inf", pred="{pred_nan}"),
    row("shared.evaluate", "undeclared label", r"label values? \[?7\]? .*not declared", gt="{undeclared}/labelsTr"),
    row("shared.evaluate", "shape mismatch", r"shape .* differs", pred="{pred_shape}"),
    row("shared.evaluate", "affine mismatch", r"affine differs", pred="{pred_affine}"),
    row(
        "shared.evaluate",
        "zero flag",
        r"--brats-labels: must be a positive integer",
        extra=["--regions", "brats", "--brats-labels", "0", "1", "2"],
    ),  # fmt: skip
    row("shared.evaluate", "negative flag", r"--labels: must be a non-negative integer", extra=["--labels", "-1"]),
    row("shared.evaluate", "existing output path", r"--out .* is a folder", out="{dir_csv}"),
    # shared.phantom
    row("shared.phantom", "malformed dataset.json", r"dataset made with other settings", out="{bad_json_parent}"),
    row("shared.phantom", "zero flag", r"--cases", extra=["--cases", "0"]),
    row("shared.phantom", "negative flag", r"--spacing", extra=["--spacing", "-1", "1", "1"]),
    row("shared.phantom", "existing output path", r"--out .* is a file", out="{a_file}"),
    # mome.train_expert
    row("mome.train_expert", "missing path", r"--data .*nope: no dataset.json", data="{nope}"),
    row("mome.train_expert", "malformed dataset.json", NOT_JSON, data="{bad_json}"),
    row("mome.train_expert", "malformed split file", NOT_JSON, extra=["--split-file", "{bad_json_file}"]),
    row("mome.train_expert", "truncated NIfTI", r"not a readable NIfTI", data="{truncated}"),
    row("mome.train_expert", "4-D image", r"expected a 3D volume", data="{four_d}"),
    row("mome.train_expert", "NaN voxels", r"NaN or Inf", data="{nan}"),
    row("mome.train_expert", "undeclared label", r"label values \[7\] are not declared", data="{undeclared}"),
    row("mome.train_expert", "shape mismatch", r"shape .* differs", data="{shape_label}"),
    row("mome.train_expert", "affine mismatch", r"affine differs", data="{affine_label}"),
    row(
        "mome.train_expert",
        "wrong-package checkpoint",
        r"is a moe_missing checkpoint",
        out="{resume_moe}",
        extra=["--resume"],
    ),
    row("mome.train_expert", "truncated checkpoint", BAD_CKPT, out="{resume_truncated}", extra=["--resume"]),
    row("mome.train_expert", "pickled object", BAD_CKPT, out="{resume_pickled}", extra=["--resume"]),
    row(
        "mome.train_expert",
        "zero flag",
        r"--steps-per-epoch: must be a positive integer",
        extra=["--steps-per-epoch", "0"],
    ),
    row(
        "mome.train_expert", "negative flag", r"--weight-decay: must be a non-negative", extra=["--weight-decay", "-1"]
    ),
    row("mome.train_expert", "existing output path", r"--out .* is a file", out="{a_file}"),
    # mome.train (phase 2: --experts from phase 1)
    row("mome.train", "missing path", r"nope.pt", model="{nope_pt}"),
    row("mome.train", "malformed dataset.json", NOT_JSON, data="{bad_json}"),
    row("mome.train", "malformed split file", NOT_JSON, extra=["--split-file", "{bad_json_file}"]),
    row("mome.train", "truncated NIfTI", r"not a readable NIfTI", data="{truncated}"),
    row("mome.train", "4-D image", r"expected a 3D volume", data="{four_d}"),
    row("mome.train", "NaN voxels", r"NaN or Inf", data="{nan}"),
    row("mome.train", "undeclared label", r"label values \[7\] are not declared", data="{undeclared}"),
    row("mome.train", "shape mismatch", r"shape .* differs", data="{shape_label}"),
    row("mome.train", "affine mismatch", r"affine differs", data="{affine_label}"),
    row("mome.train", "wrong-package checkpoint", r"is a moe_missing checkpoint", model="{moe_ckpt}"),
    row("mome.train", "truncated checkpoint", r"truncated.pt", model="{truncated_pt}"),
    row("mome.train", "pickled object", r"pickled.pt", model="{pickled_pt}"),
    row("mome.train", "zero flag", r"--gate-lr: must be a positive number", extra=["--gate-lr", "0"]),
    row("mome.train", "negative flag", r"--lr: must be a positive number", extra=["--lr", "-1"]),
    row("mome.train", "existing output path", r"--out .* is a file", out="{a_file}"),
    # mome.predict
    row("mome.predict", "missing path", r"--input .*nope does not exist", input="{nope}"),
    row("mome.predict", "malformed dataset.json", NOT_JSON, input="{bad_json}"),
    row("mome.predict", "truncated NIfTI", r"not a readable NIfTI", input="{truncated}"),
    row("mome.predict", "4-D image", r"expected a 3D volume", input="{four_d}"),
    row("mome.predict", "NaN voxels", r"NaN or Inf", input="{nan}"),
    row("mome.predict", "shape mismatch", r"shape 16x16x15 is not the 16x16x16 grid", input="{shape_channel}"),
    row("mome.predict", "wrong-package checkpoint", r"is a brainsegfounder_seg checkpoint", model="{bsf_ckpt}"),
    row("mome.predict", "truncated checkpoint", BAD_CKPT, model="{truncated_pt}"),
    row("mome.predict", "pickled object", BAD_CKPT, model="{pickled_pt}"),
    row(
        "mome.predict", "zero flag", r"--tiles-per-batch: must be a positive integer", extra=["--tiles-per-batch", "0"]
    ),
    row("mome.predict", "negative flag", r"--overlap: must be a fraction", extra=["--overlap", "-0.5"]),
    row("mome.predict", "existing output path", r"--output .* is a file", out="{a_file}"),
    # mome.evaluate: PRED/<dataset>/<CASE_XXXX>.nii.gz against the dataset's labels
    row("mome.evaluate", "missing path", r"nope", data="{nope}"),
    row("mome.evaluate", "malformed dataset.json", NOT_JSON, data="{bad_json}"),
    row("mome.evaluate", "malformed split file", NOT_JSON, extra=["--split-file", "{bad_json_file}"]),
    row("mome.evaluate", "truncated NIfTI", r"not a readable NIfTI", pred="{mome_pred_truncated}"),
    row("mome.evaluate", "4-D image", r"expected a 3D volume", pred="{mome_pred_four_d}"),
    row("mome.evaluate", "NaN voxels", r"NaN or Inf", pred="{mome_pred_nan}"),
    row("mome.evaluate", "undeclared label", r"label values? \[?7\]? .*not declared", data="{undeclared}"),
    row("mome.evaluate", "shape mismatch", r"shape .* differs", pred="{mome_pred_shape}"),
    row("mome.evaluate", "affine mismatch", r"affine differs", pred="{mome_pred_affine}"),
    row("mome.evaluate", "wrong-package checkpoint", r"is a sam_med3d checkpoint", extra=["--model", "{sam_ckpt}"]),
    row("mome.evaluate", "truncated checkpoint", BAD_CKPT, extra=["--model", "{truncated_pt}"]),
    row("mome.evaluate", "pickled object", BAD_CKPT, extra=["--model", "{pickled_pt}"]),
    row("mome.evaluate", "zero flag", r"--connectivity: invalid choice", extra=["--connectivity", "0"]),
    row("mome.evaluate", "negative flag", r"--fold: must be a non-negative integer", extra=["--fold", "-1"]),
    row("mome.evaluate", "existing output path", r"--out .* is a file", out="{a_file}"),
    # mome.convert_checkpoint (nnU-Net files of the official release)
    row("mome.convert_checkpoint", "missing path", r"nope.pt: checkpoint file not found", model="{nope_pt}"),
    row("mome.convert_checkpoint", "wrong-package checkpoint", r"moe_missing", model="{moe_ckpt}"),
    row("mome.convert_checkpoint", "truncated checkpoint", r"truncated.pt.* not a readable", model="{truncated_pt}"),
    row("mome.convert_checkpoint", "pickled object", r"--trust-pickle", model="{pickled_pt}"),
    row(
        "mome.convert_checkpoint",
        "zero flag",
        r"--patch: must be a positive integer",
        extra=["--patch", "0", "16", "16"],
    ),  # fmt: skip
    row(
        "mome.convert_checkpoint",
        "negative flag",
        r"--grid: must be a positive integer",
        extra=["--grid", "-1", "16", "16"],
    ),  # fmt: skip
    row("mome.convert_checkpoint", "existing output path", r"--output .* is a folder", out="{dir_pt}"),
    # moe_missing.train
    row("moe_missing.train", "missing path", r"--data .*nope: no dataset.json", data="{nope}"),
    row("moe_missing.train", "malformed dataset.json", NOT_JSON, data="{bad_json}"),
    row("moe_missing.train", "truncated NIfTI", r"not a readable NIfTI", data="{truncated}"),
    row("moe_missing.train", "4-D image", r"expected a 3D volume", data="{four_d}"),
    row("moe_missing.train", "NaN voxels", r"NaN or Inf", data="{nan}"),
    row("moe_missing.train", "undeclared label", r"label values \[7\] are not declared", data="{undeclared}"),
    row("moe_missing.train", "shape mismatch", r"shape .* differs", data="{shape_channel}"),
    row("moe_missing.train", "affine mismatch", r"affine differs", data="{affine_channel}"),
    row(
        "moe_missing.train",
        "wrong-package checkpoint",
        r"is a mome_expert checkpoint",
        out="{resume_mome}",
        extra=["--resume"],
    ),
    row("moe_missing.train", "truncated checkpoint", BAD_CKPT, out="{resume_truncated}", extra=["--resume"]),
    row("moe_missing.train", "pickled object", BAD_CKPT, out="{resume_pickled}", extra=["--resume"]),
    row("moe_missing.train", "zero flag", r"--batch-size: must be a positive integer", extra=["--batch-size", "0"]),
    row("moe_missing.train", "negative flag", r"--alpha: must be a non-negative number", extra=["--alpha", "-1"]),
    row("moe_missing.train", "existing output path", r"--out .* is a file", out="{a_file}"),
    # moe_missing.predict
    row("moe_missing.predict", "missing path", r"--input .*nope does not exist", input="{nope}"),
    row("moe_missing.predict", "malformed dataset.json", NOT_JSON, input="{bad_json}"),
    row("moe_missing.predict", "truncated NIfTI", r"not a readable NIfTI", input="{truncated}"),
    row("moe_missing.predict", "4-D image", r"expected a 3D volume", input="{four_d}"),
    row("moe_missing.predict", "NaN voxels", r"NaN or Inf", input="{nan}"),
    row("moe_missing.predict", "shape mismatch", r"shape .* differs", input="{shape_channel}"),
    row("moe_missing.predict", "affine mismatch", r"affine differs", input="{affine_channel}"),
    row("moe_missing.predict", "wrong-package checkpoint", r"is a sam_med3d checkpoint", model="{sam_ckpt}"),
    row("moe_missing.predict", "truncated checkpoint", BAD_CKPT, model="{truncated_pt}"),
    row("moe_missing.predict", "pickled object", BAD_CKPT, model="{pickled_pt}"),
    row("moe_missing.predict", "zero flag", r"--patch: must be a positive integer", extra=["--patch", "0", "16", "16"]),
    row(
        "moe_missing.predict",
        "negative flag",
        r"--tiles-per-batch: must be a positive integer",
        extra=["--tiles-per-batch", "-1"],
    ),
    row("moe_missing.predict", "existing output path", r"--output .* is a file", out="{a_file}"),
    # moe_missing.evaluate: predicts the --data cases with each --models run, then scores them
    row("moe_missing.evaluate", "missing path", r"nope", model="{nope_pt}"),
    row("moe_missing.evaluate", "malformed dataset.json", NOT_JSON, data="{bad_json}"),
    row("moe_missing.evaluate", "malformed split file", NOT_JSON, extra=["--split", "{bad_json_file}"]),
    row("moe_missing.evaluate", "truncated NIfTI", r"not a readable NIfTI", data="{truncated}"),
    row("moe_missing.evaluate", "4-D image", r"expected a 3D volume", data="{four_d}"),
    row("moe_missing.evaluate", "NaN voxels", r"NaN or Inf", data="{nan}"),
    row("moe_missing.evaluate", "undeclared label", r"label values \[7\] are not declared", data="{undeclared}"),
    row("moe_missing.evaluate", "shape mismatch", r"shape .* differs", data="{shape_label}"),
    row("moe_missing.evaluate", "affine mismatch", r"affine differs", data="{affine_label}"),
    row("moe_missing.evaluate", "wrong-package checkpoint", r"is a mome_expert checkpoint", model="{mome_ckpt}"),
    row("moe_missing.evaluate", "truncated checkpoint", BAD_CKPT, model="{truncated_pt}"),
    row("moe_missing.evaluate", "pickled object", BAD_CKPT, model="{pickled_pt}"),
    row(
        "moe_missing.evaluate", "zero flag", r"--patch: must be a positive integer", extra=["--patch", "0", "16", "16"]
    ),  # fmt: skip
    row(
        "moe_missing.evaluate",
        "negative flag",
        r"--min-lesion-volume: must be a non-negative",
        extra=["--min-lesion-volume", "-1"],
    ),
    row("moe_missing.evaluate", "existing output path", r"--out .* is a file", out="{a_file}"),
    # brainsegfounder.pretrain (labels are not read: the channel variants of shape and affine)
    row("brainsegfounder.pretrain", "missing path", r"nope", data="{nope}"),
    row("brainsegfounder.pretrain", "malformed dataset.json", NOT_JSON, data="{bad_json}"),
    row("brainsegfounder.pretrain", "malformed split file", NOT_JSON, extra=["--split-file", "{bad_json_file}"]),
    row("brainsegfounder.pretrain", "truncated NIfTI", r"not a readable NIfTI", data="{truncated}"),
    row("brainsegfounder.pretrain", "4-D image", r"expected a 3D volume", data="{four_d}"),
    row("brainsegfounder.pretrain", "NaN voxels", r"NaN or Inf", data="{nan}"),
    row("brainsegfounder.pretrain", "shape mismatch", r"shape .* differs", data="{shape_channel}"),
    row("brainsegfounder.pretrain", "affine mismatch", r"affine differs", data="{affine_channel}"),
    row(
        "brainsegfounder.pretrain",
        "wrong-package checkpoint",
        r"is a moe_missing checkpoint",
        extra=["--init", "{moe_ckpt}"],
    ),
    row("brainsegfounder.pretrain", "truncated checkpoint", BAD_CKPT, extra=["--init", "{truncated_pt}"]),
    row("brainsegfounder.pretrain", "pickled object", r"pickled Python objects", extra=["--init", "{pickled_pt}"]),
    row(
        "brainsegfounder.pretrain",
        "zero flag",
        r"--temperature: must be a positive number",
        extra=["--temperature", "0"],
    ),
    row(
        "brainsegfounder.pretrain", "negative flag", r"--grad-clip: must be a non-negative", extra=["--grad-clip", "-1"]
    ),
    row("brainsegfounder.pretrain", "existing output path", r"--out .* is a file", out="{a_file}"),
    # brainsegfounder.finetune
    row("brainsegfounder.finetune", "missing path", r"nope", data="{nope}"),
    row("brainsegfounder.finetune", "malformed dataset.json", NOT_JSON, data="{bad_json}"),
    row("brainsegfounder.finetune", "malformed split file", NOT_JSON, extra=["--split-file", "{bad_json_file}"]),
    row("brainsegfounder.finetune", "truncated NIfTI", r"not a readable NIfTI", data="{truncated}"),
    row("brainsegfounder.finetune", "4-D image", r"expected a 3D volume", data="{four_d}"),
    row("brainsegfounder.finetune", "NaN voxels", r"NaN or Inf", data="{nan}"),
    row("brainsegfounder.finetune", "undeclared label", r"label values \[7\] are not declared", data="{undeclared}"),
    row("brainsegfounder.finetune", "shape mismatch", r"shape .* differs", data="{shape_label}"),
    row("brainsegfounder.finetune", "affine mismatch", r"affine differs", data="{affine_label}"),
    row(
        "brainsegfounder.finetune",
        "wrong-package checkpoint",
        r"is a sam_med3d checkpoint",
        extra=["--init", "{sam_ckpt}"],
    ),
    row("brainsegfounder.finetune", "truncated checkpoint", BAD_CKPT, extra=["--init", "{truncated_pt}"]),
    row("brainsegfounder.finetune", "pickled object", r"pickled Python objects", extra=["--init", "{pickled_pt}"]),
    row(
        "brainsegfounder.finetune",
        "zero flag",
        r"--train-fraction: must be a fraction",
        extra=["--train-fraction", "0"],
    ),
    row(
        "brainsegfounder.finetune",
        "negative flag",
        r"--warmup: must be a non-negative integer",
        extra=["--warmup", "-1"],
    ),
    row("brainsegfounder.finetune", "existing output path", r"--out .* is a file", out="{a_file}"),
    # brainsegfounder.fewshot: finetune --out folders (their summary.json)
    row("brainsegfounder.fewshot", "missing path", r"nope: no summary.json", arm="{nope}"),
    row("brainsegfounder.fewshot", "malformed summary.json", NOT_JSON, arm="{bad_json_parent}"),
    row("brainsegfounder.fewshot", "existing output path", r"--out .* is a folder", out="{dir_csv}"),
    # brainsegfounder.predict
    row("brainsegfounder.predict", "missing path", r"--input .*nope does not exist", input="{nope}"),
    row("brainsegfounder.predict", "malformed dataset.json", NOT_JSON, input="{bad_json}"),
    row("brainsegfounder.predict", "truncated NIfTI", r"not a readable NIfTI", input="{truncated}"),
    row("brainsegfounder.predict", "4-D image", r"expected a 3D volume", input="{four_d}"),
    row("brainsegfounder.predict", "NaN voxels", r"NaN or Inf", input="{nan}"),
    row("brainsegfounder.predict", "shape mismatch", r"shape .* differs", input="{shape_channel}"),
    row("brainsegfounder.predict", "affine mismatch", r"affine differs", input="{affine_channel}"),
    row("brainsegfounder.predict", "wrong-package checkpoint", r"is a mome_expert checkpoint", model="{mome_ckpt}"),
    row("brainsegfounder.predict", "truncated checkpoint", BAD_CKPT, model="{truncated_pt}"),
    row("brainsegfounder.predict", "pickled object", r"pickled Python objects", model="{pickled_pt}"),
    row(
        "brainsegfounder.predict",
        "zero flag",
        r"--tiles-per-batch: must be a positive integer",
        extra=["--tiles-per-batch", "0"],
    ),
    row(
        "brainsegfounder.predict",
        "negative flag",
        r"--patch: must be a positive integer",
        extra=["--patch", "-64", "32", "32"],
    ),  # fmt: skip
    row("brainsegfounder.predict", "existing output path", r"--output .* is a file", out="{a_file}"),
    # brainsegfounder.evaluate
    row("brainsegfounder.evaluate", "missing path", r"--gt .*nope: not a folder", gt="{nope}"),
    row("brainsegfounder.evaluate", "malformed split file", NOT_JSON, extra=["--split", "{bad_json_file}"]),
    row("brainsegfounder.evaluate", "truncated NIfTI", r"not a readable NIfTI", pred="{pred_truncated}"),
    row("brainsegfounder.evaluate", "4-D image", r"expected a 3D volume", pred="{pred_four_d}"),
    row("brainsegfounder.evaluate", "NaN voxels", r"NaN or Inf", pred="{pred_nan}"),
    row(
        "brainsegfounder.evaluate",
        "undeclared label",
        r"label values? \[?7\]? .*not declared",
        gt="{undeclared}/labelsTr",
    ),
    row("brainsegfounder.evaluate", "shape mismatch", r"shape .* differs", pred="{pred_shape}"),
    row("brainsegfounder.evaluate", "affine mismatch", r"affine differs", pred="{pred_affine}"),
    row(
        "brainsegfounder.evaluate",
        "zero flag",
        r"--brats-labels: must be a positive integer",
        extra=["--task", "brats", "--brats-labels", "0", "1", "2"],
    ),
    row("brainsegfounder.evaluate", "negative flag", r"--fold: must be a non-negative integer", extra=["--fold", "-1"]),
    row("brainsegfounder.evaluate", "existing output path", r"--out .* is a folder", out="{dir_csv}"),
    # brainsegfounder.convert_checkpoint
    row("brainsegfounder.convert_checkpoint", "missing path", r"nope.pt", model="{nope_pt}"),
    row(
        "brainsegfounder.convert_checkpoint",
        "wrong-package checkpoint",
        r"is a mome_expert checkpoint",
        model="{mome_ckpt}",
    ),
    row(
        "brainsegfounder.convert_checkpoint",
        "truncated checkpoint",
        r"truncated.pt: not a readable",
        model="{truncated_pt}",
    ),
    row("brainsegfounder.convert_checkpoint", "pickled object", r"--trust-pickle", model="{pickled_pt}"),
    row(
        "brainsegfounder.convert_checkpoint",
        "zero flag",
        r"--patch: must be a positive integer",
        extra=["--patch", "0", "32", "32"],
    ),
    row(
        "brainsegfounder.convert_checkpoint",
        "negative flag",
        r"--patch: must be a positive integer",
        extra=["--patch", "64", "-32", "32"],
    ),
    row("brainsegfounder.convert_checkpoint", "existing output path", r"--out .* is a folder", out="{dir_pt}"),
    # sam_med3d_moe.train
    row("sam_med3d_moe.train", "missing path", r"--data .*nope: no dataset.json", data="{nope}"),
    row("sam_med3d_moe.train", "malformed dataset.json", NOT_JSON, data="{bad_json}"),
    row("sam_med3d_moe.train", "truncated NIfTI", r"not a readable NIfTI", data="{truncated}"),
    row("sam_med3d_moe.train", "4-D image", r"expected a 3D volume", data="{four_d}"),
    row("sam_med3d_moe.train", "NaN voxels", r"NaN or Inf", data="{nan}"),
    row("sam_med3d_moe.train", "undeclared label", r"label values \[7\] are not declared", data="{undeclared}"),
    row("sam_med3d_moe.train", "shape mismatch", r"shape .* differs", data="{shape_label}"),
    row("sam_med3d_moe.train", "affine mismatch", r"affine differs", data="{affine_label}"),
    row(
        "sam_med3d_moe.train",
        "wrong-package checkpoint",
        r"is a mome_expert checkpoint",
        extra=["--init", "{mome_ckpt}"],
    ),
    row("sam_med3d_moe.train", "truncated checkpoint", BAD_CKPT, extra=["--init", "{truncated_pt}"]),
    row("sam_med3d_moe.train", "pickled object", BAD_CKPT, extra=["--init", "{pickled_pt}"]),
    row("sam_med3d_moe.train", "zero flag", r"--spacing: must be a positive number", extra=["--spacing", "0"]),
    row("sam_med3d_moe.train", "negative flag", r"--jitter: must be a non-negative integer", extra=["--jitter", "-1"]),
    row("sam_med3d_moe.train", "existing output path", r"--out .* is a file", out="{a_file}"),
    # sam_med3d_moe.finetune_expert
    row("sam_med3d_moe.finetune_expert", "missing path", r"nope.pt", model="{nope_pt}"),
    row("sam_med3d_moe.finetune_expert", "malformed dataset.json", NOT_JSON, data="{bad_json}"),
    row("sam_med3d_moe.finetune_expert", "truncated NIfTI", r"not a readable NIfTI", data="{truncated}"),
    row("sam_med3d_moe.finetune_expert", "4-D image", r"expected a 3D volume", data="{four_d}"),
    row("sam_med3d_moe.finetune_expert", "NaN voxels", r"NaN or Inf", data="{nan}"),
    row(
        "sam_med3d_moe.finetune_expert", "undeclared label", r"label values \[7\] are not declared", data="{undeclared}"
    ),
    row("sam_med3d_moe.finetune_expert", "shape mismatch", r"shape .* differs", data="{shape_label}"),
    row("sam_med3d_moe.finetune_expert", "affine mismatch", r"affine differs", data="{affine_label}"),
    row(
        "sam_med3d_moe.finetune_expert",
        "wrong-package checkpoint",
        r"is a brainsegfounder_seg checkpoint",
        model="{bsf_ckpt}",
    ),
    row("sam_med3d_moe.finetune_expert", "truncated checkpoint", BAD_CKPT, model="{truncated_pt}"),
    row("sam_med3d_moe.finetune_expert", "pickled object", BAD_CKPT, model="{pickled_pt}"),
    row("sam_med3d_moe.finetune_expert", "zero flag", r"--labels: must be a positive integer", extra=["--labels", "0"]),
    row("sam_med3d_moe.finetune_expert", "negative flag", r"--clip: must be a non-negative", extra=["--clip", "-1"]),
    row("sam_med3d_moe.finetune_expert", "existing output path", r"--out .* is a file", out="{a_file}"),
    # sam_med3d_moe.train_gate
    row("sam_med3d_moe.train_gate", "missing path", r"nope.pt", experts="{nope_pt}"),
    row("sam_med3d_moe.train_gate", "malformed dataset.json", NOT_JSON, data="{bad_json}"),
    row("sam_med3d_moe.train_gate", "truncated NIfTI", r"not a readable NIfTI", data="{truncated}"),
    row("sam_med3d_moe.train_gate", "4-D image", r"expected a 3D volume", data="{four_d}"),
    row("sam_med3d_moe.train_gate", "NaN voxels", r"NaN or Inf", data="{nan}"),
    row("sam_med3d_moe.train_gate", "undeclared label", r"label values \[7\] are not declared", data="{undeclared}"),
    row("sam_med3d_moe.train_gate", "shape mismatch", r"shape .* differs", data="{shape_label}"),
    row("sam_med3d_moe.train_gate", "affine mismatch", r"affine differs", data="{affine_label}"),
    row("sam_med3d_moe.train_gate", "wrong-package checkpoint", r"is a moe_missing checkpoint", experts="{moe_ckpt}"),
    row("sam_med3d_moe.train_gate", "truncated checkpoint", BAD_CKPT, experts="{truncated_pt}"),
    row("sam_med3d_moe.train_gate", "pickled object", BAD_CKPT, model="{pickled_pt}"),
    row("sam_med3d_moe.train_gate", "zero flag", r"--gate-lr: must be a positive number", extra=["--gate-lr", "0"]),
    row("sam_med3d_moe.train_gate", "negative flag", r"--tau: must be", extra=["--tau", "-0.5"]),
    row("sam_med3d_moe.train_gate", "existing output path", r"--out .* is a file", out="{a_file}"),
    # sam_med3d_moe.predict: one image and a click (or --label to simulate clicks from), or a folder and --prompts
    row("sam_med3d_moe.predict", "missing path", r"--input .*nope does not exist", input="{nope}", extra=CLICK),
    row(
        "sam_med3d_moe.predict",
        "malformed prompts file",
        r"--prompts .* not a readable JSON",
        input="{ms}/imagesTr",
        out="{out_dir}",
        extra=["--channel", "0", "--prompts", "{bad_json_file}"],
    ),
    row("sam_med3d_moe.predict", "truncated NIfTI", r"not a readable NIfTI", input="{truncated}" + IMAGE, extra=CLICK),
    row("sam_med3d_moe.predict", "4-D image", r"expected a 3D volume", input="{four_d}" + IMAGE, extra=CLICK),
    row("sam_med3d_moe.predict", "NaN voxels", r"NaN or Inf", input="{nan}" + IMAGE, extra=CLICK),
    row("sam_med3d_moe.predict", "shape mismatch", r"--label .*shape", extra=["--label", "{shape_label}" + LABEL]),
    row(
        "sam_med3d_moe.predict",
        "affine mismatch",
        r"--label .*affine differs",
        extra=["--label", "{affine_label}" + LABEL],
    ),
    row(
        "sam_med3d_moe.predict",
        "wrong-package checkpoint",
        r"is a moe_missing checkpoint",
        model="{moe_ckpt}",
        extra=CLICK,
    ),
    row("sam_med3d_moe.predict", "truncated checkpoint", BAD_CKPT, model="{truncated_pt}", extra=CLICK),
    row("sam_med3d_moe.predict", "pickled object", BAD_CKPT, model="{pickled_pt}", extra=CLICK),
    row(
        "sam_med3d_moe.predict", "zero flag", r"--spacing: must be a positive number", extra=[*CLICK, "--spacing", "0"]
    ),
    row("sam_med3d_moe.predict", "negative flag", r"outside", extra=["--point", "-3", "8", "8"]),
    row("sam_med3d_moe.predict", "existing output path", r"--output .* is a folder", out="{dir_nii}", extra=CLICK),
    # sam_med3d_moe.evaluate
    row("sam_med3d_moe.evaluate", "missing path", r"nope", data="{nope}"),
    row("sam_med3d_moe.evaluate", "malformed dataset.json", NOT_JSON, data="{bad_json}"),
    row("sam_med3d_moe.evaluate", "malformed split file", NOT_JSON, extra=["--split", "{bad_json_file}"]),
    row("sam_med3d_moe.evaluate", "truncated NIfTI", r"not a readable NIfTI", data="{truncated}"),
    row("sam_med3d_moe.evaluate", "4-D image", r"expected a 3D volume", data="{four_d}"),
    row("sam_med3d_moe.evaluate", "NaN voxels", r"NaN or Inf", data="{nan}"),
    row("sam_med3d_moe.evaluate", "undeclared label", r"label values \[7\] are not declared", data="{undeclared}"),
    row("sam_med3d_moe.evaluate", "shape mismatch", r"shape .* differs", data="{shape_label}"),
    row("sam_med3d_moe.evaluate", "affine mismatch", r"affine differs", data="{affine_label}"),
    row(
        "sam_med3d_moe.evaluate", "wrong-package checkpoint", r"is a brainsegfounder_seg checkpoint", model="{bsf_ckpt}"
    ),
    row("sam_med3d_moe.evaluate", "truncated checkpoint", BAD_CKPT, model="{truncated_pt}"),
    row("sam_med3d_moe.evaluate", "pickled object", BAD_CKPT, model="{pickled_pt}"),
    row("sam_med3d_moe.evaluate", "zero flag", r"--clicks: must be a positive integer", extra=["--clicks", "0"]),
    row("sam_med3d_moe.evaluate", "negative flag", r"--tolerance: must be a non-negative", extra=["--tolerance", "-1"]),
    row("sam_med3d_moe.evaluate", "existing output path", r"--out .* is a file", out="{a_file}"),
    # sam_med3d_moe.convert_checkpoint (the official .pth release)
    row("sam_med3d_moe.convert_checkpoint", "missing path", r"nope.pt: file not found", model="{nope_pt}"),
    row("sam_med3d_moe.convert_checkpoint", "wrong-package checkpoint", r"mome", model="{mome_ckpt}"),
    row("sam_med3d_moe.convert_checkpoint", "truncated checkpoint", r"truncated.pt", model="{truncated_pt}"),
    row("sam_med3d_moe.convert_checkpoint", "pickled object", r"--trust-pickle", model="{pickled_pt}"),
    row("sam_med3d_moe.convert_checkpoint", "existing output path", r"--output .* is a folder", out="{dir_pt}"),
]


class Pickled:
    """Not a tensor, number or string: torch.load(weights_only=True) refuses it."""


def _edit_nifti(path, data=None, shift=None) -> None:
    """Rewrite one NIfTI file with other voxels and/or a translated affine."""
    image = nib.load(path)
    affine = image.affine.copy()
    if shift is not None:
        affine[:3, 3] += shift
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj) if data is None else data, affine), path)


def _voxels(path) -> np.ndarray:
    return np.asarray(nib.load(path).dataobj, dtype=np.float32)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A 16^3 three-channel phantom, one tiny trained run of each package, and a broken copy of every input."""
    root = tmp_path_factory.mktemp("bad_input")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("BRAINSEG_CACHE", str(root / "cache"))  # every package's preprocessed cache
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            yield _build_world(root)
        finally:
            torch.set_num_threads(threads)


def _build_world(root: Path) -> dict:
    (ms,) = write_phantom_datasets(root / "raw", ["ms"], cases=3, shape=(16, 16, 16), seed=3)
    w = {"root": str(root), "ms": str(ms), "nope": str(root / "nope"), "nope_pt": str(root / "nope.pt")}

    # one tiny run of each package (1 step), the checkpoints the predict / evaluate / later-stage CLIs take
    w["mome_ckpt"] = str(root / "mome" / "checkpoint.pt")
    mome.train_expert.main(["--modality", "T1", "--data", w["ms"], "--out", str(root / "mome"), *MOME])
    w["moe_ckpt"] = str(root / "moe" / "checkpoint.pt")
    moe_missing.train.main(["--data", w["ms"], "--out", str(root / "moe"), *MOE])
    w["bsf_run"] = str(root / "bsf")
    w["bsf_ckpt"] = str(root / "bsf" / "fraction_1" / "repeat_0" / "checkpoint.pt")
    brainsegfounder.finetune.main(["--data", w["ms"], "--out", w["bsf_run"], "--target", "binary", "--fold", "-1",
                                   *BSF])  # fmt: skip
    w["sam_ckpt"] = str(root / "sam" / "checkpoint.pt")
    sam_med3d_moe.train.main(["--data", w["ms"], "--out", str(root / "sam"), "--config", "tiny", *SAM])
    w["sam_expert_ckpt"] = str(root / "sam_expert" / "checkpoint.pt")
    sam_med3d_moe.finetune_expert.main(["--general", w["sam_ckpt"], "--data", w["ms"], "--out",
                                        str(root / "sam_expert"), *SAM])  # fmt: skip

    # broken checkpoints, and run folders that hold them (for --resume)
    files = root / "files"
    files.mkdir()
    w["truncated_pt"] = str(files / "truncated.pt")
    blob = Path(w["mome_ckpt"]).read_bytes()
    Path(w["truncated_pt"]).write_bytes(blob[: len(blob) // 2])
    w["pickled_pt"] = str(files / "pickled.pt")
    torch.save({"model": {}, "args": argparse.Namespace(lr=0.1), "object": Pickled()}, w["pickled_pt"])
    for name, source in (("moe", w["moe_ckpt"]), ("mome", w["mome_ckpt"]), ("truncated", w["truncated_pt"]),
                         ("pickled", w["pickled_pt"])):  # fmt: skip
        (root / f"resume_{name}").mkdir()
        shutil.copy(source, root / f"resume_{name}" / "checkpoint.pt")
        w[f"resume_{name}"] = str(root / f"resume_{name}")

    # broken datasets: a copy of the phantom whose last case (or dataset.json) is wrong in one way
    def broken(name, edit):
        copy = root / name / Path(w["ms"]).name  # the same folder name as the good dataset
        shutil.copytree(w["ms"], copy)
        edit(copy)
        w[name] = str(copy)

    image, label, second = (f"imagesTr/{LAST}_0000.nii.gz", f"labelsTr/{LAST}.nii.gz", f"imagesTr/{LAST}_0001.nii.gz")
    broken("bad_json", lambda d: (d / "dataset.json").write_text("{not json"))
    broken("truncated", lambda d: (d / image).write_bytes((d / image).read_bytes()[:300]))
    broken("four_d", lambda d: _edit_nifti(d / image, np.stack([_voxels(d / image)] * 2, axis=-1)))
    broken("nan", lambda d: _edit_nifti(d / image, np.where(np.arange(16**3).reshape(16, 16, 16) == 100, np.nan,
                                                            _voxels(d / image))))  # fmt: skip
    broken("undeclared", lambda d: _edit_nifti(d / label, np.where(_voxels(d / label) > 0, 7, 0).astype(np.uint8)))
    broken("shape_label", lambda d: _edit_nifti(d / label, np.zeros((16, 16, 15), np.uint8)))
    broken("affine_label", lambda d: _edit_nifti(d / label, shift=(5.0, 0.0, 0.0)))
    broken("shape_channel", lambda d: _edit_nifti(d / second, np.zeros((16, 16, 15), np.float32)))
    broken("affine_channel", lambda d: _edit_nifti(d / second, shift=(5.0, 0.0, 0.0)))
    w["bad_json_parent"] = str(root / "bad_json")
    w["bad_json_file"] = str(files / "bad.json")
    Path(w["bad_json_file"]).write_text("{not json")
    (root / "bad_json" / "summary.json").write_text("{not json")  # also a finetune --out folder, broken

    # predictions to score: label maps as shared.evaluate and brainsegfounder.evaluate read them (CASE.nii.gz), and
    # as mome.evaluate reads them (PRED/<dataset>/CASE_XXXX.nii.gz, one per channel); the last case broken
    labels = sorted((Path(w["ms"]) / "labelsTr").glob("*.nii.gz"))
    edits = {"good": lambda p: None,
             "truncated": lambda p: p.write_bytes(gzip.compress(p.read_bytes())[:200]),
             "four_d": lambda p: _edit_nifti(p, np.stack([_voxels(p)] * 2, axis=-1)),
             "nan": lambda p: _edit_nifti(p, np.full((16, 16, 16), np.nan, np.float32)),
             "shape": lambda p: _edit_nifti(p, np.zeros((16, 16, 15), np.uint8)),
             "affine": lambda p: _edit_nifti(p, shift=(5.0, 0.0, 0.0))}  # fmt: skip
    for kind, edit in edits.items():
        flat, nested = root / f"pred_{kind}", root / f"mome_pred_{kind}" / Path(w["ms"]).name
        flat.mkdir()
        nested.mkdir(parents=True)
        for path in labels:
            shutil.copy(path, flat / path.name)
            for channel in range(3):
                shutil.copy(path, nested / f"{path.name[: -len('.nii.gz')]}_{channel:04d}.nii.gz")
        edit(flat / f"{LAST}.nii.gz")
        edit(nested / f"{LAST}_0000.nii.gz")
        w[f"pred_{kind}"], w[f"mome_pred_{kind}"] = str(flat), str(nested.parent)

    # existing paths of the wrong type: a file where a folder is expected, folders named like files
    w["a_file"] = str(files / "a_file")
    Path(w["a_file"]).write_text("not a folder")
    for name in ("dir_csv", "dir_pt", "dir_nii"):
        w[name] = str(root / {"dir_csv": "folder.csv", "dir_pt": "folder.pt", "dir_nii": "folder.nii.gz"}[name])
        Path(w[name]).mkdir()
    return w


def _tree(*roots) -> dict:
    """Every file and folder below `roots`: path -> (size, mtime) of a file, None of a folder."""
    found = {}
    for root in roots:
        for path in Path(root).rglob("*"):
            found[str(path)] = (path.stat().st_size, path.stat().st_mtime_ns) if path.is_file() else None
    return found


def _visible_lines(err: str) -> list[str]:
    """The lines a terminal shows of `err`: text after a carriage return (a redrawn progress bar) replaces the line."""
    return [line.rsplit("\r", 1)[-1] for line in err.split("\n") if line.rsplit("\r", 1)[-1].strip()]


@pytest.mark.parametrize("cli, slots, extra, message", ROWS)
def test_bad_input_is_one_sentence_exit_2_and_leaves_nothing(world, tmp_path, capsys, cli, slots, extra, message):
    main, template, defaults = CLIS[cli]
    outputs = {"out_dir": tmp_path / "out", "out_csv": tmp_path / "out.csv", "out_pt": tmp_path / "out.pt",
               "out_nii": tmp_path / "out.nii.gz"}  # fmt: skip
    values = {**world, **{k: str(v) for k, v in outputs.items()}}
    filled = {**defaults, **slots}
    argv = [arg.format(**filled).format(**values) for arg in template] + [arg.format(**values) for arg in extra]
    before = _tree(world["root"], tmp_path)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(argv))
    err = capsys.readouterr().err
    lines = _visible_lines(err)
    assert exit_info.value.code == 2, err
    assert "Traceback" not in err and len(lines) == 1 and lines[0].startswith("error: "), err
    assert re.search(message, lines[0]), lines[0]
    after = _tree(world["root"], tmp_path)
    left = sorted(set(after) - set(before))
    assert left == [], f"left behind: {left[:4]}"
    changed = sorted(path for path in before if path in after and after[path] != before[path])
    assert changed == [], f"changed: {changed[:4]}"
    assert not any(path.exists() for path in outputs.values())


def test_every_cli_has_a_row_of_every_category_that_applies():
    """The matrix is complete: the categories every CLI of its kind must have (see the module docstring)."""
    categories = {}
    for param in ROWS:
        cli, category = param.id.split(": ", 1)
        categories.setdefault(cli, set()).add(category)
    assert set(categories) == set(CLIS)
    everywhere = {"zero flag", "negative flag", "existing output path"}
    for cli, found in categories.items():
        wanted = set(everywhere) - ({"zero flag", "negative flag"} if cli == "brainsegfounder.fewshot" else set())
        wanted -= {"zero flag", "negative flag"} if cli == "sam_med3d_moe.convert_checkpoint" else set()
        if cli.endswith(("train", "train_expert", "finetune", "finetune_expert", "train_gate", "pretrain")):
            wanted |= {"missing path", "malformed dataset.json", "truncated NIfTI", "4-D image", "NaN voxels",
                       "shape mismatch", "affine mismatch", "wrong-package checkpoint", "truncated checkpoint",
                       "pickled object"}  # fmt: skip
        assert wanted <= found, f"{cli} lacks {sorted(wanted - found)}"
    ids = [param.id for param in ROWS]
    assert len(ids) == len(set(ids)), "a (CLI, category) pair twice"
