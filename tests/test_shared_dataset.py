"""Checks nnU-Net raw-dataset reader (aliases, errors): pytest -q tests/test_shared_dataset.py"""

import json
import re

import nibabel as nib
import numpy as np
import pytest

from shared.dataset import (
    MODALITIES,
    canonical_modality,
    declared_label_values,
    list_cases,
    load_case,
    load_dataset_json,
    write_dataset_json,
)
from shared.errors import InputError

SHAPE = (4, 5, 6)
AFFINE = np.array([[-1.0, 0, 0, 10], [0, -1.0, 0, 20], [0, 0, 2.0, -5], [0, 0, 0, 1]])
LABELS = {"background": 0, "whole": [1, 2], "core": 2}


def save(path, data, affine=AFFINE):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(data), affine), str(path))
    return path


def image(seed):
    return np.random.default_rng(seed).normal(size=SHAPE).astype(np.float32)


def label(seed):
    return np.random.default_rng(seed).integers(0, 3, size=SHAPE).astype(np.uint8)


@pytest.fixture
def dataset(tmp_path):
    """Dataset001_Tiny: channels T1w, t2-flair; cases a (complete), b (no FLAIR file), c (complete); imagesTs x."""
    root = tmp_path / "Dataset001_Tiny"
    write_dataset_json(root, ["T1w", "t2-flair"], LABELS, num_training=3)
    for case in ("a", "b", "c"):
        save(root / "imagesTr" / f"{case}_0000.nii.gz", image(ord(case)))
        if case != "b":
            save(root / "imagesTr" / f"{case}_0001.nii.gz", image(ord(case) + 100))
        save(root / "labelsTr" / f"{case}.nii.gz", label(ord(case)))
    save(root / "imagesTs" / "x_0000.nii.gz", image(1))
    save(root / "imagesTs" / "x_0001.nii.gz", image(2))
    return root


@pytest.mark.parametrize(
    "name, canonical",
    [
        ("T1", "T1"), ("t1w", "T1"), ("T1ce", "T1ce"), ("t1c", "T1ce"), ("T1Gd", "T1ce"), ("T1-Gd", "T1ce"),
        ("T1CE", "T1ce"), ("T2", "T2"), ("T2w", "T2"), ("flair", "FLAIR"), ("T2-FLAIR", "FLAIR"),
        ("T2FLAIR", "FLAIR"), ("DWI", "DWI"), ("dw", "DWI"), ("b1000", "DWI"), (" ADC ", "ADC"), ("CT", "CT"),
    ],
)  # fmt: skip
def test_canonical_modality(name, canonical):
    assert canonical_modality(name) == canonical


def test_modalities_constant_is_canonical():
    assert MODALITIES == ("T1", "T1ce", "T2", "FLAIR", "DWI")
    assert all(canonical_modality(m) == m for m in MODALITIES)


def test_write_then_load_dataset_json(tmp_path):
    root = tmp_path / "Dataset002_X"
    path = write_dataset_json(root, {0: "T1", 1: "DWI"}, {"background": 0, "lesion": 1}, num_training=7)
    stored = json.loads(path.read_text())
    assert stored == {
        "name": "Dataset002_X",
        "channel_names": {"0": "T1", "1": "DWI"},
        "labels": {"background": 0, "lesion": 1},
        "numTraining": 7,
        "file_ending": ".nii.gz",
    }
    assert load_dataset_json(root) == stored
    assert not [p for p in root.iterdir() if p.name.startswith(".tmp_")]


def test_declared_label_values_union_of_regions():
    assert declared_label_values(LABELS) == (0, 1, 2)
    assert declared_label_values({"background": 0, "a": (3, 5), "b": 9}) == (0, 3, 5, 9)


def test_load_dataset_json_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"dataset\.json: dataset\.json not found"):
        load_dataset_json(tmp_path)


def test_load_dataset_json_invalid_json(tmp_path):
    (tmp_path / "dataset.json").write_text("{not json")
    with pytest.raises(InputError, match=r"dataset\.json: dataset\.json is not valid JSON"):
        load_dataset_json(tmp_path)


@pytest.mark.parametrize("key", ["channel_names", "labels", "file_ending"])
def test_load_dataset_json_missing_key(tmp_path, key):
    ds = {"channel_names": {"0": "T1"}, "labels": {"background": 0}, "file_ending": ".nii.gz"}
    del ds[key]
    (tmp_path / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(InputError, match=rf"dataset\.json: missing required key '{key}'"):
        load_dataset_json(tmp_path)


@pytest.mark.parametrize(
    "change, message",
    [
        ({"channel_names": {"T1": "0"}}, "key 'channel_names' has 'T1', which is not a channel index"),
        ({"channel_names": {}}, "key 'channel_names' must be a non-empty dict"),
        ({"labels": {"background": 0, "lesion": "1"}}, "key 'labels' maps 'lesion' to '1', expected an int"),
        ({"labels": {"background": 0, "region": [1, 2.5]}}, r"maps 'region' to \[1, 2.5\]"),
        ({"file_ending": "nii.gz"}, "key 'file_ending' must be a string like"),
        ({"numTraining": "3"}, "key 'numTraining' must be an int"),
    ],
)
def test_load_dataset_json_bad_values(tmp_path, change, message):
    ds = {"channel_names": {"0": "T1"}, "labels": {"background": 0}, "file_ending": ".nii.gz", **change}
    (tmp_path / "dataset.json").write_text(json.dumps(ds))
    with pytest.raises(InputError, match=message):
        load_dataset_json(tmp_path)


def test_list_cases_reports_missing_modalities(dataset):
    cases = list_cases(dataset)
    assert [c.case_id for c in cases] == ["a", "b", "c"]
    a, b, _ = cases
    assert list(a.images) == ["T1", "FLAIR"]
    assert a.images["FLAIR"] == str(dataset / "imagesTr" / "a_0001.nii.gz")
    assert a.label == str(dataset / "labelsTr" / "a.nii.gz")
    assert a.missing == [] and a.dataset == "Dataset001_Tiny" and a.label_values == (0, 1, 2)
    assert b.images["FLAIR"] is None and b.missing == ["FLAIR"]


def test_list_cases_test_split_without_labels(dataset):
    (x,) = list_cases(dataset, split="Ts")
    assert x.case_id == "x" and x.label is None and x.missing == []


def test_list_cases_label_without_images_is_all_missing(dataset):
    save(dataset / "labelsTr" / "d.nii.gz", label(0))
    d = list_cases(dataset)[-1]
    assert d.case_id == "d" and d.missing == ["T1", "FLAIR"]
    with pytest.raises(InputError, match=r"case d of Dataset001_Tiny: no image file for any of the modalities"):
        load_case(d)


def test_list_cases_bad_files(dataset, tmp_path):
    save(dataset / "imagesTr" / "a_0002.nii.gz", image(0))
    with pytest.raises(InputError, match=r"a_0002\.nii\.gz: channel 2 is not declared in dataset\.json"):
        list_cases(dataset)
    (dataset / "imagesTr" / "a_0002.nii.gz").rename(dataset / "imagesTr" / "a_2.nii.gz")
    with pytest.raises(InputError, match=r"a_2\.nii\.gz: image file name must end in _XXXX\.nii\.gz"):
        list_cases(dataset)
    write_dataset_json(tmp_path / "empty", ["T1"], LABELS, num_training=0)
    with pytest.raises(InputError, match=r"empty/imagesTs: image folder not found"):
        list_cases(tmp_path / "empty", split="Ts")


def test_list_cases_duplicate_modality(tmp_path):
    write_dataset_json(tmp_path, ["T1", "t1w"], LABELS, num_training=0)
    with pytest.raises(InputError, match=r"dataset\.json: channel_names give modality \['T1'\] more than once"):
        list_cases(tmp_path)


def test_load_case_values(dataset):
    a, b, _ = list_cases(dataset)
    img, lab, ref, present = load_case(a)
    assert img.dtype == np.float32 and img.shape == (2, *SHAPE)
    np.testing.assert_array_equal(img[0], image(ord("a")))
    np.testing.assert_array_equal(img[1], image(ord("a") + 100))
    assert lab.dtype == np.int64
    np.testing.assert_array_equal(lab, label(ord("a")))
    np.testing.assert_allclose(ref.affine, AFFINE)
    assert ref.path == a.images["T1"] and present == ["T1", "FLAIR"]
    # modalities by alias and in the asked order; a missing file is skipped, not an error
    img, _, ref, present = load_case(a, modalities=["flair", "T1w"])
    assert present == ["FLAIR", "T1"] and ref.path == a.images["FLAIR"]
    np.testing.assert_array_equal(img[1], image(ord("a")))
    img, _, _, present = load_case(b)
    assert present == ["T1"] and img.shape == (1, *SHAPE)
    with pytest.raises(InputError, match=r"modalities: \['DWI'\] are not channels of Dataset001_Tiny"):
        load_case(a, modalities=["dwi"])


def test_load_case_channel_shape_mismatch(dataset):
    path = save(dataset / "imagesTr" / "a_0001.nii.gz", np.zeros((4, 5, 7), dtype=np.float32))
    with pytest.raises(
        InputError, match=rf"{re.escape(str(path))}: shape \(4, 5, 7\) differs from \(4, 5, 6\) of .*a_0000"
    ):
        load_case(list_cases(dataset)[0])


def test_load_case_affine_tolerance(dataset):
    shifted = AFFINE.copy()
    shifted[0, 3] += 5e-4
    save(dataset / "imagesTr" / "a_0001.nii.gz", image(0), affine=shifted)
    load_case(list_cases(dataset)[0])  # within atol 1e-3
    shifted[0, 3] += 0.5
    path = save(dataset / "imagesTr" / "a_0001.nii.gz", image(0), affine=shifted)
    with pytest.raises(
        InputError, match=rf"{re.escape(str(path))}: affine differs from that of .*a_0000.nii.gz by up to 0.5005"
    ):
        load_case(list_cases(dataset)[0])
    load_case(list_cases(dataset)[0], atol=1.0)


def test_load_case_label_shape_and_affine_mismatch(dataset):
    path = save(dataset / "labelsTr" / "a.nii.gz", np.zeros((4, 5, 5), dtype=np.uint8))
    with pytest.raises(
        InputError, match=rf"{re.escape(str(path))}: label shape \(4, 5, 5\) differs from image shape \(4, 5, 6\)"
    ):
        load_case(list_cases(dataset)[0])
    path = save(dataset / "labelsTr" / "a.nii.gz", label(0), affine=np.eye(4))
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}: affine differs from that of"):
        load_case(list_cases(dataset)[0])


def test_load_case_undeclared_label_values(dataset):
    bad = label(0)
    bad[0, 0, 0], bad[1, 1, 1] = 7, 3
    path = save(dataset / "labelsTr" / "a.nii.gz", bad)
    a = list_cases(dataset)[0]
    with pytest.raises(
        InputError, match=rf"{re.escape(str(path))}: label values \[3, 7\] are not declared .*declared: \[0, 1, 2\]"
    ):
        load_case(a)
    _, lab, _, _ = load_case(a, check_labels=False)
    assert lab[0, 0, 0] == 7 and lab[1, 1, 1] == 3


def test_load_case_non_integer_labels(dataset):
    path = save(dataset / "labelsTr" / "a.nii.gz", np.full(SHAPE, 0.5, dtype=np.float32))
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}: label map holds non-integer values"):
        load_case(list_cases(dataset)[0])


def test_load_case_nan_voxels(dataset):
    bad = image(0)
    bad[1, 2, 3] = np.nan
    bad[0, 0, 0] = np.inf
    path = save(dataset / "imagesTr" / "c_0001.nii.gz", bad)
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}: 2 voxels are NaN or Inf"):
        load_case(list_cases(dataset)[2])


def test_load_case_empty_corrupt_and_4d_files(dataset):
    path = dataset / "imagesTr" / "c_0001.nii.gz"
    path.write_bytes(b"")
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}: file is empty"):
        load_case(list_cases(dataset)[2])
    path.write_bytes(b"this is not a nifti file at all")
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}: not a readable NIfTI file"):
        load_case(list_cases(dataset)[2])
    save(path, np.zeros((*SHAPE, 2), dtype=np.float32))
    with pytest.raises(InputError, match=rf"{re.escape(str(path))}: expected a 3D volume, got shape \(4, 5, 6, 2\)"):
        load_case(list_cases(dataset)[2])


def test_check_declared_names_the_file_and_the_undeclared_values():
    from shared.dataset import check_declared
    from shared.errors import InputError

    check_declared("a.nii.gz", np.array([0, 1, 2]), (0, 1, 2))
    with pytest.raises(InputError, match=r"a.nii.gz: label values \[5, 7\] are not declared in x.json labels"):
        check_declared("a.nii.gz", np.array([0, 1, 5, 7]), (0, 1), source="x.json")
