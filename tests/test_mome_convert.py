"""mome.convert_checkpoint: an official-style release (gate + experts as nnU-Net checkpoints) runs in mome.predict.

Run: .venv/bin/python -m pytest -q tests/test_mome_convert.py
"""

import argparse
import copy

import numpy as np
import pytest
import torch

from mome import convert_checkpoint, predict
from mome.nnunet_plans import read_plans
from shared.checkpoint import load_checkpoint
from shared.errors import InputError

dna_unet = pytest.importorskip("dynamic_network_architectures.architectures.unet")

from test_mome_nnunet_import import assert_close, dna_plain_unet, save_nnunet_checkpoint  # noqa: E402

FEATURES = (8, 16, 32, 32)  # 4 stages: strides 1, 2, 2, 2 -> patches divisible by 8
N = 2  # experts of the small release (the official one has 5)

PLANS_V24 = {
    "transpose_forward": [0, 1, 2],
    "configurations": {
        "3d_fullres": {
            "patch_size": [16, 16, 24],
            "normalization_schemes": ["ZScoreNormalization"],
            "use_mask_for_norm": [False],
            "architecture": {
                "network_class_name": "dynamic_network_architectures.architectures.unet.PlainConvUNet",
                "arch_kwargs": {
                    "n_stages": 4,
                    "features_per_stage": list(FEATURES),
                    "conv_op": "torch.nn.modules.conv.Conv3d",
                    "kernel_sizes": [[3, 3, 3]] * 4,
                    "strides": [[1, 1, 1]] + [[2, 2, 2]] * 3,
                    "n_conv_per_stage": [2] * 4,
                    "n_conv_per_stage_decoder": [2] * 3,
                    "conv_bias": True,
                    "norm_op": "torch.nn.modules.instancenorm.InstanceNorm3d",
                    "norm_op_kwargs": {"eps": 1e-05, "affine": True},
                    "dropout_op": None,
                    "nonlin": "torch.nn.LeakyReLU",
                    "nonlin_kwargs": {"inplace": True},
                },
            },
        }
    },
}
# the same network in nnU-Net 2.2's keys (the version MoME forks), in a configuration that inherits it and
# overrides the patch (`inherits_from`)
PLANS_V22 = {
    "configurations": {
        "3d_fullres": {
            "patch_size": [16, 16, 16],
            "UNet_class_name": "PlainConvUNet",
            "UNet_base_num_features": 8,
            "unet_max_num_features": 32,
            "n_conv_per_stage_encoder": [2] * 4,
            "n_conv_per_stage_decoder": [2] * 3,
            "pool_op_kernel_sizes": [[1, 1, 1]] + [[2, 2, 2]] * 3,
            "conv_kernel_sizes": [[3, 3, 3]] * 4,
        },
        "3d_cascade_fullres": {"inherits_from": "3d_fullres", "patch_size": [16, 16, 24]},
    }
}


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    """fold_MoME/checkpoint_best.pth (gate) and checkpoint_best1..N.pth (experts), plus their DNA networks."""
    root = tmp_path_factory.mktemp("release") / "fold_MoME"
    root.mkdir()
    experts = [dna_plain_unet(features=FEATURES, seed=30 + k) for k in range(N)]
    gate = dna_plain_unet(in_channels=1 + N * FEATURES[0], num_classes=2 * N, features=FEATURES, seed=40)
    for k, net in enumerate(experts):
        save_nnunet_checkpoint(root / f"checkpoint_best{k + 1}.pth", net)
    save_nnunet_checkpoint(root / "checkpoint_best.pth", gate)
    return root, experts, gate


def official_prediction(experts, gate, x):
    """The official predictor per tile: sum_k expert_k(x) * gate(x || F)[:, 2k:2k+2], full resolution."""
    with torch.no_grad():
        shallow = [net.encoder.stages[0](x) for net in experts]
        g = gate(torch.cat([x, *shallow], dim=1))[0]
        return sum(net(x)[0] * g[:, 2 * k : 2 * k + 2] for k, net in enumerate(experts))


def test_converted_release_predicts_as_the_official_formula(release, tmp_path):
    root, experts, gate = release
    out = tmp_path / "mome_official.pt"
    convert_checkpoint.main(["--release", str(root), "--modalities", "T1", "FLAIR", "--patch", "16", "16", "16",
                             "--grid", "16", "16", "24", "--output", str(out)])  # fmt: skip
    ckpt = load_checkpoint(out, expect_kind="mome")
    assert ckpt["patch"] == [16, 16, 16] and ckpt["grid"] == [16, 16, 24] and ckpt["mirror_axes"] == [0, 1, 2]
    assert tuple(ckpt["config"]["features"]) == FEATURES and ckpt["config"]["modalities"] == ("T1", "FLAIR")
    model, info = predict.load_model(out, torch.device("cpu"))
    assert info["kind"] == "mome" and info["grid"] == (16, 16, 24)
    x = torch.randn(1, 1, 16, 16, 24)
    with torch.no_grad():
        assert_close(model(x), official_prediction(experts, gate, x), tol=1e-4)
    with pytest.raises(InputError, match="exists; pass --force"):
        convert_checkpoint.parse_args(["--release", str(root), "--modalities", "T1", "FLAIR", "--output", str(out)])


@pytest.mark.parametrize("plans", [PLANS_V24, PLANS_V22], ids=["nnunet-2.4", "nnunet-2.2"])
def test_patch_comes_from_the_plans_stored_in_the_gate_checkpoint(release, tmp_path, plans):
    root, experts, gate = release
    configuration = "3d_fullres" if plans is PLANS_V24 else "3d_cascade_fullres"
    gate_path = tmp_path / "checkpoint_best.pth"
    save_nnunet_checkpoint(gate_path, gate)
    ckpt = torch.load(gate_path, weights_only=False)
    ckpt["init_args"] |= {"plans": plans, "configuration": configuration}
    torch.save(ckpt, gate_path)
    out = tmp_path / "converted.pt"
    convert_checkpoint.main(["--gate", str(gate_path), "--experts", *[str(root / f"checkpoint_best{k}.pth")
                             for k in (1, 2)], "--modalities", "T1", "FLAIR", "--output", str(out)])  # fmt: skip
    converted = load_checkpoint(out)
    assert converted["patch"] == [16, 16, 24]
    assert "plans stored in" in converted["source"]["patch_from"]


def test_plans_that_contradict_the_weights_or_predict_are_refused(release, tmp_path):
    root, _, _ = release
    wider = copy.deepcopy(PLANS_V24)
    wider["configurations"]["3d_fullres"]["architecture"]["arch_kwargs"]["features_per_stage"] = [8, 16, 32, 64]
    (tmp_path / "plans.json").write_text(__import__("json").dumps(wider))
    args = ["--release", str(root), "--modalities", "T1", "FLAIR", "--plans", str(tmp_path / "plans.json"),
            "--output", str(tmp_path / "x.pt")]  # fmt: skip
    with pytest.raises(InputError, match=r"features \(8, 16, 32, 64\) contradicts the weights \(\(8, 16, 32, 32\)\)"):
        convert_checkpoint.main(args)
    assert not (tmp_path / "x.pt").exists()
    masked = copy.deepcopy(PLANS_V24)
    masked["configurations"]["3d_fullres"]["use_mask_for_norm"] = [True]
    with pytest.raises(InputError, match="z-scores the whole volume"):
        read_plans(masked)
    transposed = copy.deepcopy(PLANS_V24) | {"transpose_forward": [2, 0, 1]}
    with pytest.raises(InputError, match="reorders the axes"):
        read_plans(transposed)
    # v2.2 plans give the same topology as v2.4 plans of the same network
    assert read_plans(PLANS_V22, "3d_cascade_fullres") == read_plans(PLANS_V24)
    # no plans anywhere and no --patch: refused rather than guessed
    with pytest.raises(InputError, match="records no plans"):
        convert_checkpoint.main(["--release", str(root), "--modalities", "T1", "FLAIR", "--output",
                                 str(tmp_path / "y.pt")])  # fmt: skip
    with pytest.raises(InputError, match="not divisible by the network's strides"):
        convert_checkpoint.main(["--release", str(root), "--modalities", "T1", "FLAIR", "--patch", "12", "16", "16",
                                 "--output", str(tmp_path / "y.pt")])  # fmt: skip


def test_pickled_inputs_need_trust_pickle(release, tmp_path):
    root, experts, gate = release
    gate_path = tmp_path / "checkpoint_best.pth"
    save_nnunet_checkpoint(gate_path, gate)
    ckpt = torch.load(gate_path, weights_only=False)
    ckpt["init_args"]["args"] = argparse.Namespace(fold="MoME")  # an object weights_only may not rebuild
    torch.save(ckpt, gate_path)
    args = ["--gate", str(gate_path), "--experts", *[str(root / f"checkpoint_best{k}.pth") for k in (1, 2)],
            "--modalities", "T1", "FLAIR", "--patch", "16", "16", "16", "--output", str(tmp_path / "o.pt")]  # fmt: skip
    with pytest.raises(
        InputError,
        match=r"holds pickled Python objects \(argparse\.Namespace\), which are not loaded because "
        r"unpickling runs code; pass --trust-pickle if you trust its origin\.$",
    ):
        convert_checkpoint.main(args)
    convert_checkpoint.main([*args, "--trust-pickle"])
    model, _ = predict.load_model(tmp_path / "o.pt", torch.device("cpu"))
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert_close(model(x), official_prediction(experts, gate, x), tol=1e-4)
    # the output itself is plain: it loads with weights_only=True
    assert isinstance(torch.load(tmp_path / "o.pt", weights_only=True)["model"], dict)


def test_bad_arguments(release, tmp_path):
    root, _, _ = release
    with pytest.raises(InputError, match="either --release DIR or --gate and --experts"):
        convert_checkpoint.parse_args(["--output", str(tmp_path / "a.pt")])
    with pytest.raises(InputError, match="checkpoint_best3.pth: checkpoint file not found"):
        convert_checkpoint.parse_args(["--release", str(root), "--output", str(tmp_path / "a.pt")])  # 5 experts
    with pytest.raises(InputError, match="--experts lists 1 files but --modalities has 2"):
        convert_checkpoint.parse_args(["--gate", str(root / "checkpoint_best.pth"), "--experts",
                                       str(root / "checkpoint_best1.pth"), "--modalities", "T1", "FLAIR",
                                       "--output", str(tmp_path / "a.pt")])  # fmt: skip
    np.testing.assert_equal(convert_checkpoint.OFFICIAL_ORDER, ("T1", "T1ce", "T2", "FLAIR", "DWI"))
