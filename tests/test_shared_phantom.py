"""Demo phantoms: determinism, tissue contrasts, labels, nnU-Net layout. Run: pytest tests/test_shared_phantom.py"""

import json
import os
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from shared.cli import run_cli
from shared.errors import InputError
from shared.phantom import (
    CLASSES,
    CONTRAST,
    DATASETS,
    SCANNERS,
    _render,
    _session,
    case_rng,
    generate_case,
    main,
    thick_slices,
    write_phantom_datasets,
)
from shared.phantom_anatomy import grid

SHAPE = (32, 32, 32)
SEEDS = [(0, 0), (0, 1), (5, 0)]  # (seed, case index)
ROOT = Path(__file__).resolve().parents[1]


def _mask(class_map, *names):
    return np.isin(class_map, [CLASSES.index(n) for n in names])


def _mean(image, mask):
    assert mask.sum() > 0
    return float(image[mask].mean())


def _local_wm(class_map, lesion, voxels=3):
    """White matter within `voxels` of a lesion: its local reference, so the smooth bias field cancels out."""
    return ndimage.binary_dilation(lesion, iterations=voxels) & _mask(class_map, "wm")


def test_same_seed_gives_identical_case_and_other_seed_or_case_differs():
    images, label = generate_case("tumour", SHAPE, rng_seed=7, case_index=1)
    again, label_again = generate_case("tumour", SHAPE, rng_seed=7, case_index=1)
    other_seed, label_seed = generate_case("tumour", SHAPE, rng_seed=8, case_index=1)
    other_case, label_case = generate_case("tumour", SHAPE, rng_seed=7, case_index=2)
    assert list(images) == ["T1", "T1ce", "T2", "FLAIR"]
    for m in images:
        assert images[m].dtype == np.float32 and images[m].shape == SHAPE
        assert np.array_equal(images[m], again[m])
        assert not np.allclose(images[m], other_seed[m])
        assert not np.allclose(images[m], other_case[m])
    assert label.dtype == np.uint8 and np.array_equal(label, label_again)
    assert not np.array_equal(label, label_seed) and not np.array_equal(label, label_case)


@pytest.mark.parametrize("seed,case", SEEDS)
def test_anatomy_t1_and_t2_tissue_order(seed, case):
    images, label = generate_case("anatomy", SHAPE, rng_seed=seed, case_index=case)
    # anatomy labels: 1 CSF, 2 GM, 3 WM, 4 deep GM, each present
    assert set(np.unique(label)) == {0, 1, 2, 3, 4}
    t1 = [_mean(images["T1"], label == v) for v in (1, 2, 3)]
    t2 = [_mean(images["T2"], label == v) for v in (1, 2, 3)]
    assert t1[2] > t1[1] > t1[0]  # T1: WM > GM > CSF
    assert t2[0] > t2[1] > t2[2]  # T2: CSF > GM > WM


@pytest.mark.parametrize("seed,case", SEEDS)
def test_ms_flair_csf_darkest_and_lesions_bright_on_t2_flair_dark_on_t1(seed, case):
    images, label, classes = generate_case("ms", SHAPE, rng_seed=seed, case_index=case, return_class_map=True)
    lesion = label == 1
    assert np.array_equal(lesion, _mask(classes, "ms_lesion"))
    # voxels next to the zero background are blurred towards 0: leave them out of the tissue means
    inner = ~ndimage.binary_dilation(classes == CLASSES.index("background"))
    flair = {n: _mean(images["FLAIR"], _mask(classes, n) & inner) for n in ("csf", "gm", "wm")}
    assert flair["csf"] < min(flair["gm"], flair["wm"])
    near_wm = _local_wm(classes, lesion)
    assert _mean(images["FLAIR"], lesion) > _mean(images["FLAIR"], near_wm)
    assert _mean(images["T2"], lesion) > _mean(images["T2"], near_wm)
    assert _mean(images["T1"], lesion) < _mean(images["T1"], near_wm)  # "black holes"


@pytest.mark.parametrize("seed,case", SEEDS)
def test_tumour_enhancing_rim_only_on_t1ce_and_edema_bright_on_flair(seed, case):
    images, label, classes = generate_case("tumour", SHAPE, rng_seed=seed, case_index=case, return_class_map=True)
    necrosis, edema, enhancing = label == 1, label == 2, label == 3
    t1, t1ce = images["T1"], images["T1ce"]
    # same voxels: contrast agent brightens the rim by far more than noise, and leaves white matter alone
    assert _mean(t1ce, enhancing) > 1.5 * _mean(t1, enhancing)
    wm = _mask(classes, "wm")
    assert _mean(t1ce, wm) == pytest.approx(_mean(t1, wm), rel=0.1)
    assert _mean(t1ce, enhancing) > _mean(t1ce, necrosis)
    near_wm = _local_wm(classes, edema)
    assert _mean(images["FLAIR"], edema) > _mean(images["FLAIR"], near_wm)
    assert _mean(images["T2"], edema) > _mean(images["T2"], near_wm)
    assert _mean(t1, edema) < _mean(t1, near_wm)


@pytest.mark.parametrize("seed,case", SEEDS)
def test_wmh_stroke_and_dwi_lesion_contrasts(seed, case):
    images, label, classes = generate_case("wmh", SHAPE, rng_seed=seed, case_index=case, return_class_map=True)
    near_wm = _local_wm(classes, label == 1)
    assert _mean(images["FLAIR"], label == 1) > _mean(images["FLAIR"], near_wm)
    assert _mean(images["T1"], label == 1) < _mean(images["T1"], near_wm)

    images, label, classes = generate_case(
        "stroke_chronic", SHAPE, rng_seed=seed, case_index=case, return_class_map=True
    )
    # a chronic infarct is CSF-like on T1: darker than grey matter
    assert _mean(images["T1"], label == 1) < _mean(images["T1"], _mask(classes, "gm"))

    images, label, classes = generate_case("stroke_acute", SHAPE, rng_seed=seed, case_index=case, return_class_map=True)
    tissue = _mask(classes, "gm", "wm", "deep_gm")
    assert _mean(images["DWI"], label == 1) > 1.5 * _mean(images["DWI"], tissue)


@pytest.mark.parametrize("dataset", list(DATASETS))
@pytest.mark.parametrize("shape", [(24, 24, 24), (16, 20, 28)])
def test_every_label_present_lesions_inside_brain_background_zero(dataset, shape):
    declared = set(DATASETS[dataset].labels.values())
    for case in range(3):
        images, label, classes = generate_case(dataset, shape, rng_seed=11, case_index=case, return_class_map=True)
        assert set(np.unique(label)) == declared
        outside = classes == CLASSES.index("background")
        for image in images.values():
            assert np.all(image[outside] == 0) and np.all(image >= 0)
            assert image.shape == shape
        if dataset != "anatomy":
            # a lesion never touches the outside: the CSF rim keeps it at least one voxel inside the head
            assert not (ndimage.binary_dilation(label > 0) & outside).any()


def test_anatomy_scales_with_shape():
    # the same case on two grids fine enough that no size floor in voxels applies: every tissue fills the
    # same fraction of the box, so the anatomy is defined in normalised coordinates
    _, small = generate_case("anatomy", (48, 48, 48), rng_seed=3)
    _, large = generate_case("anatomy", (64, 64, 64), rng_seed=3)
    for value in range(5):
        assert (large == value).mean() == pytest.approx((small == value).mean(), rel=0.05)


def test_written_layout_dataset_json_and_skip(tmp_path, capsys):
    spacing = (1.0, 1.0, 2.0)
    shape = (24, 20, 16)
    roots = write_phantom_datasets(tmp_path, ["tumour", "stroke_acute"], cases=2, shape=shape, seed=4, spacing=spacing)
    assert roots == [tmp_path / "Dataset901_PhantomTumour", tmp_path / "Dataset905_PhantomStrokeAcute"]
    tumour = roots[0]
    assert sorted(os.listdir(tumour / "imagesTr")) == [
        f"PhantomTumour_{i:03d}_{c:04d}.nii.gz" for i in range(2) for c in range(4)
    ]
    assert sorted(os.listdir(tumour / "labelsTr")) == ["PhantomTumour_000.nii.gz", "PhantomTumour_001.nii.gz"]
    ds = json.loads((tumour / "dataset.json").read_text())
    assert ds["channel_names"] == {"0": "T1", "1": "T1ce", "2": "T2", "3": "FLAIR"}
    assert ds["labels"] == {"background": 0, "necrosis": 1, "edema": 2, "enhancing": 3}
    assert ds["numTraining"] == 2 and ds["file_ending"] == ".nii.gz" and ds["name"] == "PhantomTumour"
    assert json.loads((roots[1] / "dataset.json").read_text())["channel_names"] == {"0": "DWI"}

    images, label = generate_case("tumour", shape, rng_seed=4, case_index=1)
    flair = nib.load(tumour / "imagesTr" / "PhantomTumour_001_0003.nii.gz")
    seg = nib.load(tumour / "labelsTr" / "PhantomTumour_001.nii.gz")
    assert flair.get_data_dtype() == np.float32 and seg.get_data_dtype() == np.uint8
    assert np.array_equal(np.asanyarray(flair.dataobj), images["FLAIR"])
    assert np.array_equal(np.asanyarray(seg.dataobj), label)
    # diag(spacing), volume centred: voxel (n - 1) / 2 sits at the world origin
    expected = np.diag([1.0, 1.0, 2.0, 1.0])
    expected[:3, 3] = [-11.5, -9.5, -15.0]
    assert np.allclose(flair.affine, expected) and np.allclose(seg.affine, expected)

    # a subset of datasets gives the same bytes; a complete folder is skipped, not rewritten
    only = write_phantom_datasets(tmp_path / "b", ["tumour"], cases=2, shape=shape, seed=4, spacing=spacing)[0]
    name = "imagesTr/PhantomTumour_000_0002.nii.gz"
    assert (only / name).read_bytes() == (tumour / name).read_bytes()
    stamp = os.stat(tumour / name).st_mtime_ns
    capsys.readouterr()
    write_phantom_datasets(tmp_path, ["tumour"], cases=2, shape=shape, seed=4, spacing=spacing)
    assert "skipped" in capsys.readouterr().out and os.stat(tumour / name).st_mtime_ns == stamp
    # an interrupted folder (no dataset.json yet) is regenerated; other settings are refused, not overwritten
    (tumour / "dataset.json").unlink()
    write_phantom_datasets(tmp_path, ["tumour"], cases=2, shape=shape, seed=4, spacing=spacing)
    assert (tumour / "dataset.json").is_file()
    with pytest.raises(InputError, match="other settings"):
        write_phantom_datasets(tmp_path, ["tumour"], cases=3, shape=shape, seed=4, spacing=spacing)
    assert (tumour / "dataset.json").read_bytes() and not (tumour / "labelsTr" / "PhantomTumour_002.nii.gz").exists()


@pytest.mark.parametrize(
    "args,message",
    [
        (["--cases", "0"], "--cases must be at least 1, got 0."),
        (["--shape", "8", "32", "32"], "--shape must be three sizes of at least 16 voxels, got (8, 32, 32)."),
        (["--datasets", "tumour", "tumor"], "--datasets: unknown dataset 'tumor'"),
        (["--shape", "16", "16"], "--shape: expected 3 arguments."),
        (["--cases", "two"], "--cases: invalid int value: 'two'."),
    ],
)
def test_cli_bad_arguments_one_sentence_exit_2(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(lambda: main(["--out", str(out), *args]))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1
    assert not out.exists()


def test_cli_module_entry_point(tmp_path):
    cmd = [sys.executable, "-m", "shared.phantom", "--out", str(tmp_path), "--cases", "0"]
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    result = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr == "error: --cases must be at least 1, got 0.\n"
    cmd = [sys.executable, "-m", "shared.phantom", "--out", str(tmp_path), "--cases", "1", "--shape", "16", "16", "16"]
    result = subprocess.run(cmd + ["--datasets", "wmh"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["Dataset902_PhantomWMH"]
    assert (tmp_path / "Dataset902_PhantomWMH" / "imagesTr" / "PhantomWMH_000_0001.nii.gz").is_file()


def test_thick_slices_by_hand():
    profile = np.array([0.0, 0.0, 3.0, 3.0, 0.0, 0.0], dtype=np.float32)
    # slabs of 2: means 0, 3, 0 at centres 0.5, 2.5, 4.5; voxels in between interpolate linearly
    np.testing.assert_allclose(thick_slices(profile, 2), [0.0, 0.75, 2.25, 2.25, 0.75, 0.0])
    volume = np.broadcast_to(profile, (2, 3, 6)).copy()
    np.testing.assert_allclose(thick_slices(volume, 2)[1, 2], [0.0, 0.75, 2.25, 2.25, 0.75, 0.0])
    # 7 voxels in slabs of 3: means 1, 4 and 6 (voxel 6 repeated) at centres 1, 4, 7
    ramp = np.arange(7, dtype=np.float64)
    np.testing.assert_allclose(thick_slices(ramp, 3), [1, 1, 2, 3, 4, 4 + 2 / 3, 4 + 4 / 3])
    assert thick_slices(profile, 1) is profile


def test_scanner_b_bias_noise_and_contrast_against_scanner_a():
    coords = grid((8, 8, 8))
    bias_a = _session(np.random.default_rng(3), coords)["bias"]
    bias_b = _session(np.random.default_rng(3), coords, bias_scale=2.0)["bias"]
    np.testing.assert_allclose(bias_b, bias_a**2, rtol=1e-12)  # the log bias field doubled
    # a uniform white-matter cube with unit bias and gain: what remains is the class mean and the noise
    class_map = np.full((8, 8, 8), CLASSES.index("wm"), dtype=np.uint8)
    session = {"gain": 1.0, "jitter": np.ones(len(CLASSES)), "bias": np.ones((8, 8, 8))}
    flat = np.ones((8, 8, 8))
    image_a = _render("T2", class_map, flat, session, np.random.default_rng(5), scanner=SCANNERS["A"])
    image_b = _render("T2", class_map, flat, session, np.random.default_rng(5), scanner=SCANNERS["B"])
    wm = CONTRAST["T2"][CLASSES.index("wm")]
    noise_a, noise_b = image_a - wm, image_b - wm**0.8  # contrast power 0.8 on the class mean
    # twice the noise (the same draws), thick slices leave a uniform image unchanged
    np.testing.assert_allclose(noise_b, 2 * noise_a, atol=1e-6)


def test_scanner_b_datasets_are_new_patients_in_their_own_folders(tmp_path):
    (root_b,) = write_phantom_datasets(tmp_path, ["stroke_acute"], cases=2, shape=(16, 16, 16), seed=0, scanner="B")
    (root_a,) = write_phantom_datasets(tmp_path, ["stroke_acute"], cases=2, shape=(16, 16, 16), seed=0)
    assert root_b.name == "Dataset915_PhantomStrokeAcuteScannerB" and root_a.name == "Dataset905_PhantomStrokeAcute"
    meta = json.loads((root_b / "dataset.json").read_text())
    assert meta["phantom"]["scanner"] == "B" and "scanner" not in json.loads((root_a / "dataset.json").read_text())
    label_b = nib.load(root_b / "labelsTr" / "PhantomStrokeAcuteScannerB_000.nii.gz").get_fdata()
    label_a = nib.load(root_a / "labelsTr" / "PhantomStrokeAcute_000.nii.gz").get_fdata()
    assert not np.array_equal(label_a, label_b)
    # scanner A's cases are those of the default generator (the option changes nothing for existing data)
    images, label = generate_case("stroke_acute", (16, 16, 16), rng_seed=0, case_index=0)
    np.testing.assert_array_equal(label, label_a)
    assert case_rng(0, "stroke_acute", 0).integers(1 << 30) != case_rng(0, "stroke_acuteScannerB", 0).integers(1 << 30)
    with pytest.raises(InputError, match="--scanner: unknown scanner 'C'"):
        write_phantom_datasets(tmp_path, ["wmh"], cases=1, shape=(16, 16, 16), scanner="C")
