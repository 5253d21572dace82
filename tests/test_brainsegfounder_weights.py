"""Importing public SwinUNETR weights: Tang et al.'s SSL layout equals MONAI's `SwinUNETR.load_from`; the other
formats are detected, their layout read off the shapes; pickled files need the converter.

Run: .venv/bin/python -m pytest -q tests/test_brainsegfounder_weights.py (the MONAI comparisons skip without monai)
"""

import argparse
import pickle
import re

import nibabel as nib
import numpy as np
import pytest
import torch

from brainsegfounder import convert_checkpoint, finetune, predict
from brainsegfounder.data import load_image
from brainsegfounder.model import SwinUNETR
from brainsegfounder.predict import predict_probabilities
from brainsegfounder.regions import regions_to_labels
from brainsegfounder.ssl_head import SSLHead
from brainsegfounder.train_common import init_encoder, resolve_architecture
from brainsegfounder.weights import read_weights, resolve_legacy_merging
from shared.dataset import list_cases
from shared.errors import InputError
from shared.phantom import write_phantom_datasets

swin_unetr = pytest.importorskip("monai.networks.nets.swin_unetr")


def _rearrange(x, pattern):
    """Stand-in for einops.rearrange (not installed): MONAI only uses pure axis permutations."""
    src, dst = (side.split() for side in pattern.split("->"))
    return x.permute(*[src.index(axis) for axis in dst])


pytestmark = pytest.mark.usefixtures("cache_root")  # tests/conftest.py: caches in a temporary folder


@pytest.fixture(autouse=True)
def _no_einops(monkeypatch):
    monkeypatch.setattr(swin_unetr, "rearrange", _rearrange)


def tang_file(path, feature_size=12, in_channels=1, depths=(2, 2, 2, 2), seed=0):
    """A file in the layout of Swin-UNETR's released model_swinvit.pt, from a randomly initialised MONAI encoder:
    {"state_dict": {"module.<encoder key>"}} with fc1/fc2, plus SSL-head keys that an import must ignore."""
    torch.manual_seed(seed)
    encoder = swin_unetr.SwinUNETR(in_channels=in_channels, out_channels=2, feature_size=feature_size,
                                   depths=depths).swinViT  # fmt: skip
    with torch.no_grad():
        for p in encoder.parameters():  # norms start at 1/0: make every tensor distinct
            p.add_(torch.randn_like(p) * 0.1)
    state = {"module." + re.sub(r"mlp\.linear([12])", r"mlp.fc\1", k): v for k, v in encoder.state_dict().items()}
    state["module.rotation_head.weight"] = torch.randn(4, 16 * feature_size)
    state["module.contrastive_head.weight"] = torch.randn(512, 16 * feature_size)
    torch.save({"state_dict": state, "epoch": 3}, path)
    return state


def _args(init, **kw):
    base = dict(init=str(init), init_channels=None, legacy_merging=None, size="tiny", feature_size=48,
                num_heads=(3, 6, 12, 24), window_size=7, patch_embed_init="kaiming", channel_transfer="name",
                channels=["T1"])  # fmt: skip
    return argparse.Namespace(**{**base, **kw})


def test_tang_layout_gives_the_encoder_that_monai_load_from_gives(tmp_path, capsys):
    path = tmp_path / "model_swinvit.pt"
    tang_file(path, in_channels=1)
    reference = swin_unetr.SwinUNETR(in_channels=1, out_channels=3, feature_size=12)
    reference.load_from(torch.load(path, weights_only=True))

    args = _args(path, init_channels=["T1"], legacy_merging=False)
    arch, init = resolve_architecture(args)
    assert arch == {"feature_size": 12, "depths": [2, 2, 2, 2], "num_heads": [3, 6, 12, 24], "window_size": 7,
                    "legacy_merging": False}  # fmt: skip
    ours = SwinUNETR(1, 3, **{k: v for k, v in arch.items()})
    init_encoder(ours.swinViT, init, args, ["T1"], is_main=True)
    printed = capsys.readouterr().out
    assert "Tang et al." in printed and "ignored: 2 keys of contrastive_head, rotation_head" in printed
    ref_state, own_state = reference.swinViT.state_dict(), ours.swinViT.state_dict()
    assert set(ref_state) == set(own_state)
    for key, value in ref_state.items():
        assert torch.equal(own_state[key], value), key
    with torch.no_grad():  # and the same features (MONAI 1.6.1 has the fixed merging order)
        x = torch.randn(1, 1, 64, 32, 32)
        for a, b in zip(ours.swinViT(x), reference.swinViT(x)):
            assert torch.allclose(a, b, atol=1e-5)


def test_bsf_ssl_head_and_whole_swinunetr_files(tmp_path):
    torch.manual_seed(1)
    head = SSLHead(2, feature_size=12, depths=(2, 2, 6, 2), window_size=4)
    torch.save({"state_dict": {f"module.{k}": v for k, v in head.state_dict().items()}}, tmp_path / "ssl.pt")
    weights = read_weights(tmp_path / "ssl.pt")
    assert weights.format == "ssl_head" and weights.out_channels is None and weights.in_channels == 2
    assert weights.arch == {"feature_size": 12, "depths": [2, 2, 6, 2], "num_heads": [3, 6, 12, 24], "window_size": 4}
    assert {k.split(".")[0] for k in weights.ignored} == {"rotation_head", "contrastive_head", "conv"}
    assert weights.legacy_merging is None and resolve_legacy_merging(weights, None)[0] is True  # released weights

    model = SwinUNETR(4, 3, feature_size=24, num_heads=(2, 4, 8, 16), window_size=3)
    # BSF's trainer layout, best_acc a numpy float (allowed: rebuilding a numpy scalar runs no code)
    torch.save({"epoch": 5, "best_acc": np.float64(0.9), "state_dict": model.state_dict()}, tmp_path / "model.pt")
    weights = read_weights(tmp_path / "model.pt", flag="--model")
    assert weights.format == "swinunetr" and weights.out_channels == 3 and weights.in_channels == 4
    assert weights.arch == {"feature_size": 24, "depths": [2, 2, 2, 2], "num_heads": [2, 4, 8, 16], "window_size": 3}
    assert set(weights.state) == set(model.state_dict()) and not weights.ignored


def test_pickled_file_needs_the_converter(tmp_path, capsys):
    torch.manual_seed(2)
    model = SwinUNETR(1, 1, feature_size=12, window_size=4)
    torch.save(model, tmp_path / "whole_module.pt")  # BSF ATLAS saves the pickled module
    with pytest.raises(InputError, match="holds pickled Python objects.*convert_checkpoint .* --trust-pickle"):
        read_weights(tmp_path / "whole_module.pt")
    out = tmp_path / "plain.pt"
    convert_checkpoint.main([str(tmp_path / "whole_module.pt"), "--out", str(out), "--trust-pickle", "--channels",
                             "T1w", "--no-legacy-merging"])  # fmt: skip
    assert "whole SwinUNETR" in capsys.readouterr().out
    payload = torch.load(out, weights_only=True)  # plain now
    weights = read_weights(out, flag="--model")
    assert weights.format == "converted" and weights.channels == ["T1"] and weights.legacy_merging is False
    assert weights.meta["target"] == "binary"
    for key, value in model.state_dict().items():
        assert torch.equal(payload["model"][key], value), key
    with pytest.raises(InputError, match="was built with --no-legacy-merging"):
        resolve_legacy_merging(weights, True, flag="--model")


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_unusable_files_are_refused_in_one_sentence(tmp_path):
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    torch.save({"kind": "mome", "model": {}}, tmp_path / "mome.pt")
    torch.save({"state_dict": {"decoder.weight": torch.zeros(2)}}, tmp_path / "other.pt")
    for name, match in [("empty.pt", "file is empty"), ("junk.pt", "not a readable checkpoint"),
                        ("mome.pt", "is a mome checkpoint"), ("other.pt", "no SwinUNETR encoder weights"),
                        ("missing.pt", "file not found")]:  # fmt: skip
        with pytest.raises(InputError, match=match):
            read_weights(tmp_path / name)
    with open(tmp_path / "pickle.pkl", "wb") as f:
        pickle.dump({"state_dict": {"a": 1}}, f)
    with pytest.raises(InputError, match="not a readable checkpoint"):
        read_weights(tmp_path / "pickle.pkl")


def test_predict_takes_a_whole_swinunetr_state_dict(tmp_path, capsys):
    data = write_phantom_datasets(tmp_path, datasets=["tumour"], cases=1, shape=(64, 32, 32), seed=5)[0]
    torch.manual_seed(3)
    trained = SwinUNETR(4, 3, feature_size=12, window_size=4, legacy_merging=True).eval()
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in trained.state_dict().items()}},
               tmp_path / "model.pt")  # fmt: skip
    common = ["--model", str(tmp_path / "model.pt"), "--input", str(data), "--split", "Tr", "--device", "cpu",
              "--patch", "64", "32", "32"]  # fmt: skip
    with pytest.raises(InputError, match="does not record its input modalities; name its 4 channel"):
        predict.main([*common, "--output", str(tmp_path / "p")])
    predict.main([*common, "--channels", "FLAIR", "T1ce", "T1", "T2", "--output", str(tmp_path / "p")])
    printed = capsys.readouterr().out
    assert "whole SwinUNETR state dict" in printed and "assumed the MONAI < 1.5 (legacy) order" in printed
    case = list_cases(data)[0]
    image, _ = load_image(case, ["FLAIR", "T1ce", "T1", "T2"])
    probs = predict_probabilities(trained, image, patch_size=(64, 32, 32), device="cpu", amp=False)
    expected = regions_to_labels(probs > 0.5, (1, 2, 3))  # the phantom's names: necrosis 1, edema 2, enhancing 3
    written = np.asarray(nib.load(tmp_path / "p" / f"{case.case_id}.nii.gz").dataobj)
    assert np.array_equal(written, expected) and expected.any()


def test_finetune_cli_takes_the_tang_layout(tmp_path, capsys):
    data = write_phantom_datasets(tmp_path, datasets=["tumour"], cases=3, shape=(64, 32, 32), seed=5)[0]
    tang_file(tmp_path / "model_swinvit.pt", feature_size=12, in_channels=1)
    finetune.main(
        [
            "--data",
            str(data),
            "--channels",
            "T1",
            "FLAIR",
            "--init",
            str(tmp_path / "model_swinvit.pt"),
            "--init-channels",
            "T1",
            "--no-legacy-merging",
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
            "--fold",
            "-1",
            "--out",
            str(tmp_path / "ft"),
            "--device",
            "cpu",
        ]
    )
    printed = capsys.readouterr().out
    assert "Tang et al." in printed and "T1 <- T1, FLAIR <- new (kaiming init)" in printed
    assert "window 7" in printed and "MONAI >= 1.5 order, as --no-legacy-merging says" in printed
    with pytest.raises(InputError, match="does not record its input channels; name its 1 channel"):
        finetune.main(
            [
                "--data",
                str(data),
                "--channels",
                "T1",
                "--init",
                str(tmp_path / "model_swinvit.pt"),
                "--patch",
                "64",
                "32",
                "32",
                "--fold",
                "-1",
                "--out",
                str(tmp_path / "ft2"),
                "--device",
                "cpu",
            ]
        )
