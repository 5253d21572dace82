"""nnU-Net checkpoint import, DNA parity. Run: .venv/bin/python -m pytest -q tests/test_mome_nnunet_import.py"""

import argparse

import numpy as np
import pytest
import torch
from torch import nn

from mome import load_nnunet_expert, load_nnunet_mome
from mome.nnunet_import import plain_state_dict, read_nnunet_checkpoint, to_nnunet_state_dict
from shared.errors import InputError

dna_unet = pytest.importorskip("dynamic_network_architectures.architectures.unet")


def dna_plain_unet(*, in_channels=1, num_classes=2, features=(8, 16, 32, 32), kernels=3, strides=None, seed=0):
    """A reference nnU-Net PlainConvUNet (3d_fullres building blocks) with randomised weights, norms included."""
    torch.manual_seed(seed)
    n = len(features)
    net = dna_unet.PlainConvUNet(
        input_channels=in_channels,
        n_stages=n,
        features_per_stage=list(features),
        conv_op=nn.Conv3d,
        kernel_sizes=kernels if not isinstance(kernels, int) else [[kernels] * 3] * n,
        strides=strides or [[1, 1, 1]] + [[2, 2, 2]] * (n - 1),
        n_conv_per_stage=[2] * n,
        num_classes=num_classes,
        n_conv_per_stage_decoder=[2] * (n - 1),
        conv_bias=True,
        norm_op=nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True},
        nonlin=nn.LeakyReLU,
        nonlin_kwargs={"inplace": True},
        deep_supervision=True,
    )
    with torch.no_grad():
        for p in net.parameters():  # default norm affine (1, 0) would hide a swapped weight/bias
            p.copy_(torch.randn_like(p) * 0.2)
    return net.eval()


def save_nnunet_checkpoint(path, net):
    """Mimic nnU-Net's save_checkpoint, including its non-tensor entries (numpy floats, torch.device)."""
    torch.save(
        {
            "network_weights": net.state_dict(),
            "optimizer_state": {"state": {}, "param_groups": [{"lr": 1e-2, "momentum": 0.99, "params": [0]}]},
            "grad_scaler_state": None,
            "logging": {"ema_fg_dice": [np.float64(0.41), np.float64(0.52)], "mean_fg_dice": [np.float32(0.5)]},
            "_best_ema": np.float64(0.52),
            "current_epoch": 10,
            "init_args": {"configuration": "3d_fullres", "fold": 0, "device": torch.device("cpu")},
            "trainer_name": "nnUNetTrainer",
            "inference_allowed_mirroring_axes": (0, 1, 2),
        },
        path,
    )


def assert_close(a, b, tol=1e-5):
    diff = (a - b).abs()
    assert diff.max() <= tol, f"max diff {diff.max():.3g}, mean diff {diff.mean():.3g}"


@pytest.mark.parametrize(
    "kernels, strides",
    [
        (3, None),
        ([[1, 3, 3], [3, 3, 3], [3, 3, 3], [3, 3, 3]], [[1, 1, 1], [1, 2, 2], [2, 2, 2], [2, 2, 2]]),
    ],
)
def test_nnunet_checkpoint_parity(tmp_path, kernels, strides):
    ref = dna_plain_unet(kernels=kernels, strides=strides)
    # the reference state_dict really carries the aliases the importer must fold
    keys = ref.state_dict().keys()
    assert "encoder.stages.0.0.convs.0.all_modules.0.weight" in keys
    assert "decoder.encoder.stages.0.0.convs.0.conv.weight" in keys
    save_nnunet_checkpoint(tmp_path / "checkpoint_best.pth", ref)
    ours = load_nnunet_expert(tmp_path / "checkpoint_best.pth")
    assert not ours.training
    assert ours.arch["strides"] == [tuple(s) for s in (strides or [[1, 1, 1]] + [[2, 2, 2]] * 3)]
    x = torch.randn(2, 1, 16, 16, 16)
    with torch.no_grad():
        expected, got = ref(x), ours(x)
    assert len(got) == len(expected) == 3
    for e, g in zip(expected, got):
        assert e.shape == g.shape
        assert_close(e, g)
    # without deep supervision only the full-resolution logits come back
    single = load_nnunet_expert(tmp_path / "checkpoint_best.pth", deep_supervision=False)
    with torch.no_grad():
        assert_close(single(x), expected[0])


def test_export_back_to_nnunet_loads_strictly(tmp_path):
    torch.save({"network_weights": dna_plain_unet(seed=1).state_dict()}, tmp_path / "c.pth")
    ours = load_nnunet_expert(tmp_path / "c.pth")
    fresh = dna_plain_unet(seed=2)
    fresh.load_state_dict(to_nnunet_state_dict(ours), strict=True)
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert_close(fresh(x)[0], ours(x)[0])


def test_compile_and_ddp_prefixes_are_stripped(tmp_path):
    ref = dna_plain_unet()
    sd = {f"module._orig_mod.{k}": v for k, v in ref.state_dict().items()}
    torch.save({"network_weights": sd}, tmp_path / "c.pth")
    ours = load_nnunet_expert(tmp_path / "c.pth")
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        assert_close(ours(x)[0], ref(x)[0])


def test_disagreeing_aliases_are_rejected():
    sd = {k: v.clone() for k, v in dna_plain_unet().state_dict().items()}
    sd["encoder.stages.0.0.convs.0.all_modules.0.weight"] += 1.0
    with pytest.raises(InputError, match="aliases"):
        plain_state_dict(sd)


def test_shape_mismatch_and_bad_files(tmp_path):
    with pytest.raises(InputError, match=r"^nnU-Net checkpoint .*missing\.pth: file not found\.$"):
        read_nnunet_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match=r"junk\.pth: not a readable checkpoint"):
        read_nnunet_checkpoint(tmp_path / "junk.pth")
    # an object that weights_only may not rebuild is refused, never loaded with weights_only=False
    torch.save({"network_weights": {"w": torch.zeros(1)}, "args": argparse.Namespace(a=1)}, tmp_path / "ns.pth")
    with pytest.raises(InputError, match="argparse.Namespace"):
        read_nnunet_checkpoint(tmp_path / "ns.pth")
    torch.save({"network_weights": {"foo.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="not an nnU-Net PlainConvUNet"):
        load_nnunet_expert(tmp_path / "other.pth")
    # a decoder conv whose width contradicts the encoder: the per-key shape check names it
    sd = dict(dna_plain_unet().state_dict())
    key = "decoder.stages.2.convs.0.conv.weight"
    sd[key] = torch.zeros(8, 15, 3, 3, 3)
    sd = {k: v for k, v in sd.items() if k != "decoder.stages.2.convs.0.all_modules.0.weight"}
    torch.save({"network_weights": sd}, tmp_path / "bad.pth")
    with pytest.raises(InputError, match=r"decoder\.stages\.2\.convs\.0\.conv\.weight has shape \(8, 15, 3, 3, 3\)"):
        load_nnunet_expert(tmp_path / "bad.pth")


def test_official_mome_release_matches_reference_formula(tmp_path):
    """Gate on cat(image, stage-0 features) weights expert k by channels [2k:2k+2] (official train_step)."""
    experts = [dna_plain_unet(seed=10 + k) for k in range(2)]
    gate = dna_plain_unet(in_channels=1 + 2 * 8, num_classes=2 * 2, seed=20)
    for k, net in enumerate(experts):
        save_nnunet_checkpoint(tmp_path / f"checkpoint_best{k + 1}.pth", net)
    save_nnunet_checkpoint(tmp_path / "checkpoint_best.pth", gate)
    model = load_nnunet_mome(
        tmp_path / "checkpoint_best.pth", [tmp_path / f"checkpoint_best{k + 1}.pth" for k in (0, 1)]
    )
    x = torch.randn(1, 1, 16, 16, 16)
    with torch.no_grad():
        shallow = [net.encoder.stages[0](x) for net in experts]
        g = gate(torch.cat([x, *shallow], dim=1))
        outs = [net(x) for net in experts]
        expected = [sum(outs[k][lvl] * g[lvl][:, 2 * k : 2 * k + 2] for k in range(2)) for lvl in range(3)]
        got = model(x)
    for e, o in zip(expected, got):
        assert_close(o, e, tol=1e-4)
