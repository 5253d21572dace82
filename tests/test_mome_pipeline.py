"""MoME end to end on tiny phantoms: phase 1 (+ the universal nnU-Net) -> phase 2 -> exact resume -> predict ->
evaluate side by side, and CLI errors.

Run: pytest tests/test_mome_pipeline.py
"""

import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from mome import demo, evaluate, predict, train, train_expert
from shared.checkpoint import load_checkpoint
from shared.errors import InputError
from shared.phantom import write_phantom_datasets

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--features", "4", "8", "16", "--patch", "16", "16", "16", "--batch-size", "2", "--steps-per-epoch", "2",
        "--fold", "0", "--folds", "3", "--device", "cpu", "--no-compile"]  # fmt: skip


pytestmark = pytest.mark.usefixtures("cache_root")  # tests/conftest.py: caches in a temporary folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("phantoms")
    dirs = write_phantom_datasets(root, datasets=["wmh", "stroke_acute"], cases=3, shape=(24, 24, 24), seed=1)
    return [str(d) for d in dirs]


@pytest.fixture(scope="module")
def experts(data, tmp_path_factory):
    """Phase-1 checkpoints of the three experts (T1, FLAIR, DWI) of the tiny runs."""
    root = tmp_path_factory.mktemp("experts")
    paths = []
    for modality in ("T1", "FLAIR", "DWI"):
        out = root / modality
        train_expert.main(["--modality", modality, "--data", *data, "--modalities", "T1", "FLAIR", "DWI",
                           "--epochs", "1", "--out", str(out), *TINY])  # fmt: skip
        paths.append(str(out / "checkpoint.pt"))
    return paths


@pytest.fixture(scope="module")
def universal(data, tmp_path_factory):
    """The universal nnU-Net baseline: one network on every channel of every dataset (--modality all)."""
    out = tmp_path_factory.mktemp("nnunet")
    train_expert.main(["--modality", "all", "--data", *data, "--modalities", "T1", "FLAIR", "DWI", "--epochs", "1",
                       "--out", str(out), *TINY])  # fmt: skip
    return str(out / "checkpoint.pt")


def _weights(path):
    return load_checkpoint(path)["model"]


def test_phase1_expert_checkpoint_names_its_modality(experts):
    ckpt = load_checkpoint(experts[1], expect_kind="mome_expert")
    assert ckpt["modality"] == "FLAIR" and ckpt["epoch"] == 1
    assert tuple(ckpt["config"]["features"]) == (4, 8, 16)


def test_universal_nnunet_checkpoint_is_no_expert(universal):
    ckpt = load_checkpoint(universal, expect_kind="mome_expert")
    assert ckpt["modality"] == "all"
    with pytest.raises(InputError, match="is a universal nnU-Net .--modality all., not the T1 expert"):
        train.expert_weights(universal, "T1")


def test_phase2_resume_is_exact_and_predict_evaluate_run(data, experts, universal, tmp_path):
    common = ["--data", *data, "--modalities", "T1", "FLAIR", "DWI", "--experts", *experts, "--epochs", "2", *TINY]
    # straight in the main process; interrupted with 2 loader workers and resumed with 1: the batch of step t is
    # a function of (seed, rank, t), so the weights must come out bit-identical
    train.main([*common, "--out", str(tmp_path / "straight"), "--workers", "0"])
    train.main([*common, "--out", str(tmp_path / "resumed"), "--stop-after", "1", "--workers", "2"])
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["epoch"] == 1
    train.main([*common, "--out", str(tmp_path / "resumed"), "--resume", "--workers", "1"])
    straight, resumed = (
        _weights(tmp_path / "straight" / "checkpoint.pt"),
        _weights(tmp_path / "resumed" / "checkpoint.pt"),
    )
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
    with open(tmp_path / "straight" / "log.csv") as f:
        log = list(csv.DictReader(f))
    assert [float(r["f_epoch"]) for r in log] == [1.0, 0.25]  # (1 - epoch/2)^2

    # the experts' 3x3x3 convs come from phase 1; the trained full-res head (seg_layers.1) was re-initialised
    ckpt_expert = _weights(experts[0])
    first = tmp_path / "first_epoch"
    train.main([*common, "--out", str(first), "--stop-after", "1", "--lr", "1e-12"])
    mome = _weights(first / "checkpoint.pt")
    conv = "encoder.stages.0.0.convs.0.conv.weight"
    torch.testing.assert_close(mome[f"experts.0.{conv}"], ckpt_expert[conv], rtol=0, atol=1e-9)
    assert not torch.equal(mome["experts.0.decoder.seg_layers.1.weight"], ckpt_expert["decoder.seg_layers.1.weight"])

    # MoME and the universal nnU-Net predict the held-out cases; evaluate puts them side by side
    split = tmp_path / "straight" / "split.json"
    model = str(tmp_path / "straight" / "checkpoint.pt")
    for name, checkpoint in (("mome", model), ("nnunet", universal)):
        for d in data:
            val = json.loads(split.read_text())[Path(d).name]["val"]
            predict.main(["--model", checkpoint, "--input", f"{d}/imagesTr", "--output",
                          str(tmp_path / name / Path(d).name), "--cases", *val, "--device", "cpu"])  # fmt: skip
            image = nib.load(f"{d}/imagesTr/{val[0]}_0000.nii.gz")
            out = nib.load(str(tmp_path / name / Path(d).name / f"{val[0]}_0000.nii.gz"))
            assert out.shape == image.shape
            np.testing.assert_allclose(out.affine, image.affine)
            assert set(np.unique(np.asarray(out.dataobj))) <= {0, 1}

    evaluate.main(["--data", *data, "--pred", str(tmp_path / "mome"), str(tmp_path / "nnunet"), "--names", "MoME",
                   "nnU-Net", "--split-file", str(split), "--unseen", Path(data[1]).name, "--model", model,
                   "--out", str(tmp_path / "eval")])  # fmt: skip
    with open(tmp_path / "eval" / "table1.csv") as f:
        table = {r["model"]: r for r in csv.DictReader(f)}
    assert list(table) == ["MoME", "nnU-Net"]
    with open(tmp_path / "eval" / "per_image.csv") as f:
        rows = list(csv.DictReader(f))
    for name in table:
        for group, dataset in (("seen", data[0]), ("unseen", data[1])):
            dice = [float(r["dice"]) for r in rows if r["model"] == name and r["dataset"] == Path(dataset).name]
            assert float(table[name][f"{group}_image"]) == pytest.approx(np.mean(dice))
    with open(tmp_path / "eval" / "table2.csv") as f:
        (unseen,) = list(csv.DictReader(f))
    assert unseen["dataset"] == Path(data[1]).name and float(unseen["nnU-Net"]) == pytest.approx(
        float(table["nnU-Net"]["unseen_image"])
    )
    # a single network is taken as --model too; it has no gate, so no usage table is written
    evaluate.main(["--data", *data, "--pred", str(tmp_path / "nnunet"), "--split-file", str(split), "--unseen",
                   Path(data[1]).name, "--model", universal, "--out", str(tmp_path / "eval_nnunet")])  # fmt: skip
    assert (tmp_path / "eval_nnunet" / "table1.csv").is_file()
    assert not (tmp_path / "eval_nnunet" / "expert_usage.csv").exists()
    for usage_table in ("expert_usage.csv", "expert_usage_lesion.csv"):
        with open(tmp_path / "eval" / usage_table) as f:
            for row in csv.DictReader(f):
                # magnitude shares sum to 1; signed lesion shares to the sign of the fused margin
                sign = float(np.sign(float(row["mean_margin"]))) if "mean_margin" in row else 1.0
                assert sum(float(row[f"expert_{m}"]) for m in ("T1", "FLAIR", "DWI")) == pytest.approx(sign, abs=1e-5)


def test_phase2_demo_options_gate_lr_shared_maps_uniform_init(data, experts, tmp_path):
    out = tmp_path / "demo_options"
    train.main(["--data", *data, "--modalities", "T1", "FLAIR", "DWI", "--experts", *experts, "--epochs", "4",
                "--stop-after", "1", "--lr", "1e-3", "--gate-lr", "2e-2", "--gate-init", "uniform", "--gate-maps",
                "shared", "--gate-norm", "softmax", "--out", str(out), *TINY])  # fmt: skip
    ckpt = load_checkpoint(out / "checkpoint.pt", expect_kind="mome")
    experts_group, gate_group = ckpt["optimizer"]["param_groups"]
    # poly decay of each group's own initial lr, epoch 0 of 4: lr * (1 - 0/4)^0.9
    assert (experts_group["lr"], gate_group["lr"]) == (1e-3, 2e-2)
    assert ckpt["config"]["gate_per_class"] is False
    assert ckpt["model"]["gate.unet.decoder.seg_layers.1.weight"].shape[0] == 3  # one map per expert
    model, _ = predict.load_model(out / "checkpoint.pt", torch.device("cpu"))
    assert model(torch.randn(1, 1, 16, 16, 16)).shape == (1, 2, 16, 16, 16)

    broken = tmp_path / "broken_0000.nii.gz"  # a valid model but an input that is not NIfTI: no output folder
    broken.write_bytes(b"not a NIfTI file")
    with pytest.raises(InputError, match="broken_0000.nii.gz: not a readable NIfTI file"):
        predict.main(["--model", str(out / "checkpoint.pt"), "--input", str(broken), "--output",
                      str(tmp_path / "pred"), "--device", "cpu"])  # fmt: skip
    assert not (tmp_path / "pred").exists()


def test_bad_arguments_are_refused_with_one_sentence(data, experts, tmp_path):
    with pytest.raises(InputError, match="--experts lists 2 files but --modalities has 3"):
        train.parse_args(["--data", *data, "--modalities", "T1", "FLAIR", "DWI", "--experts", *experts[:2],
                          "--out", str(tmp_path)])  # fmt: skip
    with pytest.raises(InputError, match="is the T1 expert, expected FLAIR"):
        train.expert_weights(experts[0], "FLAIR")
    with pytest.raises(InputError, match="must be divisible by 2"):
        train.parse_args(["--data", *data, "--random-experts", "--patch", "20", "20", "20", "--out", str(tmp_path)])
    with pytest.raises(InputError, match="is a mome_expert checkpoint, expected mome"):
        predict.load_model(experts[0], torch.device("cpu"), expect_kind="mome")
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(InputError, match="plain state_dict; pass the checkpoint.pt of mome.train"):
        predict.load_model(tmp_path / "plain.pt", torch.device("cpu"))


def test_cli_exit_code_and_message_on_broken_input(data, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    image = Path(data[0]) / "imagesTr"
    result = subprocess.run([sys.executable, "-m", "mome.predict", "--model", str(broken), "--input", str(image),
                             "--output", str(tmp_path / "out")], cwd=ROOT, capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and str(broken) in result.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_phase2_adam_gate_resumes_exactly_and_refuses_other_optimizer(data, experts, tmp_path):
    def args(optimizer, out, *extra):
        return ["--data", *data, "--modalities", "T1", "FLAIR", "DWI", "--experts", *experts, "--epochs", "2",
                "--gate-optimizer", optimizer, "--gate-lr", "4e-3", "--gate-init", "uniform", *TINY,
                "--out", str(tmp_path / out), *extra]  # fmt: skip

    train.main(args("adam", "straight"))
    train.main(args("adam", "resumed", "--stop-after", "1"))
    first = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt", expect_kind="mome")
    # the SGD holds the experts only, the Adam every gate parameter, at 4e-3 * (1 - 0/2)^0.9 in epoch 0
    assert len(first["optimizer"]["param_groups"]) == 1
    (adam_group,) = first["gate_optimizer"]["param_groups"]
    assert adam_group["lr"] == 4e-3 and "betas" in adam_group
    assert len(adam_group["params"]) == sum(1 for k in first["model"] if k.startswith("gate."))
    train.main(args("adam", "resumed", "--resume"))
    straight, resumed = (_weights(tmp_path / run / "checkpoint.pt") for run in ("straight", "resumed"))
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
    with pytest.raises(InputError, match="only continues the same run: --gate-optimizer: adam -> sgd"):
        train.main(args("sgd", "resumed", "--resume"))
    # a phase-1 checkpoint in --out is named as such, not blamed on the optimizer flag
    (tmp_path / "wrong_kind").mkdir()
    shutil.copy(experts[0], tmp_path / "wrong_kind" / "checkpoint.pt")
    with pytest.raises(InputError, match="is a mome_expert checkpoint, expected mome"):
        train.main(args("adam", "wrong_kind", "--resume"))


def test_demo_runs_end_to_end_at_toy_size(tmp_path, capsys):
    """The main job's plumbing (data, five experts, nnU-Net, MoME, three prediction sets, tables) in seconds."""
    demo.main(["--data", str(tmp_path / "data"), "--runs", str(tmp_path / "runs"), "--expert-epochs", "1",
               "--epochs", "1", "--steps-per-epoch", "1", "--cases", "4", "--unseen-cases",
               "1", "--shape", "16", "--device", "cpu", "--workers", "0"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "Dice at three averaging levels (Table 1)" in printed and "lesion types not trained on:" in printed
    assert "UNSEEN (mean over datasets)" in printed and "the universal nnU-Net gets 2 steps" in printed
    assert "stage times:" in printed
    with open(tmp_path / "runs" / "eval" / "table1.csv") as f:
        table = {r["model"]: r for r in csv.DictReader(f)}
    assert list(table) == ["MoME", "nnU-Net (universal)", "experts, oracle modality routing"]
    # seen: one held-out case per dataset (4 tumour images, 2 WMH, 1 DWI); unseen: scanner B of the same three;
    # new lesion: MS (3 images) + chronic stroke (1)
    assert (table["MoME"]["seen_n_image"], table["MoME"]["unseen_n_image"], table["MoME"]["new_lesion_n_image"]) == (
        "7", "7", "4")  # fmt: skip
    assert (table["MoME"]["seen_n_dataset"], table["MoME"]["seen_n_task"]) == ("3", "7")
    # T1 and FLAIR are seen in two datasets (two lesion types), T1ce, T2 and DWI in one
    with open(tmp_path / "runs" / "eval" / "per_task.csv") as f:
        seen_tasks = [(r["dataset"], r["modality"]) for r in csv.DictReader(f) if r["data"] == "seen"]
    assert sorted(m for d, m in seen_tasks) == ["DWI", "FLAIR", "FLAIR", "T1", "T1", "T1ce", "T2"]
    assert ("Dataset902_PhantomWMH", "T1") in seen_tasks


def test_expert_reduction_mean_divides_the_expert_term_by_the_batch(data, experts, tmp_path):
    """Same batches, a negligible lr: the logged expert term of --expert-reduction sum is batch (2) x mean."""
    logged = {}
    for reduction in ("sum", "mean"):
        out = tmp_path / reduction
        train.main(["--data", *data, "--modalities", "T1", "FLAIR", "DWI", "--experts", *experts, "--epochs", "2",
                    "--stop-after", "1", "--lr", "1e-12", "--expert-reduction", reduction, "--out", str(out),
                    "--workers", "0", *TINY])  # fmt: skip
        with open(out / "log.csv") as f:
            logged[reduction] = next(csv.DictReader(f))
    assert float(logged["sum"]["experts"]) == pytest.approx(2 * float(logged["mean"]["experts"]), rel=1e-4)
    assert float(logged["sum"]["mome"]) == pytest.approx(float(logged["mean"]["mome"]), rel=1e-4)
