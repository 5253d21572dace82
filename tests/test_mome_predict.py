"""mome.predict: mirroring by default (8 passes), the model's grid enforced, --mni-crop / --crop-or-pad and back.

Run: .venv/bin/python -m pytest -q tests/test_mome_predict.py
"""

import dataclasses
import itertools

import nibabel as nib
import numpy as np
import pytest
import torch

from mome import MoMEConfig, predict
from mome.model import build_expert
from shared.checkpoint import save_checkpoint
from shared.errors import InputError
from shared.intensity import zscore


def single_network(path, *, features=(4, 8), grid, patch, seed=0):
    """A mome.train_expert-style checkpoint of one untrained PlainUNet (random weights, asymmetric)."""
    torch.manual_seed(seed)
    cfg = MoMEConfig(modalities=("T1",), features=features)
    net = build_expert(cfg)
    with torch.no_grad():
        for p in net.parameters():  # random norms and biases, so that mirrored passes really differ
            p.copy_(torch.randn_like(p) * 0.5)
    save_checkpoint(path, kind="mome_expert", config=dataclasses.asdict(cfg), model=net.state_dict(),
                    args={"patch": list(patch)}, grid=list(grid) if grid else None, modality="T1")  # fmt: skip
    net.deep_supervision = False
    return net.eval()


def write_image(path, data, affine=None):
    nib.save(nib.Nifti1Image(data.astype(np.float32), np.eye(4) if affine is None else affine), path)
    return path


def manual(net, image, mirror: bool) -> np.ndarray:
    """argmax of the z-scored image's logits, averaged over all 8 flips of the axes when `mirror`."""
    x = torch.from_numpy(zscore(image[None]))[None]
    combos = [c for r in range(4) for c in itertools.combinations((2, 3, 4), r)] if mirror else [()]
    with torch.no_grad():
        logits = sum(torch.flip(net(torch.flip(x, c)), c) for c in combos) / len(combos)
    return logits[0].argmax(0).numpy().astype(np.uint8)


def test_predict_mirrors_by_default_and_no_mirror_is_one_pass(tmp_path):
    net = single_network(tmp_path / "net.pt", grid=(16, 16, 16), patch=(16, 16, 16))
    image = np.random.default_rng(0).normal(size=(16, 16, 16))
    write_image(tmp_path / "scan_0000.nii.gz", image)
    mirrored, single = manual(net, image, mirror=True), manual(net, image, mirror=False)
    assert not np.array_equal(mirrored, single)  # else the test could not tell the two apart
    for flags, expected in (([], mirrored), (["--no-mirror"], single)):
        out = tmp_path / f"out{len(flags)}"
        predict.main(["--model", str(tmp_path / "net.pt"), "--input", str(tmp_path / "scan_0000.nii.gz"),
                      "--output", str(out), "--device", "cpu", *flags])  # fmt: skip
        np.testing.assert_array_equal(np.asarray(nib.load(out / "scan_0000.nii.gz").dataobj), expected)


def test_other_grids_are_refused_unless_cropped_or_padded_explicitly(tmp_path):
    net = single_network(tmp_path / "net.pt", grid=(16, 16, 16), patch=(16, 16, 16))
    image = np.random.default_rng(1).normal(size=(20, 14, 16))
    affine = np.diag([1.0, 1.0, 1.0, 1.0])
    affine[:3, 3] = (-10, -7, -8)
    write_image(tmp_path / "big_0000.nii.gz", image, affine)
    args = ["--model", str(tmp_path / "net.pt"), "--input", str(tmp_path / "big_0000.nii.gz"), "--output",
            str(tmp_path / "out"), "--device", "cpu", "--no-mirror"]  # fmt: skip
    with pytest.raises(InputError, match="shape 20x14x16 is not the 16x16x16 grid this model was trained on"):
        predict.main(args)
    assert not (tmp_path / "out").exists()
    predict.main([*args, "--crop-or-pad"])
    out = nib.load(tmp_path / "out" / "big_0000.nii.gz")
    np.testing.assert_allclose(out.affine, affine)  # written back in the input's grid
    label = np.asarray(out.dataobj)
    # x: 20 -> 16 keeps [2:18]; y: 14 -> 16 pads 1 before and after; the prediction goes back to the same voxels
    padded = np.zeros((16, 16, 16))
    padded[:, 1:15] = image[2:18]
    expected = manual(net, padded, mirror=False)
    np.testing.assert_array_equal(label[2:18], expected[:, 1:15])
    assert not label[:2].any() and not label[18:].any()


def test_mni_crop_predicts_the_official_box_and_writes_the_mni_grid(tmp_path, monkeypatch):
    # a stand-in for a model trained on 160x196x160 (a UNet on this grid takes seconds on a CPU): lesion = x > 0
    info = {"patch": (160, 196, 160), "grid": (160, 196, 160), "mirror_axes": (), "config": MoMEConfig(features=(1, 1))}
    monkeypatch.setattr(predict, "load_model", lambda path, device: (lambda x: torch.cat([-x, x], dim=1), info))
    image = np.zeros((182, 218, 182))
    image[20:180, 20:216, 0:160] = np.random.default_rng(2).normal(size=(160, 196, 160))
    write_image(tmp_path / "mni_0000.nii", image)
    args = ["--model", "unused.pt", "--input", str(tmp_path / "mni_0000.nii"), "--output", str(tmp_path / "out"),
            "--device", "cpu"]  # fmt: skip
    with pytest.raises(InputError, match="shape 182x218x182 is not the 160x196x160 grid .* --mni-crop"):
        predict.main(args)
    predict.main([*args, "--mni-crop"])
    label = np.asarray(nib.load(tmp_path / "out" / "mni_0000.nii").dataobj)
    assert label.shape == (182, 218, 182)
    crop = image[20:180, 20:216, 0:160]
    np.testing.assert_array_equal(label[20:180, 20:216, 0:160], zscore(crop[None])[0] > 0)
    outside = np.ones(label.shape, bool)
    outside[20:180, 20:216, 0:160] = False
    assert not label[outside].any()


def test_patch_not_divisible_is_refused(tmp_path):
    single_network(tmp_path / "net.pt", grid=None, patch=(16, 16, 16))
    write_image(tmp_path / "s_0000.nii.gz", np.zeros((16, 16, 16)))
    with pytest.raises(
        InputError, match=r"--patch \[15, 16, 16\]: every side must be a positive multiple of \[2, 2, 2\]"
    ):
        predict.main(["--model", str(tmp_path / "net.pt"), "--input", str(tmp_path / "s_0000.nii.gz"), "--output",
                      str(tmp_path / "out"), "--patch", "15", "16", "16"])  # fmt: skip
