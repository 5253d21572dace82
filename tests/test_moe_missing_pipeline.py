"""moe_missing end to end on tiny MS phantoms: train from the shared cache, exact resume with loader workers,
validation and best.pt, dedicated models, predict with a missing file, evaluate with pooled folds.

Run: .venv/bin/python -m pytest -q tests/test_moe_missing_pipeline.py (add -m slow for the 2-rank torchrun run)
"""

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from scipy import ndimage

from moe_missing import evaluate, predict, train
from moe_missing.data import MissingModalityBatches
from moe_missing.model import build_model
from shared.checkpoint import load_checkpoint
from shared.cli import run_cli
from shared.errors import InputError
from shared.loader import training_batches
from shared.phantom import write_phantom_datasets
from shared.splits import split_datasets

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--features", "4", "8", "--patch", "16", "16", "16", "--batch-size", "2", "--folds", "2", "--device", "cpu",
        "--no-compile", "--log-every", "1", "--save-every", "100", "--val-every", "0", "--workers", "0"]  # fmt: skip


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


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return ["--cache", str(tmp_path_factory.mktemp("cache"))]


def _weights(path):
    return load_checkpoint(path)["model"]


def _rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def _voxels(path):
    return np.asarray(nib.load(str(path)).dataobj)


def _check_rows_against_saved_predictions(rows, data, pred_dir, min_lesion_mm3):
    """Every per_case.csv row = the numbers of its saved prediction against its label file, computed here:
    DSC, PPV and volumes by voxel counts, lesion counts as 26-connected components above `min_lesion_mm3`."""
    assert any(0 < float(r["dice"]) < 1 for r in rows)  # a partial overlap: the checks below can tell cases apart
    for row in rows:
        pred = _voxels(Path(pred_dir) / row["model"] / row["config"] / f"{row['case']}.nii.gz") > 0
        label_file = nib.load(f"{data}/labelsTr/{row['case']}.nii.gz")
        gt, voxel = np.asarray(label_file.dataobj) > 0, float(np.prod(label_file.header.get_zooms()[:3]))
        both = np.count_nonzero(pred & gt)
        assert float(row["dice"]) == pytest.approx(2 * both / (pred.sum() + gt.sum()) if pred.any() or gt.any() else 1)
        assert float(row["ppv"]) == pytest.approx(both / pred.sum() if pred.any() else 0.0)
        assert float(row["volume_pred"]) == pytest.approx(pred.sum() * voxel)
        assert float(row["volume_gt"]) == pytest.approx(gt.sum() * voxel)
        for mask, key in ((gt, "n_gt_lesions"), (pred, "n_pred_lesions")):
            components, n = ndimage.label(mask, structure=np.ones((3, 3, 3)))
            sizes = np.bincount(components.ravel())[1:] * voxel
            assert int(row[key]) == int(np.count_nonzero(sizes > min_lesion_mm3)), (row["model"], key)


def test_resume_with_workers_is_exact_and_validation_keeps_the_best(data, cache, tmp_path):
    common = ["--data", data, "--steps", "4", *TINY, *cache, "--val-every", "2"]
    train.main([*common, "--out", str(tmp_path / "straight")])
    train.main([*common, "--out", str(tmp_path / "resumed"), "--stop-after", "2", "--workers", "2"])
    assert load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["step"] == 2
    train.main([*common, "--out", str(tmp_path / "resumed"), "--resume", "--workers", "1"])
    straight, resumed = _weights(tmp_path / "straight" / "checkpoint.pt"), _weights(tmp_path / "resumed" /
                                                                                   "checkpoint.pt")  # fmt: skip
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)
    log = _rows(tmp_path / "straight" / "log.csv")
    assert [int(r["step"]) for r in log] == [1, 2, 3, 4]
    assert float(log[0]["reg"]) < 0 and float(log[0]["sd"]) > 0  # both terms of Eq. 7 are active
    val, val_resumed = _rows(tmp_path / "straight" / "val.csv"), _rows(tmp_path / "resumed" / "val.csv")
    assert [int(r["step"]) for r in val] == [2, 4] and val == val_resumed
    # every held-out case under each of its configurations: 7, or 3 for case 001 without T1
    held_out = json.loads((tmp_path / "straight" / "split.json").read_text())[Path(data).name]["val"]
    pairs = sum(3 if case == "PhantomMS_001" else 7 for case in held_out)
    assert all(int(r["pairs"]) == pairs and 0 < float(r["objective"]) for r in val)
    best = load_checkpoint(tmp_path / "straight" / "best.pt")
    objectives = {int(r["step"]): float(r["objective"]) for r in val}
    assert best["best"]["step"] == min(objectives, key=objectives.get) == best["step"]
    assert load_checkpoint(tmp_path / "straight" / "checkpoint.pt")["best"] == best["best"]


def test_augmented_training_resumes_exactly_with_workers(data, cache, tmp_path):
    common = ["--data", data, "--steps", "2", *TINY, *cache, "--augment", "--patch", "8", "8", "8"]
    train.main([*common, "--out", str(tmp_path / "straight")])
    train.main([*common, "--out", str(tmp_path / "resumed"), "--stop-after", "1", "--workers", "2"])
    train.main([*common, "--out", str(tmp_path / "resumed"), "--resume", "--workers", "1"])
    straight, resumed = _weights(tmp_path / "straight" / "checkpoint.pt"), _weights(tmp_path / "resumed" /
                                                                                   "checkpoint.pt")  # fmt: skip
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=0, atol=0, msg=key)


def test_predict_dedicated_and_evaluate_pooled_folds(data, cache, tmp_path, capsys):
    common = ["--data", data, "--steps", "1", *TINY, *cache]
    runs = {}
    for name, flags in (("ours", []), ("md", ["--no-moe", "--no-sd"]), ("dm", ["--dedicated", "011"])):
        for fold in (0, 1):
            runs[name, fold] = tmp_path / f"{name}_{fold}"
            train.main([*common, "--fold", str(fold), "--out", str(runs[name, fold]), *flags])
    ckpt = load_checkpoint(runs["dm", 0] / "checkpoint.pt")
    assert ckpt["dedicated"] == "011" and not any("gate" in k for k in ckpt["model"])  # the plain UNet

    model = str(runs["ours", 0] / "checkpoint.pt")
    predict.main(["--model", model, "--input", data, "--split", "Tr", "--output", str(tmp_path / "pred"), "--device",
                  "cpu", "--cases", "PhantomMS_000", "PhantomMS_001"])  # fmt: skip
    for case in ("PhantomMS_000", "PhantomMS_001"):  # 001 is predicted from T2 and FLAIR only
        image = nib.load(f"{data}/imagesTr/{case}_0001.nii.gz")
        out = nib.load(str(tmp_path / "pred" / f"{case}.nii.gz"))
        assert out.shape == image.shape and set(np.unique(np.asarray(out.dataobj))) <= {0, 1}
        np.testing.assert_allclose(out.affine, image.affine)

    names = ["ours", "ours", "MD", "MD", "DM", "DM"]
    folders = [str(runs[n, f]) for n in ("ours", "md", "dm") for f in (0, 1)]
    evaluate.main(["--data", data, "--models", *folders, "--names", *names, "--held-out", "--device", "cpu",
                   "--min-lesion-volume", "3", "--out", str(tmp_path / "eval"), "--save-predictions"])  # fmt: skip
    printed = " ".join(capsys.readouterr().out.split())
    assert "Corr alone moves CScore by up to +-25 points; an all-background prediction scores 25" in printed
    per_case = _rows(tmp_path / "eval" / "per_case.csv")
    _check_rows_against_saved_predictions(per_case, data, tmp_path / "eval" / "pred", min_lesion_mm3=3)
    # evaluate's T2+FLAIR prediction of ours is predict's with T1 left out (a zero channel, code bit 0)
    case, config = "PhantomMS_000", "T2+FLAIR"
    (row,) = [r for r in per_case if r["model"] == "ours" and r["case"] == case and r["config"] == config]
    predict.main(["--model", row["run"], "--input", data, "--split", "Tr", "--output", str(tmp_path / "use"),
                  "--device", "cpu", "--cases", case, "--use", "T2", "FLAIR"])  # fmt: skip
    saved = _voxels(tmp_path / "eval" / "pred" / "ours" / config / f"{case}.nii.gz")
    np.testing.assert_array_equal(_voxels(tmp_path / "use" / f"{case}.nii.gz"), saved)
    assert list(per_case[0])[:3] == ["model", "config", "case"]
    assert {"hd95", "lesion_f1", "n_gt_lesions", "n_pred_lesions", "cscore"} <= set(per_case[0])
    ours = [r for r in per_case if r["model"] == "ours"]
    assert len(ours) == 3 * 7 + 3  # both folds pooled: every case once, 001 (no T1) under its 3 configurations
    assert len({r["run"] for r in ours}) == 2
    for config in {r["config"] for r in ours}:  # Corr over the pooled folds: one value per configuration
        assert len({r["corr"] for r in ours if r["config"] == config}) == 1
    dm = [r for r in per_case if r["model"] == "DM"]
    assert {r["config"] for r in dm} == {"T2+FLAIR"} and len(dm) == 4  # its code on every case that has it
    table = _rows(tmp_path / "eval" / "table.csv")
    paper_rows = ["T1", "T2", "FLAIR", "T1+T2", "T2+FLAIR", "T1+FLAIR", "T1+T2+FLAIR"]
    assert [r["config"] for r in table if r["model"] == "ours"] == [*paper_rows, "all", "shared"]
    assert [r["config"] for r in table if r["model"] == "DM"] == ["T2+FLAIR", "shared"]  # DM 011 has no "all" row
    assert {r["over"] for r in table if r["config"] == "shared"} == {"T2+FLAIR"}
    tests = _rows(tmp_path / "eval" / "tests.csv")
    assert [(r["other"], r["metric"], r["pairs"]) for r in tests] == [
        ("MD", "dice", "24"), ("MD", "cscore", "24"), ("DM", "dice", "4"), ("DM", "cscore", "4")]  # fmt: skip
    assert {r["model"] for r in _rows(tmp_path / "eval" / "gate_stats.csv")} == {"ours"}  # MD and DM have no gate


def test_predict_gives_the_model_a_missing_file_as_a_zero_channel_and_code_bit_0(data, cache, tmp_path, monkeypatch):
    train.main(["--data", data, "--steps", "1", *TINY, *cache, "--out", str(tmp_path / "run")])
    seen, real_load = [], predict.load_model

    def load_and_watch(path, device):  # record what every forward of the model is given
        model, ckpt = real_load(path, device)
        model.register_forward_pre_hook(lambda module, args: seen.append((args[0].clone(), args[1].clone())))
        return model, ckpt

    monkeypatch.setattr(predict, "load_model", load_and_watch)
    argv = ["--model", str(tmp_path / "run" / "checkpoint.pt"), "--input", data, "--split", "Tr", "--device", "cpu"]
    for case, use, out in (("PhantomMS_001", [], "absent"), ("PhantomMS_000", ["--use", "T2", "FLAIR"], "use"),
                           ("PhantomMS_000", [], "full")):  # fmt: skip
        seen.clear()
        predict.main([*argv, "--cases", case, *use, "--output", str(tmp_path / out)])
        assert seen
        for x, code in seen:  # every tile: (tiles, K, D, H, W) and (tiles, K)
            want = [1.0, 1.0, 1.0] if out == "full" else [0.0, 1.0, 1.0]
            assert code.tolist() == [want] * len(code), (out, code)
            for k in range(3):  # T1 (channel 0) exactly zero when absent, the others real (z-scored) images
                assert bool((x[:, k] == 0).all()) == (want[k] == 0), (out, k)


def test_several_datasets_with_the_model_modalities_train_together(data, cache, tmp_path):
    (wmh,) = write_phantom_datasets(tmp_path / "wmh", datasets=["wmh"], cases=2, shape=(16, 16, 16), seed=3)
    out = tmp_path / "both"
    # MS has T1, T2, FLAIR and WMH T1, FLAIR: a T1+FLAIR model trains on both (channels matched by name)
    train.main(["--data", data, str(wmh), "--modalities", "T1", "FLAIR", "--steps", "1", *TINY, *cache, "--out",
                str(out)])  # fmt: skip
    split = json.loads((out / "split.json").read_text())
    assert set(split) == {Path(data).name, wmh.name} and all(split[d]["train"] for d in split)
    assert tuple(load_checkpoint(out / "checkpoint.pt")["config"]["modalities"]) == ("T1", "FLAIR")
    with pytest.raises(InputError, match="has no channel \\['T2'\\]"):
        train.parse_args(["--data", data, str(wmh), "--out", str(tmp_path / "x")])  # T2 is not in WMH


def test_anisotropic_input_and_plain_folder_come_back_in_the_native_grid(data, cache, tmp_path):
    model_dir = tmp_path / "dm"
    train.main(["--data", data, "--steps", "1", *TINY, *cache, "--out", str(model_dir), "--dedicated", "011"])
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


def test_a_nan_loss_stops_with_the_step_and_the_last_good_checkpoint(data, cache, tmp_path, monkeypatch, capsys):
    real = train.total_loss

    def nan_at_step_2(*args, step, **kwargs):
        loss = real(*args, step=step, **kwargs)
        return loss * float("nan") if step == 2 else loss

    monkeypatch.setattr(train, "total_loss", nan_at_step_2)
    out = tmp_path / "nan"
    argv = ["--data", data, "--steps", "4", *TINY, *cache, "--out", str(out), "--save-every", "1"]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: train.main(argv))
    assert exit_info.value.code == 3
    err = capsys.readouterr().err
    assert f"loss is NaN at step 2; last good checkpoint kept at {out / 'checkpoint.pt'}" in err
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2  # the state after steps 0 and 1
    with pytest.raises(SystemExit):
        run_cli(lambda: train.main([*argv[:-4], "--out", str(tmp_path / "nan0"), "--save-every", "100"]))
    assert "loss is NaN at step 2; no checkpoint written yet" in capsys.readouterr().err


def test_clip_0_trains_without_clipping_the_gradient(data, cache, tmp_path, monkeypatch):
    thresholds = []
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm: thresholds.append(max_norm))
    for clip in ("0", "5"):
        train.main(["--data", data, "--steps", "1", *TINY, *cache, "--out", str(tmp_path / clip), "--clip", clip])
    assert thresholds == [5.0]  # the default 12 is not the paper's: --clip 0 is the paper's unclipped step


def test_help_shows_every_default(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: 0.2)" in text and "(default: 96 96 96)" in text and "(default: objective)" in text


def test_dedicated_model_has_exactly_the_parameters_of_no_moe(data, tmp_path):
    common = ["--data", data, "--out", str(tmp_path), "--features", "4", "8"]
    dedicated = train.parse_args([*common, "--dedicated", "101"])
    plain = train.parse_args([*common, "--no-moe"])
    assert train.config_from_args(dedicated) == train.config_from_args(plain)
    assert dedicated.no_sd and dedicated.no_reg  # one view, no MoE layer: neither L_sd nor L_reg
    shapes = {k: v.shape for k, v in build_model(train.config_from_args(dedicated)).state_dict().items()}
    assert shapes == {k: v.shape for k, v in build_model(train.config_from_args(plain)).state_dict().items()}
    assert build_model(train.config_from_args(dedicated)).moe_layers() == []


def test_cli_exit_code_and_message_on_broken_checkpoint(data, tmp_path):
    broken = tmp_path / "broken.pt"
    broken.write_bytes(b"not a checkpoint")
    result = subprocess.run([sys.executable, "-m", "moe_missing.predict", "--model", str(broken), "--input", data,
                             "--split", "Tr", "--output", str(tmp_path / "out")], cwd=ROOT, capture_output=True,
                            text=True)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and str(broken) in result.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_two_rank_gloo_training_with_validation(data, tmp_path):
    """torchrun, 2 CPU ranks: rank 0 builds the caches while rank 1 waits, validation sums both ranks' cases."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--nnodes=1", "--master_addr=127.0.0.1",
           "--master_port", str(29500 + os.getpid() % 1000), "-m", "moe_missing.train", "--data", data, "--steps", "2",
           *TINY, "--cache", str(tmp_path / "cache"), "--val-every", "2", "--out", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    held_out = json.loads((out / "split.json").read_text())[Path(data).name]["val"]
    (row,) = _rows(out / "val.csv")
    assert int(row["pairs"]) == sum(3 if case == "PhantomMS_001" else 7 for case in held_out)
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 2 and (out / "best.pt").exists()


# ----------------------------------------------------------------------------- the loss the training loop computes


def _naive_dice_ce(logits, target):
    """MONAI DiceCE written out: soft Dice per sample and class (background included) + CE, mean over the batch."""
    p = torch.softmax(logits, dim=1)
    if not target.dtype.is_floating_point:
        target = torch.stack([(target == c).float() for c in range(logits.shape[1])], dim=1)
    dice = 1 - (2 * (p * target).sum((2, 3, 4)) + 1e-5) / (p.sum((2, 3, 4)) + target.sum((2, 3, 4)) + 1e-5)
    ce = -(target * torch.log_softmax(logits, dim=1)).sum(1).mean((1, 2, 3))
    return (dice.mean(1) + ce).mean()


def _naive_reg(model):
    """Eq. (4) with the '-' sign, summed over the MoE layers, on the noise-free gates of the 7 codes."""
    codes = torch.tensor([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]]).float()
    total = torch.zeros(())
    for layer in model.moe_layers():
        phi = torch.softmax(layer.gate(codes), dim=1)  # (7, N)
        mean = phi.mean(0)
        balance = mean.std(correction=0) / mean.mean()
        total = total + balance - (phi.std(1, correction=0) / phi.mean(1)).mean()
    return total


@pytest.mark.parametrize("kind", ["ours", "no-reg", "md", "dm"])
def test_training_loop_adds_the_losses_of_eq_5_to_7_as_the_paper_composes_them(data, cache, tmp_path, kind):
    """Three logged steps of the real loop against the loss composed here from the same batches and weights.

    lr 1e-30: Adam moves no float32 weight, so checkpoint.pt holds the weights every step was computed with.
    Ours: L = L_seg(full, dropped) + alpha L_reg + w(t) beta L_sd, the full view on the case's own code (all
    cases are drawn, 001 has no T1); --no-reg: no alpha L_reg; MD (--no-moe --no-sd): L_seg only; DM: DiceCE of
    its one view only.
    """
    flags = {"ours": [], "no-reg": ["--no-reg"], "md": ["--no-moe", "--no-sd"], "dm": ["--dedicated", "011"]}[kind]
    out = tmp_path / kind
    argv = ["--data", data, *TINY, *cache, "--fold", "-1", "--steps", "6", "--stop-after", "3", "--lr", "1e-30",
            "--alpha", "0.3", "--beta", "0.7", "--tau", "1.5", "--out", str(out), *flags]  # fmt: skip
    train.main(argv)
    args = train.parse_args(argv)
    cases = train.cached_cases(args, split_datasets(args.data, fold=-1, folds=2), "train",
                               SimpleNamespace(is_main=True, world_size=1))  # fmt: skip
    assert any(c.available == (0, 1, 1) for c in cases)  # the full view of case 001 has the code 011
    draw = MissingModalityBatches(cases, batch_size=2, patch=(16, 16, 16), fg_prob=0.8, dedicated=args.dedicated)
    model = build_model(train.config_from_args(args))
    model.load_state_dict(_weights(out / "checkpoint.pt"))
    model.train()  # gate noise from the batch's eps, as in the loop
    log = _rows(out / "log.csv")
    batches = training_batches(draw, seed=args.seed, rank=0, start=0, stop=3, workers=0, device=torch.device("cpu"))
    for batch, row in zip(batches, log, strict=True):
        x, y, available, code, eps = batch["image"], batch["label"], batch["available"], batch["code"], batch["eps"]
        dropped_x = x * code[:, :, None, None, None]  # Eq. (1)
        with torch.no_grad():
            if kind == "dm":
                expected = _naive_dice_ce(model(dropped_x, code), y)
            else:
                B = len(x)
                full = model(x, available, eps[:B])  # the teacher sees every channel the case has
                dropped = model(dropped_x, code, eps[B:])
                expected = _naive_dice_ce(full, y) + _naive_dice_ce(dropped, y)  # Eq. (5)
                if kind in ("ours", "no-reg"):
                    t, length = batch["step"], 6 / 3  # w(t) of Eq. (7): exp(-5 (1 - t/L)^2), 1 after L
                    w = math.exp(-5 * (1 - min(t, length) / length) ** 2)
                    sd = _naive_dice_ce(dropped / 1.5, torch.softmax(full / 1.5, dim=1))  # Eq. (6), teacher = full
                    expected = expected + 0.3 * _naive_reg(model) * (kind == "ours") + w * 0.7 * sd
                    assert float(row["w"]) == pytest.approx(w, rel=1e-12)
        assert float(row["loss"]) == pytest.approx(float(expected), rel=1e-5, abs=1e-6), (kind, batch["step"])
        if kind in ("md", "dm"):
            assert float(row["sd"]) == 0 and float(row["reg"]) == 0
    assert [int(r["step"]) for r in log] == [1, 2, 3]
