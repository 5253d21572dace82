"""SAM-Med3D-MoE end to end on tiny phantoms: general -> expert -> gate (exact resume) -> predict -> evaluate,
the preprocessing by hand, the official-checkpoint converter and CLI errors.

Run: pytest tests/test_sam_med3d_moe_pipeline.py
"""

import argparse
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

from sam_med3d_moe import convert_checkpoint, evaluate, finetune_expert, predict, train, train_gate
from sam_med3d_moe.model import build_model
from sam_med3d_moe.predict import input_to_model
from sam_med3d_moe.preprocess import crop_at, crop_start, paste_at, to_model_grid, znorm_positive
from sam_med3d_moe.train_common import config_by_name
from shared.checkpoint import load_checkpoint, save_checkpoint
from shared.errors import InputError
from shared.phantom import write_phantom_datasets

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--folds",
    "4",
    "--fold",
    "0",
    "--num-clicks",
    "3",
    "--batch-size",
    "1",
    "--device",
    "cpu",
    "--save-every",
    "1",
    "--spacing",
    "1.5",
]


def _torchio_crop_start(bbox_min, bbox_max, size):
    """torchio's `_compute_mask_center_crop_or_pad` for one axis, step by step (crop_ini - pad_ini)."""
    center = (bbox_min + bbox_max + 1) / 2  # torchio's bb_max is exclusive
    if (size % 2 == 0) ^ (center % 1 == 0):
        center -= 0.5
    begin = center - size / 2
    crop_ini, pad_ini = (begin, 0) if begin >= 0 else (0, -begin)
    return int(crop_ini) - int(pad_ini)


def test_crop_start_matches_torchio_mask_centred_crop_or_pad():
    # by hand, size 128: box [10, 20] -> centre 15.5 -> 15 -> start -49; box [10, 21] -> centre 16 -> start -48
    assert crop_start([10, 10, 10], [20, 21, 200], 128).tolist() == [-49, -48, 41]
    rng = np.random.default_rng(0)
    for _ in range(500):
        size = int(rng.integers(1, 140))
        lo = rng.integers(-5, 200, size=3)
        hi = lo + rng.integers(0, 150, size=3)
        want = [_torchio_crop_start(int(a), int(b), size) for a, b in zip(lo, hi)]
        assert crop_start(lo, hi, size).tolist() == want, (lo, hi, size)


def test_crop_and_paste_round_trip_with_padding():
    data = np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7)
    start = crop_start([0, 5, 3], [0, 5, 3], 4)  # a one-voxel box at 0: the cube starts 2 voxels outside
    assert start.tolist() == [-2, 3, 1]
    crop = crop_at(data, start, 4)
    assert crop[:2].sum() == 0 and crop[2, 0, 0] == data[0, 3, 1] and crop[2, 1, 0] == data[0, 4, 1]
    assert crop[2, 2, 3] == data[0, 5, 4] and crop[:, 3].sum() == 0  # y = 6 lies outside the volume
    back = paste_at(crop, start, data.shape)
    assert np.array_equal(back[0:2, 3:6, 1:5], data[0:2, 3:6, 1:5]) and back.sum() == data[0:2, 3:6, 1:5].sum()


def test_znorm_uses_the_positive_voxels_and_the_unbiased_std():
    image = np.array([0.0, 0.0, 1.0, 2.0, 3.0, -1.0], dtype=np.float32)
    out = znorm_positive(image)
    mean, std = 2.0, 1.0  # over [1, 2, 3]: unbiased variance ((1 + 0 + 1) / 2) = 1
    assert np.allclose(out, (image - mean) / std)


def test_input_points_map_to_the_resampled_ras_grid():
    affine = np.array([[-1.0, 0, 0, 10], [0, 0, 2.0, -5], [0, -1.0, 0, 3], [0, 0, 0, 1]])  # flips + permutation
    data = np.zeros((12, 9, 7), dtype=np.float32)
    point = np.array([7, 5, 2])
    data[tuple(point)] = 1.0
    rs, canon_affine, _, canon_shape = to_model_grid(data, affine, spacing=0.5, order=0)  # finer: exact copies
    assert canon_shape == (12, 7, 9) and rs.shape == (24, 28, 18)
    mapped = input_to_model(point[None].astype(float), affine, canon_affine, canon_shape, rs.shape)[0]
    hits = np.argwhere(rs > 0)
    assert np.allclose(mapped, hits.mean(axis=0), atol=1e-6)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Tiny general model, lesion expert and MoE (2 steps each) on 4-case 24^3 phantoms."""
    root = tmp_path_factory.mktemp("sam_med3d_moe")
    anatomy, tumour = (
        str(d)
        for d in write_phantom_datasets(
            root / "data", datasets=["anatomy", "tumour"], cases=4, shape=(24, 24, 24), seed=2
        )
    )
    general, expert, moe = root / "general", root / "expert", root / "moe"
    train.main(
        ["--data", anatomy, "--modalities", "T1", "--config", "tiny", "--steps", "2", "--out", str(general), *TINY]
    )
    finetune_expert.main(
        [
            "--general",
            str(general / "checkpoint.pt"),
            "--data",
            tumour,
            "--modalities",
            "FLAIR",
            "--union",
            "--steps",
            "2",
            "--out",
            str(expert),
            *TINY,
        ]
    )
    gate = [
        "--general",
        str(general / "checkpoint.pt"),
        "--experts",
        str(expert / "checkpoint.pt"),
        "--data",
        anatomy,
        tumour,
        "--modalities",
        "T1",
        "FLAIR",
        "--union",
        tumour,
        "--gate-lr",
        "1e-3",
        "--steps",
        "2",
        *TINY,
    ]
    train_gate.main([*gate, "--out", str(moe)])
    return {
        "root": root,
        "anatomy": anatomy,
        "tumour": tumour,
        "general": general,
        "expert": expert,
        "moe": moe,
        "gate_args": gate,
    }


def test_expert_changes_only_the_decoder_and_moe_keeps_the_general_model(runs):
    general = load_checkpoint(runs["general"] / "checkpoint.pt", expect_kind="sam_med3d")["model"]
    expert = load_checkpoint(runs["expert"] / "checkpoint.pt", expect_kind="sam_med3d_expert")
    moe = load_checkpoint(runs["moe"] / "checkpoint.pt", expect_kind="sam_med3d_moe")["model"]
    assert expert["config"]["task"] == Path(runs["tumour"]).name
    changed = {k for k, v in general.items() if not torch.equal(v, expert["model"][k])}
    # frozen encoders, trained decoder; the IoU head is outside every loss (as officially), so it gets no gradient
    assert changed and all(k.startswith("mask_decoder.") for k in changed)
    assert "mask_decoder.transformer.layers.0.mlp.lin1.weight" in changed
    assert not any(k.startswith("mask_decoder.iou_prediction_head") for k in changed)
    assert all(torch.equal(v, moe[f"sam.{k}"]) for k, v in general.items())  # the general expert is never updated
    assert not torch.equal(
        moe["experts.0.iou_token.weight"], expert["model"]["mask_decoder.iou_token.weight"]
    ) or not torch.equal(moe["experts.0.mask_tokens.weight"], expert["model"]["mask_decoder.mask_tokens.weight"])


def test_assemble_refuses_an_expert_fine_tuned_from_another_general_model(runs, tmp_path):
    other = tmp_path / "other_general.pt"
    save_checkpoint(other, **build_model(config_by_name("tiny")).state_dict())
    with pytest.raises(InputError, match="was not fine-tuned from --general"):
        train_gate.assemble(other, [runs["expert"] / "checkpoint.pt"], "tiny", 0.5, "weighted")


def test_per_class_expert_and_the_gate_targets_of_its_classes(runs, tmp_path, monkeypatch):
    # an expert fine-tuned on label 2 of the anatomy only; with the lesion expert in the MoE, the gate target of
    # an anatomy label-2 target is 2, of the tumour's union targets 1, of any other anatomy label 0
    weak = tmp_path / "expert_label2"
    finetune_expert.main(
        ["--general", str(runs["general"] / "checkpoint.pt"), "--data", runs["anatomy"], "--modalities", "T1",
         "--labels", "2", "--steps", "1", "--out", str(weak), *TINY]
    )  # fmt: skip
    ckpt = load_checkpoint(weak / "checkpoint.pt")
    anatomy, tumour = Path(runs["anatomy"]).name, Path(runs["tumour"]).name
    assert ckpt["config"]["expert_task"] == {"datasets": [anatomy], "labels": [2]}
    assert ckpt["config"]["task"] == f"{anatomy}:labels2"
    picked, targets = [], []
    draw = train_gate.draw_batch

    def recording_draw(*a, **k):
        image, gt, who = draw(*a, **k)
        picked.extend(who)
        return image, gt, who

    def recording_loss(logits, target):
        targets.append(target.tolist())
        return torch.nn.functional.cross_entropy(logits, target)

    monkeypatch.setattr(train_gate, "draw_batch", recording_draw)
    monkeypatch.setattr(train_gate, "gate_loss", recording_loss)
    args = list(runs["gate_args"])
    args[args.index("--experts") + 1 : args.index("--experts") + 2] = [str(runs["expert"] / "checkpoint.pt"),
                                                                      str(weak / "checkpoint.pt")]  # fmt: skip
    args[args.index("--steps") + 1] = "6"
    train_gate.main([*args, "--batch-size", "2", "--out", str(tmp_path / "moe2")])
    rule = {(tumour, None): 1, (anatomy, 2): 2}
    want = [rule.get(p, 0) for p in picked]
    per_step = [targets[i * 3] for i in range(6)]  # 3 interaction steps (--num-clicks) share one target
    assert [t for step in per_step for t in step] == want
    assert set(want) == {0, 1, 2}  # all three kinds of target were drawn
    saved = load_checkpoint(tmp_path / "moe2" / "checkpoint.pt")["config"]
    assert saved["expert_tasks"][1] == {"datasets": [anatomy], "labels": [2]}


def test_gate_training_resumes_exactly(runs, tmp_path):
    train_gate.main([*runs["gate_args"], "--out", str(tmp_path / "resumed"), "--stop-after", "1"])
    train_gate.main([*runs["gate_args"], "--out", str(tmp_path / "resumed"), "--resume"])
    straight = load_checkpoint(runs["moe"] / "checkpoint.pt")["model"]
    resumed = load_checkpoint(tmp_path / "resumed" / "checkpoint.pt")["model"]
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_predict_writes_a_mask_in_the_input_grid(runs, tmp_path):
    image = sorted(Path(runs["tumour"], "imagesTr").glob("*_0003.nii.gz"))[0]
    label = Path(runs["tumour"], "labelsTr", image.name.replace("_0003", ""))
    model = str(runs["moe"] / "checkpoint.pt")
    for name, prompt in (
        ("point", ["--point", "12", "12", "12", "--point", "10", "12", "12"]),
        ("negative_ct", ["--point", "12", "12", "12", "--negative", "3", "3", "3", "--ct-clamp"]),
        ("box", ["--box", "6", "6", "6", "18", "18", "18"]),
        ("label", ["--label", str(label), "--clicks", "2"]),
    ):
        out = tmp_path / f"{name}.nii.gz"
        predict.main(["--model", model, "--image", str(image), "--output", str(out), "--device", "cpu", *prompt])
        written, ref = nib.load(out), nib.load(image)
        assert written.shape == ref.shape and np.allclose(written.affine, ref.affine)
        assert set(np.unique(np.asarray(written.dataobj))) <= {0, 1}


def test_evaluate_reports_clicks_max_and_box(runs, tmp_path):
    args = evaluate.parse_args(
        [
            "--model",
            str(runs["expert"] / "checkpoint.pt"),
            "--data",
            runs["tumour"],
            "--split",
            str(runs["moe"] / "split.json"),
            "--modalities",
            "FLAIR",
            "--union",
            "--clicks",
            "2",
            "--box",
            "--out",
            str(tmp_path),
            "--name",
            "expert",
            "--device",
            "cpu",
        ]
    )
    summary = evaluate.evaluate(args)
    row = summary[0]
    assert row["targets"] == 1 and {"dice_click1", "dice_click2", "dice_max_over_clicks", "dice_box"} <= set(row)
    assert row["dice_max_over_clicks"] >= max(row["dice_click1"], row["dice_click2"]) - 1e-4
    assert (tmp_path / "expert_targets.csv").is_file()


def test_box_prompts_only_from_trained_box_embeddings(runs, tmp_path):
    image = sorted(Path(runs["tumour"], "imagesTr").glob("*_0003.nii.gz"))[0]
    box = ["--box", "6", "6", "6", "18", "18", "18"]

    def predict_box(model, out, *extra):
        predict.main(
            ["--model", str(model), "--image", str(image), "--output", str(out), "--device", "cpu", *box, *extra]
        )
        return np.asarray(nib.load(out).dataobj)

    # the general run and the MoE trained boxes (--box-prob 0.5): recorded, per decoder in the MoE
    assert load_checkpoint(runs["general"] / "checkpoint.pt")["box_trained"] is True
    assert load_checkpoint(runs["moe"] / "checkpoint.pt")["box_trained"] == {"general": True, "experts": [True]}
    # a run with --box-prob 0 records untrained boxes, and predict refuses its --box in one sentence
    no_box = tmp_path / "no_box"
    train.main(["--data", runs["anatomy"], "--modalities", "T1", "--config", "tiny", "--steps", "1", "--box-prob",
                "0", "--out", str(no_box), *TINY])  # fmt: skip
    assert load_checkpoint(no_box / "checkpoint.pt")["box_trained"] is False
    with pytest.raises(InputError, match="never trained its box embeddings"):
        predict_box(no_box / "checkpoint.pt", tmp_path / "refused.nii.gz")
    assert not (tmp_path / "refused.nii.gz").exists()
    # a plain state_dict (official weights have no box embeddings): refused, or seeded with the explicit flag
    plain = tmp_path / "plain.pt"
    weights = load_checkpoint(runs["general"] / "checkpoint.pt")["model"]
    save_checkpoint(plain, **{k: v for k, v in weights.items() if "box_corner" not in k})
    with pytest.raises(InputError, match="plain state_dict"):
        predict_box(plain, tmp_path / "refused.nii.gz", "--config", "tiny")
    first = predict_box(plain, tmp_path / "a.nii.gz", "--config", "tiny", "--allow-untrained-box")
    again = predict_box(plain, tmp_path / "b.nii.gz", "--config", "tiny", "--allow-untrained-box")
    assert np.array_equal(first, again)  # every fresh initialisation in predict is seeded


def test_converter_needs_the_trust_flag_and_writes_a_plain_state_dict(tmp_path):
    weights = build_model(config_by_name("tiny", box_prompts=False)).state_dict()
    official = tmp_path / "official.pth"
    torch.save(
        {
            "epoch": 3,
            "model_state_dict": {f"module.{k}": v for k, v in weights.items()},
            "args": argparse.Namespace(lr=8e-4),
        },
        official,
    )
    out = tmp_path / "plain.pt"
    with pytest.raises(InputError, match="--trust-pickle"):
        convert_checkpoint.main(["--input", str(official), "--output", str(out), "--config", "tiny"])
    assert not out.exists()
    convert_checkpoint.main(["--input", str(official), "--output", str(out), "--config", "tiny", "--trust-pickle"])
    plain = torch.load(out, map_location="cpu", weights_only=True)
    assert set(plain) == set(weights) and all(torch.equal(plain[k], weights[k]) for k in weights)
    with pytest.raises(InputError, match="do not fit"):
        convert_checkpoint.main(["--input", str(official), "--output", str(tmp_path / "x.pt"), "--trust-pickle"])


def test_cli_errors_are_one_sentence_and_exit_2(runs, tmp_path):
    cmd = [
        sys.executable,
        "-m",
        "sam_med3d_moe.predict",
        "--model",
        str(runs["moe"] / "checkpoint.pt"),
        "--image",
        str(tmp_path / "missing.nii.gz"),
        "--output",
        str(tmp_path / "o.nii.gz"),
        "--point",
        "1",
        "2",
        "3",
    ]
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    assert res.returncode == 2 and res.stderr.strip().startswith("error:") and "missing.nii.gz" in res.stderr
    with pytest.raises(InputError, match="exactly one kind of prompt"):
        predict.parse_args(["--model", "m", "--image", "i", "--output", "o"])
    image = sorted(Path(runs["tumour"], "imagesTr").glob("*_0003.nii.gz"))[0]
    base = ["--model", str(runs["moe"] / "checkpoint.pt"), "--image", str(image), "--device", "cpu"]
    for prompt, flag in (
        (["--point", "12", "12", "40"], "--point 12 12 40"),
        (["--box", "0", "0", "0", "30", "5", "5"], "--box"),
    ):
        with pytest.raises(InputError, match=f"{flag}: lies outside the image"):
            predict.main([*base, "--output", str(tmp_path / "outside.nii.gz"), *prompt])
    assert not (tmp_path / "outside.nii.gz").exists()
    with pytest.raises(InputError, match="already holds a checkpoint"):
        train_gate.main([*runs["gate_args"], "--out", str(runs["moe"])])
    with pytest.raises(InputError, match="is a sam_med3d checkpoint, expected sam_med3d_expert"):
        train_gate.main(
            [
                *runs["gate_args"][:2],
                "--experts",
                str(runs["general"] / "checkpoint.pt"),
                *runs["gate_args"][4:],
                "--out",
                str(tmp_path / "bad"),
            ]
        )
